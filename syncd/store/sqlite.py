"""Everything SQLite-specific lives here, and only here.

The rest of the store speaks portable SQLAlchemy so the same code runs on
PostgreSQL. SQLite needs: WAL (readers never block the writer), a busy
timeout, ``BEGIN IMMEDIATE`` for writers (so two writers queue on the busy
timeout instead of dead-locking on a lock upgrade), and a file lock so only
one daemon owns the file at a time.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

from syncd.errors import StoreLockedError


def configure(engine: Engine, *, busy_timeout_ms: int, immediate: bool) -> None:
    """Install the pragmas and transaction mode on every new connection."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        # FULL: a commit is on disk before intake answers 202, even on power loss.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def database_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    rest = url[len(prefix) :].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


class WriteGate:
    """A lock file that the daemon's writer and its intake writer process take around
    each write transaction.

    Why: SQLite's own busy handler, the only one Python's driver offers, polls by
    sleeping 1, 2, 5, 10 ... 100 ms. With two busy writers one of them kept sleeping
    past the moments the file was free, and webhooks waited up to 100 ms. A blocked
    ``flock`` is woken as soon as the lock is let go, and waits without the GIL.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".write-lock")
        self._fd: int | None = None

    def __enter__(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FileLock:
    """An exclusive advisory lock beside the database file.

    Holding it proves no other syncd is leasing from this file, so leases
    left by a killed predecessor can be reclaimed at once instead of waiting
    for them to run out.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"another syncd process is already using {self.path.with_suffix('')}; "
                "stop it first, or point store.url at another file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
