"""Shared fixtures: real SQLite files, a real PostgreSQL database, a real HTTP receiver."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import SinkState, create_sink
from syncd.store import Store

PG_ADMIN_DSN = os.environ.get("SYNCD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def pg_available() -> bool:
    available = _pg_available()
    if not available and os.environ.get("CI"):
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_DSN}; .ci/run should have started it"
        )
    return available


@pytest.fixture
def pg_url(pg_available: bool) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    name = f"syncd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{os.fspath(tmp_path)}/syncd.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A migrated store on SQLite and on PostgreSQL, writer started."""
    s = Store(store_url)
    s.migrate()
    s.start()
    yield s
    s.close()


@pytest.fixture
def sink() -> Iterator[tuple[ServerThread, SinkState]]:
    """The bundled REST receiver on a real port."""
    app, state = create_sink()
    server = ServerThread(app).start()
    yield server, state
    server.stop()
