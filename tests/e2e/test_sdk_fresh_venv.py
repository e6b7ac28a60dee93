"""The SDK installed alone: its wheel in a fresh virtual environment that holds only httpx, pydantic and
what they need (no torch, no transformers, no server code), running a whole job through a real API server
and Celery worker: create from a spec with a local data path, wait following the events, download the
student and verify it."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import (
    REPO_ROOT,
    Stack,
    make_settings,
    sqlite_database,
    tiny_spec,
    write_dolly_subset,
)

SCRIPT = """
import json, sys
for forbidden in ("torch", "transformers", "core", "api", "worker", "yaml"):
    try:
        __import__(forbidden)
    except ImportError:
        continue
    sys.exit(f"{forbidden} is importable in the SDK's environment")
from distillery import Distillery
spec = json.loads(sys.argv[1])
events = []
with Distillery() as client:
    job = client.jobs.create(spec)
    final = client.jobs.wait(job.id, timeout=240, on_event=lambda e: events.append(e.kind))
    student = client.jobs.download_student(job.id, sys.argv[2])
    print(json.dumps({"id": job.id, "train": job.spec["data"]["train"], "status": final.status,
                      "events": events, "student": str(student)}))
"""


def _requirement_names(dist: str, seen: set[str]) -> None:
    """`dist` and what it needs (markers evaluated for this interpreter, extras not followed)."""
    key = dist.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    for requirement in metadata.requires(dist) or []:
        if "extra ==" in requirement:
            continue
        name, _, marker = requirement.partition(";")
        if marker.strip():
            from packaging.markers import Marker

            if not Marker(marker).evaluate():
                continue
        _requirement_names(re.split(r"[\s<>=!~\[(]", name.strip(), maxsplit=1)[0], seen)


def _top_level_modules(dist: str) -> set[str]:
    names = set()
    for file in metadata.files(dist) or []:
        top = file.parts[0]
        if top.endswith((".dist-info", ".pth")) or top == "..":
            continue
        names.add(top)
    return names


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the SDK's wheel and, linked in, only httpx, pydantic and their dependencies."""
    root = tmp_path_factory.mktemp("sdk-venv")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO_ROOT / "sdk"), "-w", str(wheels)],
        check=True,
    )  # fmt: skip
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheel = next(wheels.glob("distillery_client-*.whl"))
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )

    needed: set[str] = set()
    for dist in ("httpx", "pydantic"):
        _requirement_names(dist, needed)
    deps = root / "deps"
    deps.mkdir()
    site = Path(metadata.distribution("httpx").locate_file(""))
    for dist in sorted(needed):
        for top in _top_level_modules(dist):
            (deps / top).symlink_to(site / top)
    site_packages = next((venv / "lib").glob("python*/site-packages"))
    (site_packages / "sdk-deps.pth").write_text(str(deps) + "\n")
    return python


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Iterator[tuple[Stack, str]]:
    home = tmp_path_factory.mktemp("sdk-stack")
    key = f"dk_test_{uuid.uuid4().hex}"
    settings = make_settings(
        home,
        database_url=sqlite_database(home / "db"),
        model_roots=[tiny_teacher_dir.parent],
        bootstrap_api_key=key,
        heartbeat_interval_s=1.0,
    )
    stack = Stack(settings, home / "logs", key=key)
    try:
        stack.start_worker()
        stack.client.wait_ready(stack.processes)
        yield stack, key
    finally:
        stack.stop()


def test_a_whole_job_from_the_sdk_alone(
    fresh_python: Path, stack: tuple[Stack, str], tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    stack, key = stack
    data = write_dolly_subset(tmp_path / "dolly.jsonl", records=16)
    spec = tiny_spec(tiny_teacher_dir, str(data))  # a local path: the SDK uploads it first
    env = {
        "DISTILL_API_URL": f"http://127.0.0.1:{stack.port}",
        "DISTILL_API_KEY": key,
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [str(fresh_python), "-c", SCRIPT, json.dumps(spec), str(tmp_path / "out")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + "\n" + "\n".join(p.output() for p in stack.processes)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded", summary
    assert summary["train"].startswith("file_")
    assert {"start", "checkpoint", "done"} <= set(summary["events"])
    student = Path(summary["student"])
    assert student == tmp_path / "out" / "student"
    served = stack.settings.artifacts / "jobs" / summary["id"] / "student"
    for name in ("config.json", "model.safetensors"):
        assert (student / name).read_bytes() == (served / name).read_bytes()
