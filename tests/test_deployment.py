"""docker-compose.yml cannot run here (no Docker engine), so its wiring is checked against the code."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def test_every_distill_variable_in_compose_is_a_setting() -> None:
    compose = _compose()
    names = {
        key
        for service in compose["services"].values()
        for key in (service.get("environment") or {})
        if key.startswith("DISTILL_")
    }
    assert names, "the services should be configured through DISTILL_* variables"
    fields = {f"DISTILL_{name.upper()}" for name in Settings.model_fields}
    assert names <= fields, f"not settings: {sorted(names - fields)}"


def test_services_run_real_commands_and_wait_for_the_migration() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "reaper"} <= set(services)
    assert services["migrate"]["command"] == ["distill", "db", "upgrade"]
    for name in ("api", "worker", "reaper"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert services[name]["command"][0] == "distill", name
    env = services["api"]["environment"]
    assert env["DISTILL_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["DISTILL_BROKER_URL"].startswith("redis://")
    # API and worker must see the same artifacts (uploads in, students out).
    api_volumes = {v.split(":")[1] for v in services["api"]["volumes"]}
    worker_volumes = {v.split(":")[1] for v in services["worker"]["volumes"]}
    assert env["DISTILL_STORAGE_DIR"] in api_volumes & worker_volumes
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"


def test_the_image_copies_every_installed_package() -> None:
    import tomllib

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"
    # The console script lives in one of them.
    assert pyproject["project"]["scripts"]["distill"].split(".")[0] in packages
