"""The huey contender of bench/delivery.py: one task = one POST to the receiver.

The same module builds the queue for the process that enqueues and for the
consumer, so both agree on the task's name. Run the consumer with
``python bench/huey_tasks.py --db PATH --workers 16``; it stops gracefully on
SIGINT (huey's graceful signal).
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

import httpx
from huey import SqliteHuey

TASK_NAME = "bench_post_record"
_local = threading.local()


def _client() -> httpx.Client:
    """One keep-alive client per worker thread (what a careful huey user would write)."""
    client: httpx.Client | None = getattr(_local, "client", None)
    if client is None:
        client = httpx.Client(timeout=10.0)
        _local.client = client
    return client


def post_record(url: str, body: dict[str, Any]) -> None:
    response = _client().post(url, json=body)
    if response.status_code != 201:
        raise RuntimeError(f"receiver answered {response.status_code}")


def make_huey(db_path: str, *, fsync: bool) -> tuple[SqliteHuey, Any]:
    """The queue and its task. ``fsync=True`` is SQLite synchronous=FULL, as syncd uses."""
    huey = SqliteHuey("bench", filename=db_path, fsync=fsync, results=False)
    task = huey.task(name=TASK_NAME)(post_record)
    return huey, task


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the benchmark's huey consumer.")
    parser.add_argument("--db", required=True)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    # Import this file as ``huey_tasks`` (not ``__main__``) so the task's registered
    # name matches the one the enqueuing process used.
    from huey_tasks import make_huey as make

    huey, _task = make(args.db, fsync=True)
    consumer = huey.create_consumer(workers=args.workers, worker_type="thread", periodic=False)
    consumer.run()


if __name__ == "__main__":
    main()
