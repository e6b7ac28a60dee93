"""Logging: the request id of the current request (a context variable every log record picks up) and
the two output formats, `text` for a terminal and `json` (one object per line) for a log pipeline.

`configure_logging` is what a process calls once at start-up; the API's app factory calls it when
`DISTILL_LOG_FORMAT=json`, which also routes uvicorn's own loggers through the JSON formatter.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, Any

# Set by the API's request-id middleware for the duration of a request; None elsewhere.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's access logger repeats what api.middleware's `distill.access` records (without the request id).
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def current_request_id() -> str | None:
    """The id of the request being handled, or None outside a request."""
    return request_id.get()


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record (a handler filter, so records of every logger get it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, the `extra=` fields, and the
    traceback as `exc_info` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with ` [request_id]` after the logger name inside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return line.replace(f" {record.name}: ", f" {record.name} [{rid}]: ", 1) if rid else line


def make_handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the request-id filter and the formatter for `log_format`."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler._distill = True  # type: ignore[attr-defined]  (marks the handler this module installed)
    return handler


def configure_logging(log_format: str = "text", level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send every logger's records, uvicorn's included, to one handler on the root logger.

    Idempotent: a second call replaces the handler the first one installed (and leaves other handlers,
    such as a test runner's, alone). uvicorn's access log is switched off: the API writes its own, with
    the request id and the duration (`distill.access`).
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_distill", False)]:
        root.removeHandler(handler)
    root.addHandler(make_handler(log_format, stream))
    root.setLevel(level.upper())
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
