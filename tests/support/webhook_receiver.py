"""A real HTTP endpoint for webhook tests: `http.server` on 127.0.0.1 in a thread, which verifies every
request's Standard Webhooks signature with the `standardwebhooks` library (not with our own code)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int
    verified: bool
    error: str | None
    at: float = field(default_factory=time.monotonic)

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """Answers each POST with the next of `statuses` (then 200) and records it, with whether its signature
    verifies against `secret` (set once the webhook exists)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.secret: str | None = None
        self.statuses = list(statuses or [])
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {key.lower(): value for key, value in self.headers.items()}
                receiver._record(self, headers, body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/distill"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _record(self, handler: BaseHTTPRequestHandler, headers: dict[str, str], body: bytes) -> None:
        verified, error = False, None
        try:
            assert self.secret is not None, "a delivery came before the test knew the secret"
            StandardWebhook(self.secret).verify(body, headers)
            verified = True
        except (WebhookVerificationError, AssertionError) as exc:
            error = str(exc)
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 200
            self.received.append(Received(headers, body, status, verified, error))
        handler.send_response(status)
        handler.send_header("content-length", "0")
        handler.end_headers()

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
