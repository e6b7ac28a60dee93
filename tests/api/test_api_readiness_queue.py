"""`/readyz` tells a broker that lost the queued jobs' messages (a restart without persistence) from one
that holds them: jobs queued for a while with fewer messages waiting answer 503 `not_ready`, naming the
counts. Real SQLite database and SQLite broker; the Redis case is in tests/e2e/test_faults.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import update

from api.main import create_app
from core.db import session_scope, utcnow
from core.jobs.models import Job
from core.queue import enqueue_job
from tests.support.api import assert_error
from tests.support.services import make_settings, seed_job, sqlite_database, tiny_spec


def test_readiness_reports_queued_jobs_whose_messages_are_gone(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_database(tmp_path / "db"), requeue_after_s=600)
    jobs = [seed_job(settings, tiny_spec(Path("/models/teacher"), "placeholder")) for _ in range(2)]
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200  # just created: messages may be on their way

        with session_scope(settings.database_url) as session:  # sent a minute ago, and never arrived
            sent_at = utcnow() - timedelta(seconds=60)
            session.execute(update(Job).where(Job.id.in_(jobs)).values(enqueued_at=sent_at))
        response = client.get("/readyz")
        error = assert_error(response, 503, "not_ready")
        broker = response.json()["checks"]["broker"]
        assert "2 jobs queued for more than 30 s" in broker and "holds 0 messages" in broker, broker
        assert "broker" in error["message"] and response.json()["checks"]["database"] == "ok"

        for job_id in jobs:  # what the reaper does after requeue_after_s
            enqueue_job(settings, job_id)
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
