"""Fixtures of the supervisor tests: settings on a fresh SQLite database and a seeded job."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Settings
from tests.support.services import make_settings, seed_job, sqlite_database, tiny_spec


@pytest.fixture
def settings(tmp_path: Path, tiny_teacher_dir: Path) -> Settings:
    return make_settings(
        tmp_path,
        database_url=sqlite_database(tmp_path / "db"),
        model_roots=[tiny_teacher_dir.parent],
        heartbeat_interval_s=0.2,
        cancel_grace_s=30,
    )


@pytest.fixture
def job_id(settings: Settings, tiny_teacher_dir: Path) -> str:
    return seed_job(settings, tiny_spec(tiny_teacher_dir, "placeholder"))
