"""Report a job to MLflow as it trains: one run per job, the spec as params, every step and evaluation
metric with its step, and on success the student as an MLflow `transformers` model, registered as a new
version of `tracking.mlflow.register_as` when given.

The tracking server is the service's (`DISTILL_MLFLOW_TRACKING_URI`); a spec only names the experiment, the
run and the registered model. MLflow is a mirror, never a reason to fail: the first error (a server that is
down, a timeout, a refused request) becomes one `tracking` warning event and ends tracking for the attempt,
while the job goes on. `mlflow` is imported only here, and only for a job that asks for it.

Exactly once per step, like the database: the run id and the last step logged per metric live in the job
directory (`mlflow-run.json`), so a resumed attempt logs into the same run and skips what an earlier
attempt already sent (MLflow cannot delete metric values; a resumed step would otherwise appear twice).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.config import Settings
from core.db import get_sessionmaker
from core.distill.callbacks import TrainerCallbacks
from core.distill.spec import JobSpec, MlflowSpec
from core.errors import without_server_paths
from core.jobs.models import Job, JobEvent

RUN_FILE = "mlflow-run.json"
EVENT_KIND = "tracking"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limits on one log_batch request
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000

# A dead or slow server must not stall training: one retry, short timeouts (the operator's own MLFLOW_*
# variables win). Uploading a student takes longer than any API call.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT": "600",
}

# report(message, data): one event in the job's log.
Report = Callable[[str, dict[str, Any] | None], None]


class Fanout(TrainerCallbacks):
    """The trainer's callbacks: `primary` (progress, events, stop requests) first, then observers that only
    watch. Only `primary` decides whether training stops."""

    def __init__(self, primary: TrainerCallbacks, *observers: TrainerCallbacks) -> None:
        self._all = (primary, *observers)
        self._primary = primary

    def on_start(self, *, total_steps: int, start_step: int) -> None:
        for callbacks in self._all:
            callbacks.on_start(total_steps=total_steps, start_step=start_step)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        for callbacks in self._all:
            callbacks.on_step(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        for callbacks in self._all:
            callbacks.on_eval(step, metrics, samples)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        for callbacks in self._all:
            callbacks.on_checkpoint(step, path, metrics)

    def on_checkpoint_set_aside(self, step: int, path: Path, problem: str) -> None:
        self._primary.on_checkpoint_set_aside(step, path, problem)

    def on_event(self, kind: str, message: str) -> None:
        for callbacks in self._all:
            callbacks.on_event(kind, message)

    def should_stop(self) -> bool:
        return self._primary.should_stop()


def open_tracker(
    *, settings: Settings, spec: JobSpec, job_id: str, job_dir: Path, report: Report
) -> MlflowTracker | None:
    """The MLflow reporter of a job whose spec asks for one (None otherwise); nothing is contacted yet."""
    options = spec.tracking.mlflow if spec.tracking is not None else None
    if options is None or int(os.environ.get("RANK", "0")) != 0:  # one rank reports for all
        return None
    if not settings.mlflow_tracking_uri:
        report(
            "MLflow tracking skipped: this worker has no tracking server (DISTILL_MLFLOW_TRACKING_URI); "
            "the job goes on without it",
            {"warning": "no tracking server"},
        )
        return None
    try:
        tenant_id, stored, earlier_run_id = _stored_job(settings.database_url, job_id)
    except Exception:  # noqa: BLE001 - the tags and params then come from the spec this worker holds
        tenant_id, stored, earlier_run_id = "", None, None
    # The spec as the user gave it (file ids, not this worker's paths), models named inside MODEL_ROOTS.
    stored = dict(stored or spec.model_dump(mode="json"))
    for field in ("teacher", "student"):
        if isinstance(stored.get(field), dict) and isinstance(stored[field].get("model"), str):
            stored[field] = {
                **stored[field],
                "model": model_name(stored[field]["model"], settings.model_roots),
            }
    return MlflowTracker(
        tracking_uri=settings.mlflow_tracking_uri,
        options=options,
        job_id=job_id,
        tenant_id=tenant_id,
        params=run_params(stored),
        teacher=stored["teacher"]["model"],
        loss=spec.loss.name,
        job_dir=job_dir,
        report=report,
        earlier_run_id=earlier_run_id,
    )


def _stored_job(database_url: str, job_id: str) -> tuple[str, dict[str, Any] | None, str | None]:
    """The job's tenant, its stored spec, and the MLflow run an earlier attempt opened (from its event)."""
    with get_sessionmaker(database_url)() as session:
        row = session.execute(select(Job.tenant_id, Job.spec).where(Job.id == job_id)).one()
        events = session.scalars(
            select(JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.kind == EVENT_KIND)
            .order_by(JobEvent.id.desc())
        )
        run_id = next((d["mlflow_run_id"] for d in events if d and d.get("mlflow_run_id")), None)
    return row.tenant_id, row.spec, run_id


def model_name(model: str, roots: list[Path]) -> str:
    """A model as the tenant knows it: its path inside a model root (`tiny-teacher`), a hub id as it is,
    any other path cut to its last part."""
    for root in roots:
        try:
            return Path(model).relative_to(root).as_posix()
        except ValueError:
            continue
    return without_server_paths(model)


def run_params(spec: dict[str, Any]) -> dict[str, str]:
    """The spec as flat MLflow params (`loss.alpha` → "0.5"), without server paths; not `tracking` itself."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
            return
        text = json.dumps(value) if isinstance(value, list) else str(value)
        params[prefix] = without_server_paths(text)[:MAX_PARAM_CHARS]

    walk("", {key: value for key, value in spec.items() if key != "tracking"})
    return params


class MlflowTracker(TrainerCallbacks):
    """Mirrors one attempt of a job into its MLflow run. Metrics are buffered and sent with `log_batch`
    at most every `flush_interval_s`, and at the end; every MLflow call is guarded (see the module note)."""

    def __init__(
        self,
        *,
        tracking_uri: str,
        options: MlflowSpec,
        job_id: str,
        tenant_id: str,
        params: dict[str, str],
        teacher: str,
        loss: str,
        job_dir: Path,
        report: Report,
        earlier_run_id: str | None = None,
        flush_interval_s: float = 5.0,
    ) -> None:
        self._uri = tracking_uri
        self._options = options
        self._job_id = job_id
        self._params = params
        self._tags = {
            "distill.job_id": job_id,
            "distill.tenant": tenant_id,
            "distill.teacher": teacher,
            "distill.loss": loss,
        }
        self._run_file = Path(job_dir) / RUN_FILE
        self._report = report
        self._earlier_run_id = earlier_run_id
        self._flush_interval_s = flush_interval_s
        self._client: Any = None
        self._state: dict[str, Any] = {}  # what the run file holds: run_id, logged, model_id, registered
        self._replayed: dict[str, int] = {}  # metric → last step an earlier attempt logged
        self._pending: list[tuple[str, float, int, int]] = []  # (name, value, timestamp ms, step)
        self._last_flush = time.monotonic()
        self.active = True

    @property
    def run_id(self) -> str | None:
        return self._state.get("run_id")

    # ----------------------------------------------------------------------------- trainer interface
    def on_start(self, *, total_steps: int, start_step: int) -> None:
        self._guard(self._open)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._buffer(step, metrics)
        if time.monotonic() - self._last_flush >= self._flush_interval_s:
            self._guard(self._flush)

    def on_eval(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        self._buffer(step, metrics)
        self._guard(self._flush)
        if samples:
            self._guard(lambda: self._client.log_dict(self.run_id, samples, f"eval/samples-{step:08d}.json"))

    # ---------------------------------------------------------------------------------------- the end
    def finish(self, *, student_dir: Path | None) -> None:
        """Training ended: with `student_dir`, log and register the student and close the run FINISHED;
        without (a stop), close it KILLED (a resume opens it again)."""
        self._guard(self._flush)
        if student_dir is None:
            self._guard(lambda: self._client.set_terminated(self.run_id, "KILLED"))
            return
        self._guard(lambda: self._log_student(student_dir))
        if self._options.register_as is not None:
            self._guard(lambda: self._register(self._options.register_as))
        self._guard(lambda: self._client.set_terminated(self.run_id, "FINISHED"))

    def fail(self) -> None:
        """Training failed: send what is buffered and close the run FAILED."""
        self._guard(self._flush)
        self._guard(lambda: self._client.set_terminated(self.run_id, "FAILED"))

    # ----------------------------------------------------------------------------------------- MLflow
    def _open(self) -> None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self._client = client = MlflowClient(tracking_uri=self._uri)
        self._state = _read_json(self._run_file)
        if self.run_id is None and self._earlier_run_id is not None:
            # The job directory is new here (object storage: another machine ran the earlier attempt); the
            # run itself says which steps it holds.
            self._state = {
                "run_id": self._earlier_run_id,
                "logged": _logged_steps(client, self._earlier_run_id),
            }
            self._save_state()
        experiment = self._options.experiment
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
            self._replayed = dict(self._state.get("logged") or {})
            message = f"MLflow: resumed run {self.run_id} in experiment {experiment!r}"
        else:
            found = client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found is not None else _create_experiment(client, experiment)
            )
            run = client.create_run(experiment_id, run_name=self._options.run_name, tags=self._tags)
            self._state = {"run_id": run.info.run_id, "experiment_id": experiment_id, "logged": {}}
            self._save_state()
            message = f"MLflow: logging to run {self.run_id} in experiment {experiment!r}"
        params = [Param(key, value) for key, value in self._params.items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            # Logging a param again with the same value is allowed, so a resumed attempt may repeat them.
            client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])
        client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in self._tags.items()])
        self._report(message, {"mlflow_run_id": self.run_id, "experiment": experiment})

    def _buffer(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        now_ms = int(time.time() * 1000)
        for name, value in metrics.items():
            if _finite(value) and step > self._replayed.get(name, -1):
                self._pending.append((name, float(value), now_ms, step))

    def _flush(self) -> None:
        from mlflow.entities import Metric

        self._last_flush = time.monotonic()
        pending, self._pending = self._pending, []
        if not pending:
            return
        metrics = [Metric(name, value, timestamp, step) for name, value, timestamp, step in pending]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
        logged = self._state.setdefault("logged", {})
        for name, _, _, step in pending:
            logged[name] = max(step, logged.get(name, -1))
        self._save_state()

    def _log_student(self, student_dir: Path) -> None:
        """The student as an MLflow `transformers` model (a text-generation pipeline), linked to the run."""
        if self._state.get("model_id") is None:
            import mlflow
            import mlflow.transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer

            mlflow.set_tracking_uri(self._uri)
            mlflow.start_run(run_id=self.run_id)
            try:
                model = AutoModelForCausalLM.from_pretrained(student_dir, dtype="auto")
                tokenizer = AutoTokenizer.from_pretrained(student_dir)
                # MLflow records the model's name_or_path: not this worker's folder. Not a valid hub id
                # either (two slashes), so MLflow looks for no model card or license online.
                model.name_or_path = model.config._name_or_path = f"distillery/{self._job_id}/student"
                info = mlflow.transformers.log_model(
                    {"model": model, "tokenizer": tokenizer},
                    name="student",
                    task="text-generation",
                    pip_requirements=_pip_requirements(),
                    tags={"distill.job_id": self._job_id},
                )
            finally:
                mlflow.end_run()  # FINISHED: the training succeeded, whatever became of the model
            self._state |= {"model_id": info.model_id, "model_uri": info.model_uri}
            self._save_state()
        self._report(
            f"MLflow: logged the student as model {self._state['model_uri']}",
            {"mlflow_run_id": self.run_id, "model_uri": self._state["model_uri"]},
        )

    def _register(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        registered = self._state.get("registered")
        if registered is None:  # not already by an attempt that died before the job's end
            client = self._client
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(
                name,
                source=self._state["model_uri"],
                run_id=self.run_id,
                model_id=self._state["model_id"],
                tags={"distill.job_id": self._job_id},
                await_creation_for=60,
            )
            registered = self._state["registered"] = {"name": name, "version": int(version.version)}
            self._save_state()
            client.set_tag(self.run_id, "distill.registered_as", f"{name}/{version.version}")
        name, version = registered["name"], registered["version"]
        self._report(
            f"registered as {name} version {version}",
            {"mlflow_run_id": self.run_id, "registered_model": name, "version": version},
        )

    # -------------------------------------------------------------------------------------- failures
    def _guard(self, call: Callable[[], Any]) -> None:
        """Run one MLflow step; the first failure ends tracking for this attempt with one warning event."""
        if not self.active:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - whatever MLflow raises, the job goes on
            self.active = False
            self._pending = []
            reason = self._reason(exc)
            self._report(
                f"MLflow tracking stopped: {reason}; the job goes on without it",
                {"warning": reason, "mlflow_run_id": self.run_id},
            )

    def _reason(self, exc: Exception) -> str:
        """What went wrong, for the job's tenant: no stack trace, no server URL or path."""
        if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "mlflow":
            return "mlflow is not installed on this worker (pip install 'distillery[mlflow]')"
        text = str(exc)
        lowered = text.lower()
        if "timed out" in lowered or "timeout" in lowered:
            return "the tracking server did not answer in time"
        if "connection" in lowered or "max retries exceeded" in lowered:
            return "the tracking server is unreachable"
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        first = without_server_paths(first.replace(self._uri, "the tracking server"))
        code = getattr(exc, "error_code", None)
        return (f"{code}: {first}" if code and code not in first else first)[:300]

    def _save_state(self) -> None:
        tmp = self._run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state), encoding="utf-8")
        os.replace(tmp, self._run_file)


def _create_experiment(client: Any, name: str) -> str:
    """Create experiment `name`, or return its id when another job created it first."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _pip_requirements() -> list[str]:
    """What loading the student needs, pinned as installed here. Given, so that MLflow does not load the
    model again in a subprocess to infer them (nor ask for torchvision, as its defaults for torch do)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in ("transformers", "torch", "tokenizers", "safetensors"):
        try:
            pinned.append(f"{package}=={version(package).split('+')[0]}")  # no local label (+cpu)
        except PackageNotFoundError:
            continue
    return pinned


def _logged_steps(client: Any, run_id: str) -> dict[str, int]:
    """The last step of each metric `run_id` holds."""
    run = client.get_run(run_id)
    return {
        name: max((point.step for point in client.get_metric_history(run_id, name)), default=-1)
        for name in run.data.metrics
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
