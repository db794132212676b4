"""Replicas on one store: each daemon's heartbeat, and what follows from how many are up.

Several ``syncd run`` processes may share one PostgreSQL database. Leases keep
them from sending the same delivery twice; two more things must be decided
together, and this module decides them from a heartbeat row per replica:

* A CRM's rate limit belongs to the account, not to a process. Each replica
  paces at its share of it: 1/n of the limit while n replicas are up.
* A helpdesk is polled by one replica only, the longest running, so its API
  limit (Zendesk: 10 export requests a minute) is not spent n times over.

A replica writes its row every heartbeat and removes it when it stops. A row
not refreshed for :data:`MISSED_BEATS` heartbeats belongs to a replica that
died; it no longer counts, and is deleted after :data:`FORGET_AFTER_SECONDS`.
On SQLite only one daemon can run (it holds the file's lock), so the census
is always one.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from sqlalchemy import Connection, delete, select, update

from syncd.store import Store
from syncd.store.models import replicas

#: Heartbeats a replica may miss before the others stop counting it.
MISSED_BEATS = 3
#: How long the row of a replica that died stays visible in the monitor.
FORGET_AFTER_SECONDS = 3600.0


def _version() -> str:
    try:
        return version("syncd")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@dataclass(frozen=True)
class Replica:
    id: str
    host: str
    pid: int
    version: str
    started_at: float
    seen_at: float
    live: bool


@dataclass(frozen=True)
class Census:
    """The replicas as one heartbeat saw them, and this replica's part."""

    me: str
    #: Every replica with a row, live ones first, each group longest running first.
    replicas: tuple[Replica, ...]

    @property
    def live(self) -> tuple[Replica, ...]:
        return tuple(r for r in self.replicas if r.live)

    @property
    def count(self) -> int:
        return max(1, len(self.live))

    @property
    def share(self) -> float:
        """This replica's part of each CRM's rate limit."""
        return 1.0 / self.count

    @property
    def leader(self) -> bool:
        """True on the replica that polls the helpdesks (and when no census is taken yet)."""
        live = self.live
        return not live or live[0].id == self.me


class Replicas:
    """This process's heartbeat row, and the census it reads back."""

    def __init__(
        self, store: Store, heartbeat: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.heartbeat = heartbeat
        self.clock = clock
        self.id = uuid.uuid4().hex[:16]
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.started_at = clock()
        self.census = Census(self.id, ())

    async def beat(self) -> Census:
        """Say this replica is up, and count the others."""
        now = self.clock()
        self.census = await self.store.writer.run(lambda conn: self._beat(conn, now))
        return self.census

    def _beat(self, conn: Connection, now: float) -> Census:
        mine = update(replicas).where(replicas.c.id == self.id).values(seen_at=now)
        if conn.execute(mine).rowcount == 0:
            conn.execute(
                replicas.insert().values(
                    id=self.id,
                    host=self.host,
                    pid=self.pid,
                    version=_version()[:32],
                    started_at=self.started_at,
                    seen_at=now,
                )
            )
        conn.execute(delete(replicas).where(replicas.c.seen_at < now - FORGET_AFTER_SECONDS))
        return census(conn, self.id, now, self.heartbeat)

    async def leave(self) -> None:
        """Remove this replica's row, so the others take over its share at once."""
        await self.store.writer.run(
            lambda conn: conn.execute(delete(replicas).where(replicas.c.id == self.id))
        )


def seen(conn: Connection, heartbeat: float) -> tuple[Replica, ...]:
    """Every replica with a row, as the monitor shows them (live ones first)."""
    return census(conn, "", time.time(), heartbeat).replicas


def census(conn: Connection, me: str, now: float, heartbeat: float) -> Census:
    """The replicas with a row; those seen within :data:`MISSED_BEATS` heartbeats are live."""
    rows = conn.execute(select(replicas).order_by(replicas.c.started_at, replicas.c.id)).all()
    horizon = now - MISSED_BEATS * heartbeat
    found = [
        Replica(
            id=r.id,
            host=r.host,
            pid=int(r.pid),
            version=r.version,
            started_at=float(r.started_at),
            seen_at=float(r.seen_at),
            live=r.id == me or float(r.seen_at) >= horizon,
        )
        for r in rows
    ]
    return Census(me, tuple(sorted(found, key=lambda r: not r.live)))
