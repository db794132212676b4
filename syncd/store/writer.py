"""Group commit: many small writes from asyncio code, one transaction per batch.

Every write syncd makes (intake inserts, leases, attempt outcomes, links)
goes through one writer thread. It drains whatever has queued up, runs the
jobs in one transaction and commits once, so a burst of 200 webhooks costs
one fsync rather than 200. A job that raises fails alone: the batch is then
replayed one job per transaction, and only that job's caller gets the error.

Written here rather than taken from a library because the batching has to
sit between SQLAlchemy's transaction and asyncio futures, which no queue
library does.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

T = TypeVar("T")
ItemT = TypeVar("ItemT")

#: Writes many jobs' items at once: one result per item, in order.
Grouped = Callable[[Connection, Sequence[ItemT]], list[T]]

_STOP = object()


@dataclass
class _Job:
    fn: Callable[[Connection], Any] | None
    #: Where the result goes; None for jobs of :meth:`StoreWriter.write_now`.
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None
    #: Set for jobs from ``run_grouped``: neighbours with the same ``group`` run as one call.
    group: Grouped[Any, Any] | None = None
    item: Any = None

    def __call__(self, conn: Connection) -> Any:
        if self.fn is not None:
            return self.fn(conn)
        assert self.group is not None
        return self.group(conn, [self.item])[0]


#: A job's result, or the error it raised.
Outcome = tuple[Any, BaseException | None]
_Answer = tuple[asyncio.Future[Any], Any, BaseException | None]


def _notify_all(answers: list[tuple[_Job, Any, BaseException | None]]) -> None:
    """Hand results back with one wake-up per event loop, not one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
    for job, result, error in answers:
        assert job.loop is not None and job.future is not None
        by_loop.setdefault(job.loop, []).append((job.future, result, error))
    for loop, batch in by_loop.items():
        # A closed loop means the caller is gone; the write itself stands (or failed) regardless.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_all, batch)


def _resolve_all(batch: list[_Answer]) -> None:
    for future, result, error in batch:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class StoreWriter:
    """Runs write jobs on one thread, committing them in batches."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 512,
        name: str = "syncd-writer",
        idle_check_seconds: float = 1.0,
        gate: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        self._engine = engine
        #: Held around each transaction: the write gate other processes' writers
        #: share (SQLite, see store/sqlite.py), or nothing.
        self._gate = gate or contextlib.nullcontext()
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._started = False
        #: Held between batches: a pool checkout and return per commit (and, on
        #: PostgreSQL, a ping) cost more than the inserts of a small batch.
        self._conn: Connection | None = None
        self._used_at = 0.0
        #: A connection idle longer than this is checked before its next batch.
        self._idle_check_seconds = idle_check_seconds

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a write transaction; returns once it is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, future, loop))
        return await future

    async def run_grouped(self, group: Grouped[ItemT, T], item: ItemT) -> T:
        """Like :meth:`run` with ``lambda conn: group(conn, [item])[0]``, except that
        jobs queued next to each other with the same ``group`` are written by one
        ``group`` call, so a burst costs a few statements instead of a few per job."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(None, future, loop, group, item))
        return await future

    def write_now(
        self, group: Grouped[ItemT, T], items: Sequence[ItemT]
    ) -> list[tuple[T | None, BaseException | None]]:
        """On the calling thread, and not started: ``items`` written as one batch of
        :meth:`run_grouped` jobs would be, each with its result or its error. For a
        process whose only work is writing (syncd.intake.writer_process)."""
        return self._write([_Job(None, None, None, group, item) for item in items])

    def close(self) -> None:
        if self._started:
            self._queue.put(_STOP)
            self._thread.join()
            self._started = False

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            self._drop_connection()

    def _in_transaction(self, body: Callable[[Connection], T]) -> T:
        """``body`` in one transaction on the held connection; after any error the
        connection is let go, and the next batch takes a fresh one."""
        conn = self._connection()
        try:
            with self._gate, conn.begin():
                result = body(conn)
        except BaseException:
            self._drop_connection()
            raise
        self._used_at = time.monotonic()
        return result

    def _connection(self) -> Connection:
        """The held connection, checked first if it sat idle for a while: a server
        that restarted or timed it out meanwhile must not fail the next batch. A
        failed batch is never run again here: a commit whose answer was lost may
        have happened."""
        conn = self._conn
        if conn is not None and time.monotonic() - self._used_at > self._idle_check_seconds:
            try:
                conn.exec_driver_sql("SELECT 1")
                conn.rollback()
            except Exception:
                self._drop_connection()
                conn = None
        if conn is None:
            conn = self._conn = self._engine.connect()
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Job] = [first]
            stop_after = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop_after:
                return

    def _commit(self, batch: list[_Job]) -> None:
        outcomes = self._write(batch)
        _notify_all(
            [(job, result, error) for job, (result, error) in zip(batch, outcomes, strict=True)]
        )

    def _write(self, batch: list[_Job]) -> list[Outcome]:
        """Fast path: the whole batch in one transaction. If any job raises, the
        transaction is rolled back and each job runs again in its own, so one bad
        job fails alone. Jobs are plain functions of the connection, so running
        one again after a rollback is safe."""

        def body(conn: Connection) -> list[Any]:
            results: list[Any] = []
            for run in _runs(batch):
                group = run[0].group
                if group is None or len(run) == 1:
                    results.extend(job(conn) for job in run)
                    continue
                answers = group(conn, [job.item for job in run])
                if len(answers) != len(run):
                    raise RuntimeError(f"{group!r} gave {len(answers)} results for {len(run)}")
                results.extend(answers)
            return results

        try:
            results = self._in_transaction(body)
        except Exception as exc:
            if len(batch) == 1:
                return [(None, exc)]
            return [self._write_one(job) for job in batch]
        return [(result, None) for result in results]

    def _write_one(self, job: _Job) -> Outcome:
        try:
            return self._in_transaction(job), None
        except Exception as exc:
            return None, exc


def _runs(batch: list[_Job]) -> list[list[_Job]]:
    """The batch cut where the group changes: neighbours with one ``group`` together."""
    runs: list[list[_Job]] = []
    for job in batch:
        if runs and job.group is not None and runs[-1][0].group is job.group:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs
