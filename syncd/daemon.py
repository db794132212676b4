"""``syncd run``: the HTTP server, the dispatcher and the scheduler in one asyncio process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import structlog
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI, Request
from fastapi.responses import Response

from syncd import logs
from syncd.config import Config, resolve_store_url
from syncd.connectors import registry
from syncd.connectors.base import Connector
from syncd.connectors.throttle import SlidingWindow, TokenBucket
from syncd.connectors.transport import AiohttpTransport
from syncd.intake import registry as source_registry
from syncd.intake.reconcile import PollRunner
from syncd.intake.routes import FrontDoor, hooks_app, intake_router
from syncd.intake.service import Intake, IntakeWriter
from syncd.intake.writer_process import WriterProcess
from syncd.monitor.actions import interrupt_stale_jobs
from syncd.monitor.app import Monitor, build_monitor, install
from syncd.monitor.metrics import CONTENT_TYPE, IntakeCounter, Metrics
from syncd.replicas import Census, Replicas
from syncd.retry import outbox
from syncd.retry.dispatcher import Dispatcher
from syncd.retry.policy import RetryPolicy
from syncd.store import Store
from syncd.store.credentials import StoreCredentials

log = structlog.get_logger("syncd.daemon")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def policy_from(config: Config) -> RetryPolicy:
    d = config.delivery
    return RetryPolicy(
        schedule=tuple(d.schedule_seconds),
        window=d.retry_window_seconds,
        jitter=d.jitter,
        max_step=d.max_step_seconds,
        overload_floor=d.rate_limited_floor_seconds,
    )


def build_intake(
    store: Store,
    config: Config,
    dispatcher: Dispatcher | None,
    writer: IntakeWriter | None = None,
) -> Intake:
    sources = {
        name: source_registry.build(name, src, default_region=config.intake.default_country)
        for name, src in config.sources.items()
    }
    destinations = {name: tuple(config.destinations_for(name)) for name in config.sources}
    return Intake(
        store,
        sources,
        destinations,
        on_stored=dispatcher.wake if dispatcher is not None else (lambda: None),
        writer=writer,
    )


def build_poll_runners(intake: Intake) -> list[PollRunner]:
    runners = []
    for name, source in intake.sources.items():
        poller = source.poller()
        if poller is not None:
            runners.append(PollRunner(intake, name, poller))
    return runners


class DaemonRuntime:
    """Breaker and throttle state, which live in the dispatcher and connectors, for the monitor."""

    def __init__(self, dispatcher: Dispatcher, connectors: dict[str, Connector]) -> None:
        self._dispatcher = dispatcher
        self._connectors = connectors

    def destinations(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, connector in self._connectors.items():
            info: dict[str, Any] = {"paused_until": self._dispatcher.breaker.paused_until(name)}
            bucket = getattr(connector, "throttle", None)
            if isinstance(bucket, TokenBucket | SlidingWindow):
                info["throttle_rate"] = bucket.rate
                info["throttle_available"] = round(bucket.available, 2)
            out[name] = info
        return out


def build_app(
    store: Store,
    config: Config,
    intake: Intake,
    *,
    monitor: Monitor | None = None,
    metrics: Metrics | None = None,
) -> FrontDoor:
    """Webhooks on a lean app of their own; the monitor, API and metrics on the web app."""
    hooks = intake_router(intake, max_body_bytes=config.server.max_body_bytes)
    app = FastAPI(
        title="syncd",
        version="0.1.0",
        description="Helpdesk to CRM sync: intake webhooks, monitoring and resend API.",
        docs_url="/api/docs",
        openapi_url="/api/v1/openapi.json",
    )
    app.include_router(hooks)
    monitor = monitor or build_monitor(store, config, intake=intake)
    metrics = metrics or Metrics()
    install(app, monitor)

    @app.get("/metrics", tags=["ops"], include_in_schema=True)
    async def prometheus(request: Request) -> Response:
        """Prometheus exposition: deliveries by state, backlog, latency, breaker, intake."""
        if not config.monitor.public_metrics:
            monitor.auth.require(request)
        body = await metrics.render(
            store,
            monitor.runtime.destinations(),
            heartbeat=config.delivery.replica_heartbeat_seconds,
        )
        return Response(body, media_type=CONTENT_TYPE)

    counted = IntakeCounter(
        hooks_app(hooks), counter=metrics.intake_requests, sources=config.sources
    )
    return FrontDoor(counted, app)


def build_connectors(
    config: Config, store: Store, transport: httpx.AsyncBaseTransport | None = None
) -> dict[str, Connector]:
    return {
        name: registry.build(
            name,
            dest,
            timeout=config.delivery.request_timeout_seconds,
            transport=transport or AiohttpTransport(limit=config.delivery.concurrency * 2),
            credentials=StoreCredentials(store, name),
        )
        for name, dest in config.destinations.items()
    }


#: Allocations between young collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Keep the cycle collector off the start-up objects, and run it less often.

    Why: once started, the daemon holds about 150,000 long-lived objects (SQLAlchemy,
    pydantic and FastAPI internals, the monitor's routes), and CPython's default
    thresholds walked all of them in a full collection every few seconds under load
    (about 55 ms each), plus a young collection every 700 allocations. That cost
    intake about 15 % of its throughput (bench/intake.py). Freezing moves what exists
    now out of the collector's sight; cycles made later are still collected.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


async def serve(config: Config, *, migrate: bool = True, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set). Returns the process exit code."""
    logs.redactor.add(config.secret_values())
    metrics = Metrics()
    writer_process: WriterProcess | None = None
    if config.store.intake_writer == "process":
        writer_process = WriterProcess(
            config, resolve_store_url(config), on_crash=metrics.intake_writer_crashes.inc
        )
        if threading.active_count() == 1:
            # Before anything starts a thread: the fork shares this process's pages.
            settle_garbage_collector()
            writer_process.prefork()
    store = Store(resolve_store_url(config), busy_timeout_ms=config.store.busy_timeout_ms)
    exclusive = store.lock_exclusive()
    if migrate:
        before, after = store.migrate()
        if before != after:
            log.info("store_migrated", from_version=before, to_version=after)
    store.check_schema()
    store.start()
    # The child starts (about a second of imports) while the rest is set up.
    writer_started = asyncio.create_task(writer_process.start()) if writer_process else None

    now = time.time()
    reclaimed = await store.writer.run(
        lambda conn: outbox.recover_leases(conn, now, all_leases=exclusive)
    )
    if reclaimed:
        log.warning("leases_reclaimed", count=reclaimed, reason="previous run stopped mid-delivery")

    interrupted = await store.writer.run(interrupt_stale_jobs)
    if interrupted:
        log.warning("resend_jobs_interrupted", count=interrupted, note="run them again")

    d = config.delivery
    connectors = build_connectors(config, store)
    replicas = Replicas(store, d.replica_heartbeat_seconds)
    share_with_replicas(await replicas.beat(), connectors)
    dispatcher = Dispatcher(
        store,
        connectors,
        policy_from(config),
        concurrency=d.concurrency,
        batch_size=d.batch_size,
        lease_seconds=d.lease_seconds,
        poll_interval=d.poll_interval_seconds,
        install_id=store.install_id(),
        mappings={name: config.mapping_for(name) for name in config.destinations},
        coalesce=d.coalesce,
        coalesce_max=d.coalesce_max,
        on_attempt=metrics.observe_attempt,
    )
    intake = build_intake(store, config, dispatcher, writer=writer_process)
    monitor = build_monitor(
        store,
        config,
        runtime=DaemonRuntime(dispatcher, connectors),
        intake=intake,
        wake=dispatcher.wake,
    )
    app = build_app(store, config, intake, monitor=monitor, metrics=metrics)
    server = _Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
    )

    scheduler = AsyncIOScheduler(timezone="UTC")
    _schedule_jobs(scheduler, store, config)

    async def heartbeat() -> None:
        before = replicas.census
        after = await replicas.beat()
        if after.count != before.count or after.leader != before.leader:
            share_with_replicas(after, connectors)

    scheduler.add_job(
        guarded("replica_heartbeat", heartbeat),
        "interval",
        seconds=d.replica_heartbeat_seconds,
        id="replica_heartbeat",
    )
    runners = build_poll_runners(intake)
    for runner in runners:

        async def poll(runner: PollRunner = runner) -> None:
            # One replica polls, so the helpdesk's API limit is not spent once per replica.
            if replicas.census.leader:
                await runner.run_once()

        scheduler.add_job(
            guarded(f"poll_{runner.source}", poll),
            "interval",
            seconds=runner.poller.interval,
            id=f"poll_{runner.source}",
            next_run_time=datetime.now(UTC) + timedelta(seconds=2),
            max_instances=1,
            coalesce=True,
        )

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if writer_started is not None:
        await writer_started
    settle_garbage_collector()
    server_task = asyncio.create_task(server.serve(), name="http")
    dispatcher_task = asyncio.create_task(dispatcher.run(), name="dispatcher")
    scheduler.start()
    log.info(
        "syncd_started",
        listen=f"http://{config.server.host}:{config.server.port}",
        store=store.safe_url,
        destinations=sorted(connectors),
        sources=sorted(config.sources),
        pollers=sorted(r.source for r in runners),
    )

    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait(
        {server_task, dispatcher_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
    )
    exit_code = 0
    for task in done:
        if task is not stop_task and task.exception() is not None:
            log.error("component_crashed", component=task.get_name(), error=str(task.exception()))
            exit_code = 1
    if server_task in done and not server.started:
        exit_code = 1

    log.info("syncd_stopping", grace_seconds=d.shutdown_grace_seconds)
    await monitor.jobs.stop()
    cut = await dispatcher.stop(d.shutdown_grace_seconds)
    if cut:
        log.warning(
            "deliveries_cut_off", count=cut, note="their leases are reclaimed on next start"
        )
    with contextlib.suppress(Exception):
        await dispatcher_task
    server.should_exit = True
    with contextlib.suppress(Exception):
        await server_task
    scheduler.shutdown(wait=False)
    with contextlib.suppress(Exception):
        await replicas.leave()
    for connector in connectors.values():
        with contextlib.suppress(Exception):
            await connector.aclose()
    for runner in runners:
        with contextlib.suppress(Exception):
            await runner.poller.aclose()
    if writer_process is not None:
        await writer_process.close()
    stop_task.cancel()
    store.close()
    log.info("syncd_stopped", exit_code=exit_code)
    return exit_code


def guarded(name: str, job: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """A periodic job whose failure is one readable log line; it runs again at its next turn.

    Left to APScheduler, a failing job logs its traceback at every run, which
    during a database outage buries everything else in the log.
    """

    async def run() -> None:
        try:
            await job()
        except Exception as exc:
            log.warning("job_failed", job=name, error=logs.redactor.clean(str(exc)))

    return run


def share_with_replicas(census: Census, connectors: dict[str, Connector]) -> None:
    """Pace each connector at this replica's part of its CRM's limit."""
    for connector in connectors.values():
        connector.set_share(census.share)
    log.info(
        "replicas_counted",
        replicas=census.count,
        share=round(census.share, 3),
        polls_helpdesks=census.leader,
    )


def _schedule_jobs(scheduler: AsyncIOScheduler, store: Store, config: Config) -> None:
    d = config.delivery

    async def recover() -> None:
        n = await store.writer.run(lambda conn: outbox.recover_leases(conn, time.time()))
        if n:
            log.warning("leases_reclaimed", count=n, reason="lease expired")

    async def expire() -> None:
        grace = max(3600.0, d.lease_seconds)
        n = await store.writer.run(
            lambda conn: outbox.expire_overdue(
                conn, time.time(), window=d.retry_window_seconds, grace=grace
            )
        )
        if n:
            log.warning(
                "deliveries_expired", count=n, reason="retry window closed while syncd was down"
            )

    async def purge() -> None:
        before = time.time() - d.retention_days * 86400
        n = await store.writer.run(lambda conn: outbox.purge_delivered(conn, before))
        if n:
            log.info("delivered_purged", count=n, older_than_days=d.retention_days)

    scheduler.add_job(
        guarded("lease_recovery", recover),
        "interval",
        seconds=d.lease_recovery_interval_seconds,
        id="lease_recovery",
    )
    scheduler.add_job(guarded("window_expiry", expire), "interval", seconds=60, id="window_expiry")
    scheduler.add_job(
        guarded("retention_purge", purge), "interval", seconds=3600, id="retention_purge"
    )
