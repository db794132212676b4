"""What an admin can change from the monitor or the CLI: resends, and the audit log of them.

Each action writes its audit entry in the same transaction as the change, so the
log cannot say something happened that did not (or miss something that did).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from sqlalchemy import Connection, update

from syncd.monitor.queries import (
    EventFilter,
    count_deliveries,
    delivery_ids_after,
    iter_delivery_ids,
    max_delivery_id,
)
from syncd.retry import outbox
from syncd.store import Store
from syncd.store.models import audit, resend_jobs

log = structlog.get_logger("syncd.monitor")

#: Deliveries resent per transaction: small enough that intake never waits long behind it.
CHUNK = 500


def write_audit(
    conn: Connection,
    *,
    actor: str,
    action: str,
    outcome: str = "ok",
    count: int | None = None,
    detail: dict[str, Any] | None = None,
    now: float | None = None,
) -> int:
    result = conn.execute(
        audit.insert().values(
            at=time.time() if now is None else now,
            actor=actor,
            action=action,
            outcome=outcome,
            count=count,
            detail=json.dumps(detail or {}, ensure_ascii=False, default=str),
        )
    )
    key = result.inserted_primary_key
    return int(key[0]) if key else 0


def resend_deliveries(
    conn: Connection, ids: Sequence[int], *, actor: str, detail: dict[str, Any]
) -> int:
    """Resend the given deliveries now, and say so in the audit log (one transaction)."""
    now = time.time()
    count = outbox.resend(conn, list(ids), now)
    write_audit(
        conn,
        actor=actor,
        action="resend",
        count=count,
        detail={**detail, "requested": len(ids)},
        now=now,
    )
    return count


def resend_by_filter_sync(store: Store, flt: EventFilter, *, actor: str) -> int:
    """Resend everything matching ``flt`` in chunks, from the CLI (the daemon may be down)."""
    with store.read_engine.connect() as conn:
        upto = max_delivery_id(conn)
        chunks = list(iter_delivery_ids(conn, flt, chunk=CHUNK, upto=upto))
    total = 0
    for ids in chunks:
        total += store.write_sync(lambda c, ids=ids: outbox.resend(c, ids, time.time()))  # type: ignore[misc]
    store.write_sync(
        lambda c: write_audit(
            c,
            actor=actor,
            action="resend_filter",
            count=total,
            detail={"filter": flt.describe(), "via": "cli"},
        )
    )
    return total


class Reingester(Protocol):
    """What the monitor needs of intake: re-ingest, and whether webhooks are taken."""

    async def reingest(self, item_id: int) -> Any: ...

    @property
    def accepting(self) -> bool: ...


async def reingest(store: Store, intake: Reingester | None, item_id: int, *, actor: str) -> str:
    """Parse a quarantined body again with the current config; audited either way."""
    from syncd.intake.service import Accepted

    if intake is None:
        return "re-ingest needs the running daemon"
    try:
        outcome = await intake.reingest(item_id)
    except (KeyError, ValueError) as exc:
        message, ok, count = str(exc), "error", 0
    else:
        if isinstance(outcome, Accepted):
            ids = outcome.event_ids
            message, ok, count = f"stored as event(s) {ids}", "ok", len(ids)
        else:
            message, ok, count = f"still unreadable: {outcome.reason}", "error", 0
    await store.writer.run(
        lambda c: write_audit(
            c,
            actor=actor,
            action="reingest",
            outcome=ok,
            count=count,
            detail={"quarantine_item": item_id, "result": message},
        )
    )
    return message


@dataclass(frozen=True)
class StartedJob:
    id: int
    total: int


class ResendJobs:
    """Runs resends by filter in the background; their progress lives in ``resend_jobs``.

    A job freezes its set at the highest delivery id when it starts, so a resend of
    "everything failed" does not chase deliveries that fail while it runs.
    """

    def __init__(self, store: Store, on_resent: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._on_resent = on_resent
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, flt: EventFilter, *, actor: str) -> StartedJob:
        def _create(conn: Connection) -> tuple[int, int, int]:
            upto = max_delivery_id(conn)
            total = count_deliveries(conn, flt)
            now = time.time()
            result = conn.execute(
                resend_jobs.insert().values(
                    created_at=now,
                    actor=actor,
                    filter=json.dumps(flt.describe(), default=str),
                    state="running",
                    total=total,
                    done=0,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            job_id = int(key[0])
            write_audit(
                conn,
                actor=actor,
                action="resend_filter",
                count=total,
                detail={"filter": flt.describe(), "job": job_id},
                now=now,
            )
            return job_id, total, upto

        job_id, total, upto = await self._store.writer.run(_create)
        task = asyncio.create_task(self._run(job_id, flt, upto), name=f"resend-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("resend_started", job=job_id, actor=actor, total=total, filter=flt.describe())
        return StartedJob(id=job_id, total=total)

    async def _run(self, job_id: int, flt: EventFilter, upto: int) -> None:
        done = 0
        last = 0
        try:
            while True:
                ids = await self._store.read(
                    lambda c, last=last: delivery_ids_after(  # type: ignore[misc]
                        c, flt, after=last, upto=upto, limit=CHUNK
                    )
                )
                if not ids:
                    break
                last = ids[-1]
                done += len(ids)

                def _apply(conn: Connection, ids: list[int] = ids, done: int = done) -> None:
                    outbox.resend(conn, ids, time.time())
                    conn.execute(
                        update(resend_jobs).where(resend_jobs.c.id == job_id).values(done=done)
                    )

                await self._store.writer.run(_apply)
                self._on_resent()
            await self._finish(job_id, "done", None)
            log.info("resend_finished", job=job_id, resent=done)
        except asyncio.CancelledError:
            await asyncio.shield(self._finish(job_id, "interrupted", "the daemon stopped"))
            raise
        except Exception as exc:
            await self._finish(job_id, "failed", str(exc))
            log.error("resend_failed", job=job_id, error=str(exc))

    async def _finish(self, job_id: int, state: str, error: str | None) -> None:
        await self._store.writer.run(
            lambda c: c.execute(
                update(resend_jobs)
                .where(resend_jobs.c.id == job_id)
                .values(state=state, error=error, finished_at=time.time())
            )
        )

    async def wait(self) -> None:
        """Until every running job is finished (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.wait()


def interrupt_stale_jobs(conn: Connection) -> int:
    """Jobs left ``running`` by a stopped daemon: mark them so nobody waits on them forever."""
    result = conn.execute(
        update(resend_jobs)
        .where(resend_jobs.c.state == "running")
        .values(state="interrupted", error="the daemon stopped", finished_at=time.time())
    )
    return int(result.rowcount or 0)
