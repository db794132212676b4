"""The durable store: engines, migrations and the group-commit writer."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.exc import OperationalError

from syncd.errors import StoreError
from syncd.store import models, sqlite
from syncd.store.writer import StoreWriter

T = TypeVar("T")

_MIGRATIONS = Path(__file__).parent / "migrations"
#: Serialises concurrent `syncd migrate` runs of several replicas on PostgreSQL.
_PG_MIGRATION_LOCK = 7_400_523_117


def _alembic_config(conn: Connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    script = ScriptDirectory(str(_MIGRATIONS))
    head = script.get_current_head()
    assert head is not None
    return head


class Store:
    """Owns the engines. Writes go through :attr:`writer`; reads use :meth:`read`."""

    def __init__(self, url: str, *, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._lock: sqlite.FileLock | None = None
        self._gate: sqlite.WriteGate | None = None
        if self.is_sqlite:
            path = sqlite.database_path(url)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._gate = sqlite.WriteGate(path)
            # Two: the writer thread holds one; write_sync (CLI tools, tests) takes the
            # other and waits for SQLite's write lock like any second writer.
            self.write_engine: Engine = create_engine(url, pool_size=2, max_overflow=0)
            sqlite.configure(self.write_engine, busy_timeout_ms=busy_timeout_ms, immediate=True)
            self.read_engine: Engine = create_engine(url, pool_size=4, max_overflow=4)
            sqlite.configure(self.read_engine, busy_timeout_ms=busy_timeout_ms, immediate=False)
        else:
            self.write_engine = create_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=True)
            self.read_engine = self.write_engine
        self.writer = StoreWriter(self.write_engine, gate=self._gate)

    # --- lifecycle -------------------------------------------------------------

    def lock_exclusive(self) -> bool:
        """Claim sole use of a SQLite file. Returns False where no such lock applies."""
        path = sqlite.database_path(self.url) if self.is_sqlite else None
        if path is None:
            return False
        self._lock = sqlite.FileLock(path)
        self._lock.acquire()
        return True

    def migrate(self) -> tuple[str | None, str]:
        """Bring the schema to the newest version; returns (before, after)."""
        try:
            with self.write_engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK}
                    )
                before = MigrationContext.configure(conn).get_current_revision()
                command.upgrade(_alembic_config(conn), "head")
                after = MigrationContext.configure(conn).get_current_revision()
                if (
                    conn.execute(
                        select(models.meta.c.value).where(models.meta.c.key == "install_id")
                    ).first()
                    is None
                ):
                    conn.execute(
                        models.meta.insert().values(key="install_id", value=secrets.token_hex(4))
                    )
        except OperationalError as exc:
            raise StoreError(f"cannot open the store at {self.safe_url}: {exc.orig}") from None
        assert after is not None
        return before, after

    def current_revision(self) -> str | None:
        try:
            with self.read_engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except OperationalError as exc:
            raise StoreError(f"cannot open the store at {self.safe_url}: {exc.orig}") from None

    @staticmethod
    def revision_of(conn: Connection) -> str | None:
        """The schema version on an open connection (``/readyz`` asks on every probe)."""
        return MigrationContext.configure(conn).get_current_revision()

    def check_schema(self) -> None:
        current = self.current_revision()
        if current != head_revision():
            raise StoreError(
                f"the store is at schema version {current or 'none'}, this syncd needs "
                f"{head_revision()}: run `syncd migrate`"
            )

    def install_id(self) -> str:
        with self.read_engine.connect() as conn:
            value = conn.execute(
                select(models.meta.c.value).where(models.meta.c.key == "install_id")
            ).scalar_one()
        return str(value)

    def start(self) -> None:
        self.writer.start()

    def close(self) -> None:
        self.writer.close()
        if self._gate is not None:
            self._gate.close()
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- access ----------------------------------------------------------------

    @property
    def safe_url(self) -> str:
        """The URL with any password removed, for messages."""
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run a read-only query off the event loop."""

        def _run() -> T:
            with self.read_engine.connect() as conn:
                return fn(conn)

        return await asyncio.to_thread(_run)

    def write_sync(self, fn: Callable[[Connection], T]) -> T:
        """A write outside the daemon (CLI tools, tests)."""
        with self.write_engine.begin() as conn:
            return fn(conn)
