"""`distill keys create|list|revoke|rotate` against a real (temporary) SQLite database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from cli.main import main
from core.config import get_settings
from core.db import get_sessionmaker, utcnow
from core.tenants.keys import authenticate, authenticate_key
from core.tenants.models import ApiKey


@pytest.fixture
def home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Path]:
    for name in (
        "DISTILL_DATABASE_URL",
        "DISTILL_BROKER_URL",
        "DISTILL_STORAGE_DIR",
        "DISTILL_BOOTSTRAP_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()
    yield tmp_path / "home"
    get_settings.cache_clear()


def _session() -> Session:
    return get_sessionmaker(get_settings().database_url)()


def _create(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    """Run `distill keys create ARGS`; returns (key id, plaintext)."""
    assert main(["keys", "create", *args]) == 0
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    plaintext = out[-1]
    with _session() as session:
        return authenticate_key(session, plaintext).key_id, plaintext


def _listed(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict]:
    assert main(["keys", "list", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_create_admin_and_expiring_keys_and_list_them(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin_id, admin_key = _create(capsys, "--tenant", "ops", "--name", "root", "--admin")
    temp_id, _ = _create(capsys, "--tenant", "acme", "--name", "ci", "--expires-in-days", "3")
    with _session() as session:
        assert authenticate_key(session, admin_key).is_admin

    rows = {row["id"]: row for row in _listed(capsys)}
    assert set(rows) == {admin_id, temp_id}
    assert rows[admin_id]["scopes"] == ["admin"] and rows[admin_id]["tenant"] == "ops"
    assert rows[admin_id]["expires_at"] is None and rows[admin_id]["last_used_at"] is not None
    ci = rows[temp_id]
    assert ci["scopes"] == [] and ci["status"] == "active" and ci["name"] == "ci"
    expires = ci["expires_at"]
    assert expires is not None
    remaining = datetime.fromisoformat(expires) - utcnow()
    assert timedelta(days=3) - timedelta(minutes=1) < remaining <= timedelta(days=3)
    for row in rows.values():  # never a hash or the key itself
        assert not set(row) & {"key", "key_hash"} and admin_key not in json.dumps(row)

    assert [row["id"] for row in _listed(capsys, "--tenant", "acme")] == [temp_id]
    assert main(["keys", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["id", "tenant", "name"] and len(table) == 3
    assert any(admin_id in line and "admin" in line for line in table)

    assert main(["keys", "list", "--tenant", "nobody"]) == 1
    assert "no tenant 'nobody'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["keys", "create", "--tenant", "acme", "--expires-in-days", "0"])


def test_revoke_and_rotate(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first_id, first_key = _create(capsys, "--tenant", "acme", "--name", "deploy")
    assert main(["keys", "rotate", first_id]) == 0
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    rotated_key = out[-1]
    assert first_id in out[0] and rotated_key.startswith("dk_")
    with _session() as session:
        assert authenticate(session, first_key) is None  # no grace period: the old key stops at once
        principal = authenticate_key(session, rotated_key)
        new_key = session.get(ApiKey, principal.key_id)
        assert new_key.name == "deploy" and principal.tenant.name == "acme"

    assert main(["keys", "rotate", first_id]) == 1  # already rotated
    assert "already revoked" in capsys.readouterr().err

    assert main(["keys", "rotate", principal.key_id, "--grace-seconds", "3600"]) == 0
    third_key = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    with _session() as session:
        assert authenticate(session, rotated_key) is not None  # still inside its grace period
        assert authenticate(session, third_key) is not None
        later = session.get(ApiKey, principal.key_id).revoked_at
        assert later is not None and later > utcnow() + timedelta(minutes=59)

    assert main(["keys", "revoke", principal.key_id]) == 0  # brings the scheduled revocation forward
    assert principal.key_id in capsys.readouterr().out
    with _session() as session:
        assert authenticate(session, rotated_key) is None
        assert authenticate(session, third_key) is not None
    statuses = {row["id"]: row["status"] for row in _listed(capsys)}
    assert statuses[first_id] == statuses[principal.key_id] == "revoked"
    assert list(statuses.values()).count("active") == 1

    assert main(["keys", "revoke", "key_unknown"]) == 1
    assert "no API key 'key_unknown'" in capsys.readouterr().err
