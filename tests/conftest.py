"""Shared fixtures: the repository root, the bundled Dolly files and tiny random models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.distill.tiny import make_tiny_pair, make_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

# Database and live-server fixtures (SQLite and PostgreSQL, a real uvicorn server) for the API tests.
pytest_plugins = ["tests.support.live_api"]


def service_unavailable(reason: str) -> None:
    """Skip a test whose server (PostgreSQL, Redis) is down; fail instead where services are required.

    CI sets DISTILL_REQUIRE_SERVICES=1 after starting the servers, so a broken service can never turn the
    queue and database tests into silent skips there.
    """
    if os.environ.get("DISTILL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (DISTILL_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def dolly_train_path(repo_root: Path) -> Path:
    path = repo_root / "data" / "dolly" / "train.jsonl"
    assert path.is_file(), f"bundled data missing: {path}"
    return path


@pytest.fixture(scope="session")
def dolly_test_path(repo_root: Path) -> Path:
    path = repo_root / "data" / "dolly" / "test.jsonl"
    assert path.is_file(), f"bundled data missing: {path}"
    return path


@pytest.fixture(scope="session")
def _tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(_tiny_models_root: Path) -> Path:
    """A directory holding the tiny byte-level BPE tokenizer (vocab 384, with a chat template)."""
    out = _tiny_models_root / "tokenizer"
    make_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def _tiny_pair(_tiny_models_root: Path, tiny_tokenizer_dir: Path) -> tuple[Path, Path]:
    return make_tiny_pair(_tiny_models_root, tokenizer=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_teacher_dir(_tiny_pair: tuple[Path, Path]) -> Path:
    """A random Llama teacher (4 layers, hidden 48) saved as a Hugging Face directory. Treat as read-only."""
    return _tiny_pair[0]


@pytest.fixture(scope="session")
def tiny_student_dir(_tiny_pair: tuple[Path, Path]) -> Path:
    """A random Llama student (2 layers, hidden 32), same tokenizer as the teacher. Treat as read-only."""
    return _tiny_pair[1]
