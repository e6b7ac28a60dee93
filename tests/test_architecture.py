"""The house's rules, read from the import statements of every module: core never reaches up, the API
never imports the worker, and the domains depend one way (sweeps → jobs → webhooks, files → tenants)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "api", "worker", "cli", "migrations")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(REPO)): _imports(path) for path in sorted((REPO / package).rglob("*.py"))}


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{module} imports {name}"
        for module, names in _modules(package).items()
        for name in sorted(names)
        if name.split(".")[0] in forbidden or any(name.startswith(f"{f}.") for f in forbidden if "." in f)
    ]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("core", ("api", "worker", "cli", "migrations")),
        ("api", ("worker", "cli")),
        ("worker", ("api", "cli")),
        ("migrations", ("api", "worker", "cli")),
        ("core/tenants", ("core.files", "core.jobs", "core.webhooks", "core.sweeps")),
        ("core/files", ("core.jobs", "core.webhooks", "core.sweeps")),
        ("core/webhooks", ("core.jobs", "core.files", "core.sweeps")),
        ("core/jobs", ("core.sweeps",)),
        ("core/distill", ("core.jobs", "core.files", "core.tenants", "core.webhooks", "core.sweeps")),
    ],
)
def test_imports_run_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    assert _offenders(package, forbidden) == []


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    # The checker itself must notice an upward import, a nested one included.
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from worker.supervisor import run_job\n    import api.main\n")
    assert {"worker.supervisor", "api.main"} <= _imports(module)


def test_core_loads_no_upper_package_at_run_time() -> None:
    # Every core module imported in a fresh interpreter: nothing above core comes along.
    modules = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "core").rglob("*.py")
    )
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {('api', 'worker', 'cli', 'migrations')!r})\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr + result.stdout
