"""The dashboard's files as a real server serves them (no browser): the page at /ui and /ui/ with its
Content-Security-Policy and no inline script, every asset it names, every module its modules import, and
the vendored chart library with its version and license recorded."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.ui import STATIC_DIR
from tests.support.live_api import serve_in_thread, service_settings

IMPORT = re.compile(r"""^\s*import\s[^;]*?\sfrom\s+["'](\.{1,2}/[^"']+)["']""", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp("ui-static")
    base_url, stop = serve_in_thread(service_settings(home, f"sqlite:///{home / 'distill.db'}"))
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client
    stop()


@pytest.mark.parametrize("path", ["/ui", "/ui/"])
def test_the_page_is_served_with_a_strict_policy(ui: httpx.Client, path: str) -> None:
    response = ui.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", response.text, re.DOTALL)
    assert scripts and all('src="/ui/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert "style=" not in response.text and "<style" not in response.text


def test_every_asset_and_module_import_resolves(ui: httpx.Client) -> None:
    page = ui.get("/ui").text
    assets = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page)
    assert any(a.endswith("uPlot.iife.min.js") for a in assets) and any(a.endswith("app.js") for a in assets)
    for asset in assets:
        response = ui.get(asset)
        assert response.status_code == 200, asset
    # Follow the ES module graph from app.js: a missing or misspelled module breaks the whole page.
    pending, seen = ["/ui/static/js/app.js"], set()
    while pending:
        url = pending.pop()
        if url in seen:
            continue
        seen.add(url)
        response = ui.get(url)
        assert response.status_code == 200, url
        assert "javascript" in response.headers["content-type"], url
        for target in IMPORT.findall(response.text):
            pending.append(str(httpx.URL(f"http://x{url}").join(target).path))
    modules = {
        f"/ui/static/{p.relative_to(STATIC_DIR).as_posix()}" for p in (STATIC_DIR / "js").rglob("*.js")
    }
    assert seen == modules, "every module is reachable from app.js, and every import exists"


def test_the_ui_is_not_part_of_the_api_schema(ui: httpx.Client) -> None:
    assert not [path for path in ui.get("/openapi.json").json()["paths"] if path.startswith("/ui")]


def test_the_vendored_chart_library_records_its_version_and_license() -> None:
    vendor = STATIC_DIR / "vendor" / "uplot"
    banner = (vendor / "uPlot.iife.min.js").read_text(encoding="utf-8")[:200]
    version = re.search(r"\(v(\d+\.\d+\.\d+)\)", banner)
    assert version, banner
    readme = (vendor / "README.md").read_text(encoding="utf-8")
    assert f"Version: {version[1]}" in readme
    assert "MIT License" in (vendor / "LICENSE").read_text(encoding="utf-8")
    assert "MIT" in (vendor / "uPlot.min.css").read_text(encoding="utf-8").splitlines()[0]


def test_the_static_files_are_package_data() -> None:
    """pyproject's package-data patterns cover every file under api/ui/static (a wheel would ship them)."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    patterns = re.search(r"^api = \[(.*)\]$", pyproject, re.MULTILINE)
    assert patterns, "no package-data entry for api"
    globs = re.findall(r'"([^"]+)"', patterns[1])
    package = STATIC_DIR.parent.parent
    files = {p for p in STATIC_DIR.rglob("*") if p.is_file()}
    covered = {p for pattern in globs for p in package.glob(pattern) if p.is_file()}
    assert files <= covered, sorted(str(p) for p in files - covered)
