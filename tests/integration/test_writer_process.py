"""The intake writer process: a real child, a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select

from syncd.config import Config, parse_config
from syncd.errors import AuthenticationFailed, StoreError, StoreUnavailable
from syncd.events import IncomingEvent
from syncd.intake.base import RawRequest
from syncd.intake.service import Accepted, Quarantined
from syncd.intake.writer_process import WriterProcess
from syncd.store import Store
from syncd.store.models import deliveries, events, quarantine

NOW = 1_700_000_000.0
SECRET = "writer-process-hook-secret"
CONFIG = parse_config(
    f"""
[sources.hd]
kind = "generic"
secret = "{SECRET}"

[destinations.crm]
kind = "rest"
base_url = "http://127.0.0.1:9"
""",
    "test.toml",
)


def writer_for(url: str, config: Config = CONFIG, **kw: object) -> WriterProcess:
    return WriterProcess(config, url, **kw)  # type: ignore[arg-type]


def webhook(body: bytes, secret: str = SECRET) -> RawRequest:
    return RawRequest(body=body, headers={"x-syncd-secret": secret}, received_at=NOW)


def ev(ticket: str, dedup: str | None = None, **kw: object) -> IncomingEvent:
    return IncomingEvent(
        source="hd",
        ticket_id=ticket,
        kind="ticket_created",
        payload={"ticket_id": ticket},
        dedup_key=dedup,
        destinations=("crm",),
        **kw,  # type: ignore[arg-type]
    )


def count(store: Store, table: object) -> int:
    with store.read_engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


@pytest.fixture
def migrated(store_url: str) -> Store:
    s = Store(store_url)
    s.migrate()
    return s


async def test_stores_what_it_is_sent_and_answers_each_request(migrated: Store) -> None:
    writer = writer_for(migrated.url)
    await writer.start()
    try:
        results = await asyncio.gather(
            *(writer.store([ev(f"T{i}", dedup=f"k{i}")], NOW) for i in range(60))
        )
        again = await writer.store([ev("T7", dedup="k7")], NOW)
    finally:
        await writer.close()
    ids = [r[0].event_id for r in results]
    assert len(set(ids)) == 60
    assert all(r[0].deliveries == 1 and not r[0].duplicate for r in results)
    with migrated.read_engine.connect() as conn:
        stored = dict(conn.execute(select(events.c.id, events.c.ticket_id)).all())
    assert {stored[i] for i in ids} == {f"T{i}" for i in range(60)}
    assert stored[ids[7]] == "T7"
    assert again[0].duplicate and again[0].event_id == ids[7]
    assert count(migrated, deliveries) == 60
    migrated.close()


async def test_webhooks_are_read_and_stored_or_refused_in_the_child(migrated: Store) -> None:
    writer = writer_for(migrated.url)
    await writer.start()
    try:
        good, wrong_secret, unreadable = await asyncio.gather(
            writer.receive("hd", webhook(b'{"ticket_id": 41, "status": "open"}')),
            writer.receive("hd", webhook(b'{"ticket_id": 42}', secret="nope")),
            writer.receive("hd", webhook(b"[not json")),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert isinstance(good, Accepted) and good.deliveries == 1 and good.duplicates == 0
    assert isinstance(wrong_secret, AuthenticationFailed) and wrong_secret.status_code == 401
    assert isinstance(unreadable, Quarantined) and "JSON" in unreadable.reason
    with migrated.read_engine.connect() as conn:
        assert conn.execute(select(events.c.ticket_id)).scalars().all() == ["41"]
        [held] = conn.execute(select(quarantine.c.id, quarantine.c.source)).all()
    assert tuple(held) == (unreadable.quarantine_id, "hd")
    migrated.close()


async def test_a_request_that_cannot_be_written_fails_alone(migrated: Store) -> None:
    writer = writer_for(migrated.url)
    await writer.start()
    try:
        # kind is NOT NULL in the store, so this one insert fails inside the child.
        bad = IncomingEvent(source="hd", ticket_id="T-bad", kind=None, payload={})  # type: ignore[arg-type]
        results = await asyncio.gather(
            writer.store([ev("T1")], NOW),
            writer.store([bad], NOW),
            writer.store([ev("T2")], NOW),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert isinstance(results[1], StoreError)
    assert "storing the webhook failed" in str(results[1])
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    assert count(migrated, events) == 2
    migrated.close()


async def test_a_child_that_dies_is_started_again(migrated: Store) -> None:
    writer = writer_for(migrated.url, restart_delays=(0.05,))
    await writer.start()
    try:
        await writer.store([ev("T1")], NOW)
        first = writer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with pytest.raises(StoreUnavailable) as refused:
            # Sent to a child that can no longer answer: the caller hears so (503).
            await writer.store([ev("T-during")], NOW)
        assert refused.value.status_code == 503
        # The next one waits for the new child instead of failing too.
        [stored] = await writer.store([ev("T2")], NOW)
        assert writer.pid not in (None, first)
        assert writer.restarts == 1
    finally:
        await writer.close()
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
    with migrated.read_engine.connect() as conn:
        assert (
            conn.execute(
                select(events.c.ticket_id).where(events.c.id == stored.event_id)
            ).scalar_one()
            == "T2"
        )
    migrated.close()


async def test_close_answers_everything_sent_before_it(migrated: Store) -> None:
    writer = writer_for(migrated.url)
    await writer.start()
    child = writer.pid
    assert child is not None
    pending = [asyncio.ensure_future(writer.store([ev(f"T{i}")], NOW)) for i in range(20)]
    await asyncio.sleep(0)  # the requests are queued; close comes right behind them
    await writer.close()
    results = await asyncio.gather(*pending)
    assert len({r[0].event_id for r in results}) == 20
    assert count(migrated, events) == 20
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
    migrated.close()


async def test_a_store_that_is_not_migrated_is_refused_with_the_reason(tmp_path: Path) -> None:
    writer = writer_for(f"sqlite:///{tmp_path}/empty.db")
    with pytest.raises(StoreError, match="run `syncd migrate`"):
        await writer.start()
    assert not writer.running


async def test_the_store_url_is_not_on_the_child_command_line(pg_url: str) -> None:
    secret = "writer-process-secret-pw"
    url = pg_url.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in url
    Store(url).migrate()
    writer = writer_for(url)
    await writer.start()
    try:
        assert writer.pid is not None
        cmdline = " ".join(psutil.Process(writer.pid).cmdline())
        assert "syncd.intake.writer_process" in cmdline
        assert secret not in cmdline and "127.0.0.1" not in cmdline
        [stored] = await writer.store([ev("T1")], NOW)
        assert stored.deliveries == 1
    finally:
        await writer.close()


def test_the_child_exits_when_the_daemon_is_killed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/syncd.db"
    Store(url).migrate()
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from syncd.config import parse_config
        from syncd.intake.writer_process import WriterProcess

        async def main():
            writer = WriterProcess(parse_config("", "t.toml"), {url!r})
            await writer.start()
            print(writer.pid, flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    daemon = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        child = psutil.Process(int(daemon.stdout.readline()))
        assert child.is_running()
        daemon.kill()
        daemon.wait(10)
        # Its stdin closes with the daemon, and it exits on its own.
        child.wait(10)  # raises psutil.TimeoutExpired if it lingers
    finally:
        daemon.kill()


async def test_readyz_says_so_while_the_intake_writer_is_down(migrated: Store) -> None:
    from fastapi.testclient import TestClient

    from syncd.daemon import build_app, build_intake

    writer = writer_for(migrated.url)
    intake = build_intake(migrated, CONFIG, None, writer=writer)
    client = TestClient(build_app(migrated, CONFIG, intake))
    assert not intake.accepting
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.json()["intake_writer"] == "being started again"
    await writer.start()
    try:
        assert intake.accepting
        assert client.get("/readyz").json()["status"] == "ready"
    finally:
        await writer.close()
        migrated.close()


async def test_every_write_transaction_waits_for_the_sqlite_write_gate(tmp_path: Path) -> None:
    from syncd.retry import outbox
    from syncd.store.sqlite import WriteGate

    store = Store(f"sqlite:///{tmp_path}/syncd.db")
    store.migrate()
    store.start()
    other = WriteGate(tmp_path / "syncd.db")  # as the intake writer process holds it
    try:
        with other:
            write = asyncio.ensure_future(
                store.writer.run(lambda conn: outbox.enqueue(conn, ev("T1"), NOW))
            )
            done, _ = await asyncio.wait({write}, timeout=0.5)
            assert not done, "the write went ahead while another writer held the gate"
        stored = await asyncio.wait_for(write, 10)
        assert stored.deliveries == 1
    finally:
        other.close()
        store.close()


async def test_a_forked_child_that_is_never_started_exits_on_close(tmp_path: Path) -> None:
    writer = writer_for(f"sqlite:///{tmp_path}/syncd.db")
    writer.prefork()
    prepared = writer._prepared
    assert prepared is not None
    child = psutil.Process(prepared.pid)
    await writer.close()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
