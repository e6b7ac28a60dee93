"""Infrastructure settings: one object, read from `DISTILL_*` environment variables (and `.env`).

Job hyperparameters never live here: they are a `JobSpec` stored with each job. The defaults are the
embedded set-up (SQLite database, SQLite-backed Celery broker, artifacts under ./.distill) so that
`distill serve` needs no Redis or PostgreSQL; production sets DATABASE_URL and BROKER_URL.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_HOME = Path(".distill")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    home: Path = Field(default=DEFAULT_HOME, description="Where embedded defaults keep their files.")
    database_url: str = Field(default="", description="SQLAlchemy URL; default sqlite under `home`.")
    broker_url: str = Field(default="", description="Celery broker; default SQLAlchemy transport on SQLite.")
    storage_dir: Path | None = Field(
        default=None,
        description="Local artifacts: the store itself, or with an s3:// storage_url this machine's scratch "
        "copy; default `home`/artifacts (`home`/scratch with s3://).",
    )
    # Object storage (core/storage/s3.py): AWS S3, MinIO, Ceph, R2... Credentials: these two, else the
    # standard AWS variables and files (AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles).
    storage_url: str = Field(
        default="", description="s3://bucket/prefix, or a local directory (default: storage_dir)."
    )
    s3_endpoint_url: str = Field(default="", description="S3 API endpoint (MinIO, Ceph, R2); empty = AWS.")
    s3_region: str = Field(default="", description="Region of the bucket; empty = the AWS default chain.")
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_multipart_chunk_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        description="Part size of multipart uploads and ranged downloads: bounds memory per transfer thread.",
    )
    s3_max_concurrency: int = Field(default=4, ge=1, le=64, description="Threads per transfer.")
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("models")],
        description="Local directories job specs may load models from (comma-separated in the env).",
    )
    allow_hub_models: bool = Field(default=False, description="Allow hub ids (needs network on workers).")

    # Auth: keys are hashed at rest. `bootstrap_api_key` (if set) is created for tenant `default` at
    # start-up, which is how docker-compose gets a first key; `distill keys create` makes more.
    bootstrap_api_key: str | None = None

    # Keys, limits and the HTTP surface (api/middleware.py, api/ratelimit.py).
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="Requests per API key per minute (a window from its first); 0 = off."
    )
    rate_limit_redis_url: str = Field(
        default="",
        description="Redis for counts shared by API processes; default the broker when it is redis://, "
        "else in-process counts. An unreachable Redis falls back to in-process counts.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins browsers may call the API from (comma-separated, `*` for any); empty = no CORS.",
    )
    docs_enabled: bool | None = Field(
        default=None, description="Serve /docs, /redoc and /openapi.json; default on except in production."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="`json`: one JSON object per log line, with the request id."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Prometheus (api/metrics.py, worker/metrics.py).
    metrics_enabled: bool = Field(default=True, description="Serve GET /metrics (Prometheus text format).")
    metrics_token: str | None = Field(
        default=None, description="When set, GET /metrics requires 'Authorization: Bearer <token>'."
    )
    worker_metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of a worker's own /metrics (job durations); 0 = off."
    )

    max_upload_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    stale_after_s: float = Field(default=60.0, gt=0, description="No heartbeat for this long → re-queue.")
    reaper_interval_s: float = Field(default=10.0, gt=0)
    requeue_after_s: float = Field(
        default=300.0,
        gt=0,
        description="Queued this long with its message gone from the broker → sent again.",
    )
    max_attempts: int = Field(default=3, ge=1)
    cancel_grace_s: float = Field(default=30.0, ge=0, description="Stop request → terminate after this.")
    task_queue: str = Field(default="distill", description="The default job queue (jobs naming no queue).")
    # Routing (core/queue.py): a job's `resources.queue` picks one of `queues`; workers consume `worker_queues`.
    queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Device classes jobs may name as resources.queue (comma-separated); empty = only the "
        "default queue.",
    )
    worker_queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Queues `distill worker` consumes (comma-separated); default: the default queue.",
    )
    worker_devices: int | None = Field(
        default=None,
        ge=0,
        description="Devices this worker has; default: CUDA_VISIBLE_DEVICES' count when set, else no limit.",
    )

    # Webhooks (core/webhooks): deliveries go out from their own queue, so they never wait for a training job.
    webhook_queue: str = Field(default="distill-webhooks", description="Celery queue of webhook deliveries.")
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names, addresses or CIDRs webhook URLs may point at although they are private, "
        "loopback or link-local (comma-separated); public addresses are always allowed.",
    )
    webhook_retry_base_s: float = Field(
        default=5.0,
        gt=0,
        description="First retry delay; later ones grow from it (about a day in all at 5 s).",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of one delivery attempt.")
    webhook_dispatch_interval_s: float = Field(
        default=1.0, gt=0, description="How often the reaper sends due webhook deliveries to their queue."
    )
    trainer_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads of a training process; 0 = PyTorch's default (`distill serve`: all cores but one).",
    )
    trainer_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of training (workers and their trainers): the API beside it stays fast; 0 = off.",
    )
    # MLflow (worker/tracking.py): the one tracking server jobs asking for `tracking.mlflow` report to.
    mlflow_tracking_uri: str = Field(
        default="",
        description="MLflow tracking server (http://host:5000); empty = jobs cannot ask for MLflow tracking.",
    )

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @field_validator("queues", "worker_queues", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @field_validator("webhook_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in (p.strip().rstrip("/") for p in value.split(",")) if part]
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        home = self.home.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'distill.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{home / 'broker.db'}"
        if self.storage_url.startswith("s3://") and not self.storage_url[5:].split("/")[0]:
            raise ValueError("DISTILL_STORAGE_URL: s3://bucket/prefix needs a bucket name")
        if "://" in self.storage_url and not self.storage_url.startswith(("s3://", "file://")):
            raise ValueError("DISTILL_STORAGE_URL is s3://bucket/prefix or a local directory")
        if self.storage_url and not self.storage_url.startswith("s3://"):
            # A local directory given as the storage URL (a path or file:///path).
            self.storage_dir = Path(self.storage_url.removeprefix("file://")).expanduser()
            self.storage_url = ""
        if self.storage_dir is None:
            self.storage_dir = home / ("scratch" if self.storage_url else "artifacts")
        self.model_roots = [p.expanduser().resolve() for p in self.model_roots]
        if self.docs_enabled is None:
            self.docs_enabled = self.environment != "production"
        if not self.rate_limit_redis_url and self.broker_url.startswith(("redis://", "rediss://")):
            self.rate_limit_redis_url = self.broker_url
        if self.environment == "production" and self.bootstrap_api_key in {"changeme", "dev", ""}:
            raise ValueError("DISTILL_BOOTSTRAP_API_KEY is an unsafe default; set a real secret")
        return self

    @property
    def artifacts(self) -> Path:
        assert self.storage_dir is not None
        return self.storage_dir


@lru_cache
def get_settings() -> Settings:
    return Settings()
