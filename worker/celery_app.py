"""The Celery app of the workers, built from the settings: late acks, prefetch 1, one job at a time per
worker process. Run it with `distill worker` (or `celery -A worker.celery_app worker`)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

from core.config import get_settings
from core.queue import celery_config
from worker.metrics import start_metrics_server
from worker.process import set_parent_death_signal

app = Celery("distill")
app.conf.update(celery_config(get_settings()))


@worker_process_init.connect
def _die_with_main_process(**_: Any) -> None:
    # A prefork pool process orphaned by a killed main process would keep a job and its heartbeats alive
    # with nobody consuming its queue; dying with the main process lets the reaper re-queue the job.
    set_parent_death_signal()


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    start_metrics_server(get_settings())  # DISTILL_WORKER_METRICS_PORT; 0 = off


import worker.tasks  # noqa: E402,F401  (registers the tasks on `app`)
import worker.webhooks  # noqa: E402,F401  (the webhook delivery task)
