"""Puts the monitor on the daemon's FastAPI app: sessions, error pages, the UI and the API."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

from syncd.config import Config
from syncd.monitor.actions import ResendJobs, write_audit
from syncd.monitor.auth import Auth, CsrfError, Forbidden, NotLoggedIn
from syncd.store import Store

log = structlog.get_logger("syncd.monitor")

HERE = Path(__file__).resolve().parent


class Runtime(Protocol):
    """What only the running daemon knows: breaker and throttle state per destination."""

    def destinations(self) -> dict[str, dict[str, Any]]: ...


class NoRuntime:
    def destinations(self) -> dict[str, dict[str, Any]]:
        return {}


class Reingester(Protocol):
    async def reingest(self, item_id: int) -> Any: ...


@dataclass
class Monitor:
    store: Store
    config: Config
    auth: Auth
    jobs: ResendJobs
    runtime: Runtime = field(default_factory=NoRuntime)
    intake: Reingester | None = None
    #: Called after anything is queued again, so the dispatcher looks at once.
    wake: Callable[[], None] = lambda: None

    async def deny(self, exc: Forbidden) -> None:
        log.warning("access_denied", user=exc.principal.name, action=exc.action)
        await self.store.writer.run(
            lambda c: write_audit(
                c,
                actor=exc.principal.actor,
                action=exc.action,
                outcome="denied",
                detail={"role": exc.principal.role},
            )
        )


def build_monitor(
    store: Store,
    config: Config,
    *,
    runtime: Runtime | None = None,
    intake: Reingester | None = None,
    wake: Callable[[], None] = lambda: None,
) -> Monitor:
    return Monitor(
        store=store,
        config=config,
        auth=Auth(config.monitor),
        jobs=ResendJobs(store, on_resent=wake),
        runtime=runtime or NoRuntime(),
        intake=intake,
        wake=wake,
    )


def install(app: FastAPI, monitor: Monitor) -> None:
    """Sessions, static files, the HTML pages and the JSON API, and how auth errors answer."""
    from syncd.monitor.api import api_router
    from syncd.monitor.ui import ui_router

    cfg = monitor.config.monitor
    secret = (
        cfg.session_secret.get_secret_value()
        if cfg.session_secret is not None
        else secrets.token_urlsafe(32)
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie="syncd_session",
        max_age=monitor.auth.session_seconds,
        same_site="lax",
        https_only=cfg.secure_cookies,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api_router(monitor))
    app.include_router(ui_router(monitor))

    def _wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/") or request.url.path == "/metrics"

    @app.exception_handler(NotLoggedIn)
    async def _not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        if _wants_json(request):
            return JSONResponse(
                {"detail": "log in first: a session cookie or 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        await monitor.deny(exc)
        if _wants_json(request):
            return JSONResponse({"detail": f"only an admin may {exc.action}"}, status_code=403)
        from syncd.monitor.ui import render_error

        return render_error(request, monitor, 403, "Only an admin may do this.")

    @app.exception_handler(CsrfError)
    async def _csrf(request: Request, exc: CsrfError) -> Response:
        log.warning("csrf_rejected", path=request.url.path)
        detail = "the form is stale or was not sent by this site: reload the page and try again"
        if _wants_json(request):
            return JSONResponse({"detail": detail}, status_code=403)
        from syncd.monitor.ui import render_error

        return render_error(request, monitor, 403, detail)


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def now() -> float:
    return time.time()
