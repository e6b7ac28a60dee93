"""The dashboard: a static single-page app served under `/ui`, talking to the same `/v1` API with the key
the user pastes (kept in the browser's session storage).

Everything it needs is in `static/` (uPlot vendored under `static/vendor/`): nothing is built or fetched at
run time. Pages are hash-routed (`/ui#/jobs`, `/ui#/jobs/{id}`, `/ui#/compare`, `/ui#/new`), so the server
only ever serves `index.html` and the assets.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# Scripts and styles only from the dashboard's own files (no inline code); the API is same-origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at `/ui` (and `/ui/`) with its assets under `/ui/static/`."""

    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)

    for path in ("/ui", "/ui/"):
        app.add_api_route(path, index, methods=["GET"], include_in_schema=False, response_class=FileResponse)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
