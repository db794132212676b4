"""Puts the monitor on the daemon's FastAPI app: sessions, error pages, the UI and the API."""

from __future__ import annotations

import asyncio
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
from syncd.monitor import queries
from syncd.monitor.actions import Reingester, ResendJobs, write_audit
from syncd.monitor.auth import Auth, CsrfError, Forbidden, NotLoggedIn
from syncd.monitor.queries import Overview
from syncd.store import Store

log = structlog.get_logger("syncd.monitor")

HERE = Path(__file__).resolve().parent


class Runtime(Protocol):
    """What only the running daemon knows: breaker and throttle state per destination."""

    def destinations(self) -> dict[str, dict[str, Any]]: ...


class NoRuntime:
    def destinations(self) -> dict[str, dict[str, Any]]:
        return {}


class OverviewCache:
    """The overview's counts, recomputed at most every ``ttl`` seconds.

    Counting a million deliveries takes SQLite ~0.1 s, and a wall screen or ten
    managers refreshing must not each pay it. A copy younger than ``ttl`` is served
    as is; an older one is served at once while one background read refreshes it
    (stale-while-revalidate); only a missing or very old copy makes the caller
    wait, and concurrent callers then share that one read. ``ttl = 0`` turns it off.
    The page always shows when its figures were taken.
    """

    def __init__(
        self,
        store: Store,
        ttl: float,
        max_stale: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._clock = clock
        self.ttl = ttl
        self.max_stale = max(max_stale, ttl)
        self._value: Overview | None = None
        self._taken = 0.0
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task[None] | None = None

    async def get(self, *, fresh: bool = False) -> Overview:
        """The figures; ``fresh`` counts now (and keeps the result for the next callers)."""
        if self.ttl <= 0:
            return await self._store.read(queries.overview)
        if fresh:
            async with self._lock:
                await self._reload_now()
            assert self._value is not None
            return self._value
        age = self._clock() - self._taken
        if self._value is not None and age < self.ttl:
            return self._value
        if self._value is not None and age < self.max_stale:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.create_task(self._reload())
            return self._value
        async with self._lock:
            if self._value is None or self._clock() - self._taken >= self.max_stale:
                await self._reload_now()
            assert self._value is not None
            return self._value

    async def wait_for_refresh(self) -> None:
        """Until a background refresh, if one runs, is done (tests)."""
        if self._refresh is not None:
            await self._refresh

    async def _reload(self) -> None:
        async with self._lock:
            await self._reload_now()

    async def _reload_now(self) -> None:
        started = self._clock()
        self._value = await self._store.read(queries.overview)
        self._taken = started


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
    overview: OverviewCache | None = None

    def __post_init__(self) -> None:
        if self.overview is None:
            self.overview = OverviewCache(self.store, self.config.monitor.overview_cache_seconds)

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
