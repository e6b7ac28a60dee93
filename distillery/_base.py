"""What the sync and async clients share: configuration, retries, error parsing, SSE parsing, spec
preparation and download verification. Nothing here does I/O on the network."""

from __future__ import annotations

import json
import os
import random
import tarfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from distillery._errors import DistilleryError, DownloadVerificationError, error_from_response
from distillery._models import Event

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Spec fields that name data: a local path there is uploaded first and replaced by the new file's id.
DATA_FIELDS = {"train": "train", "eval": "eval"}


@dataclass
class Options:
    base_url: str
    api_key: str
    timeout: float = 60.0
    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 20.0
    headers: dict[str, str] = field(default_factory=dict)


def resolve_options(
    base_url: str | None, api_key: str | None, *, timeout: float, max_retries: int
) -> Options:
    """Options from the arguments, else `DISTILL_API_URL` / `DISTILL_API_KEY`."""
    key = api_key or os.environ.get("DISTILL_API_KEY")
    if not key:
        raise DistilleryError("no API key: pass api_key=... or set DISTILL_API_KEY")
    url = (base_url or os.environ.get("DISTILL_API_URL") or DEFAULT_BASE_URL).rstrip("/")
    return Options(base_url=url, api_key=key, timeout=timeout, max_retries=max(0, max_retries))


def client_headers(options: Options) -> dict[str, str]:
    from distillery import __version__

    return {
        "Authorization": f"Bearer {options.api_key}",
        "User-Agent": f"distillery-python/{__version__}",
        **options.headers,
    }


def request_headers(
    method: str, idempotency_key: str | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """Per-request headers; every POST carries an Idempotency-Key, the same one on each retry."""
    headers = dict(extra or {})
    if method.upper() == "POST":
        headers.setdefault("Idempotency-Key", idempotency_key or f"sdk-{uuid.uuid4().hex}")
    return headers


def retry_delay(options: Options, attempt: int, response: httpx.Response | None) -> float:
    """Seconds before retry number `attempt` (0-based): the server's Retry-After if it gave one, else
    exponential backoff with jitter (between half and all of base·2^attempt, capped)."""
    if response is not None:
        advice = response.headers.get("retry-after")
        if advice is not None:
            try:
                return min(max(float(advice), 0.0), options.backoff_cap_s)
            except ValueError:
                pass
    ceiling = min(options.backoff_cap_s, options.backoff_base_s * (2**attempt))
    return random.uniform(ceiling / 2, ceiling)


def should_retry(response: httpx.Response) -> bool:
    return response.status_code in RETRY_STATUSES


def raise_for_status(response: httpx.Response) -> None:
    """Raise the typed error of an error response (its body must have been read)."""
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise error_from_response(response.status_code, body, {k.lower(): v for k, v in response.headers.items()})


def clean_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Query parameters without Nones; booleans as the API spells them."""
    cleaned: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        cleaned[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return cleaned


def metadata_params(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """`metadata={"team": "nlp"}` → `metadata[team]=nlp`, the list filter's query form."""
    return {f"metadata[{key}]": value for key, value in (metadata or {}).items()}


# ------------------------------------------------------------------------------------------------- specs
def load_spec(spec: Any) -> tuple[dict[str, Any], Path | None]:
    """A spec as a plain dict, and the folder relative data paths are resolved against (for a YAML file).

    Accepts a mapping, a pydantic model (e.g. the server's `JobSpec`), or a path to a YAML/JSON file.
    """
    if isinstance(spec, BaseModel):
        return spec.model_dump(mode="json", exclude_none=True), None
    if isinstance(spec, Mapping):
        return json.loads(json.dumps(dict(spec))), None
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            try:
                import yaml
            except ImportError as exc:  # the SDK needs only httpx and pydantic
                raise DistilleryError(f"reading {path} needs PyYAML: pip install pyyaml") from exc
            raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise DistilleryError(f"{path}: expected a mapping at the top level")
        return raw, path.parent
    raise TypeError(f"a spec is a dict, a pydantic model or a path, not {type(spec).__name__}")


def local_data_files(spec: dict[str, Any], base: Path | None) -> dict[str, Path]:
    """The spec's data fields that name an existing local file (to upload), by field."""
    data = spec.get("data") or {}
    found: dict[str, Path] = {}
    for field_name in DATA_FIELDS:
        value = data.get(field_name)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        if path.is_file():
            found[field_name] = path
    return found


def with_file_ids(spec: dict[str, Any], file_ids: Mapping[str, str]) -> dict[str, Any]:
    if not file_ids:
        return spec
    return {**spec, "data": {**spec.get("data", {}), **file_ids}}


def load_sweep(
    spec: Any,
    grid: Mapping[str, Any] | None,
    *,
    metric: str | None,
    mode: str | None,
    max_parallel: int | None,
) -> tuple[dict[str, Any], Path | None]:
    """A sweep's request body (its spec's local data not yet uploaded) and the folder its relative data
    paths are resolved against. `spec` is a spec (see `load_spec`) or a sweep file: a YAML/JSON mapping
    with `spec` and `grid` (and optionally `metric`, `mode`, `max_parallel`); the arguments given here
    override the file's, and `grid` adds paths to its grid (replacing those it repeats)."""
    raw, base = load_spec(spec)
    from_file: dict[str, Any] = {}
    if "spec" in raw and "grid" in raw:
        from_file, raw = raw, raw["spec"]
        if not isinstance(raw, dict) or not isinstance(from_file["grid"], dict):
            raise DistilleryError("a sweep file's `spec` and `grid` must be mappings")
    merged_grid = {
        **from_file.get("grid", {}),
        **{path: list(values) for path, values in (grid or {}).items()},
    }
    if not merged_grid:
        raise DistilleryError("a sweep needs a grid: {'loss.alpha': [-1, 0.5], ...}")
    body = {
        "spec": raw,
        "grid": merged_grid,
        "metric": metric or from_file.get("metric") or "eval_kd_loss",
        "mode": mode or from_file.get("mode") or "min",
        "max_parallel": max_parallel if max_parallel is not None else from_file.get("max_parallel"),
    }
    return body, base


# --------------------------------------------------------------------------------------------------- SSE
class SSEDecoder:
    """Turns the lines of a text/event-stream into `Event`s (and remembers the last id for reconnects)."""

    def __init__(self, last_event_id: int | None = None) -> None:
        self.last_event_id = last_event_id
        self.retry_ms: int | None = None
        self._data: list[str] = []
        self._kind: str | None = None
        self._id: str | None = None

    def feed(self, line: str) -> Iterator[Event]:
        line = line.rstrip("\r")
        if not line:
            yield from self._dispatch()
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._kind = value
        elif name == "id":
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)

    def _dispatch(self) -> Iterator[Event]:
        data, kind, event_id = "\n".join(self._data), self._kind, self._id
        self._data, self._kind, self._id = [], None, None
        if not data:
            return
        payload = json.loads(data)
        if kind == "error":
            error = payload.get("error") or {}
            raise StreamError(str(error.get("code") or "stream_failed"), str(error.get("message") or ""))
        event = Event.model_validate(payload)
        if event_id is not None and event_id.isdigit():
            self.last_event_id = int(event_id)
        else:
            self.last_event_id = event.id
        yield event


class StreamError(DistilleryError):
    """The server ended an event stream with an `error` event (the client reconnects)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# ------------------------------------------------------------------------------------------- downloads
@dataclass
class DownloadState:
    """Where a download stands: the partial file, the bytes it holds and the expected size/hash."""

    partial: Path
    expected_sha256: str | None = None
    expected_size: int | None = None


def partial_path(dest: Path, name: str) -> Path:
    return dest / f".{name}.partial"


def verify_archive(path: Path, expected_sha256: str | None, expected_size: int | None) -> None:
    import hashlib

    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise DownloadVerificationError(f"{path.name}: {size} bytes, the server announced {expected_size}")
    if expected_sha256 is not None:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != expected_sha256:
            raise DownloadVerificationError(f"{path.name}: SHA-256 {digest.hexdigest()} != {expected_sha256}")


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a .tar.gz safely into `dest`; returns the top-level directory it held."""
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    top = {name.split("/", 1)[0] for name in names}
    return dest / top.pop() if len(top) == 1 else dest


def total_size(response: httpx.Response, offset: int) -> int | None:
    """The whole file's size from a 200's Content-Length or a 206's Content-Range."""
    content_range = response.headers.get("content-range")
    if response.status_code == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length")
    return (
        int(length) + (offset if response.status_code == 206 else 0) if length and length.isdigit() else None
    )
