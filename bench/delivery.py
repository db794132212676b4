"""Delivery throughput: drain a 20,000-event backlog to a local receiver, three ways.

Contenders, all against the same receiver process (bench/receiver.py: raw asyncio,
answers at once, counts every request), the same events, in the same run:

(a) syncd  - the outbox is pre-filled through ``outbox.enqueue`` (one pending delivery
             per event, 20,000 distinct tickets so per-ticket ordering never makes one
             wait for another), then ``syncd run`` is started and we time until
             ``/api/v1/stats`` shows every delivery ``delivered``. Default delivery
             settings: concurrency 16, batch_size 100; logging at its default, info.
(b) huey   - SqliteHuey (synchronous=FULL, like syncd; no result store) pre-filled with
             20,000 tasks that each POST the same body with httpx (a keep-alive client per
             worker thread); then a consumer with 16 thread workers runs until the
             receiver has seen all 20,000. Consumer logging at WARNING (huey ``-q``).
(c) loop   - one ``httpx.Client`` posting the 20,000 bodies one by one: no queue, no
             durability, the floor of what any sender must do.

Rate = 20,000 / (done - receiver's first request), so process start-up is not counted
(the wall time including start-up is reported too). Every contender's receiver count
must be exactly 20,000.

Run: ``.venv/bin/python bench/delivery.py [--events 20000] [--workers 16]``
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import huey_tasks

NAME = "delivery"
TARGET_VS_HUEY = 2.0
TARGET_VS_LOOP = 0.75


def crm_body(ticket: str) -> dict[str, Any]:
    """Roughly what syncd's REST connector sends for one new ticket."""
    payload = c.sample_payload(ticket)
    fields = {"ticket_id": ticket, "source": c.SOURCE, "last_event": "ticket_created"}
    fields.update({k: v for k, v in payload.items() if k not in ("event", "ticket_id")})
    return {
        "entity": "deal",
        "external_key": f"{c.SOURCE}:ticket:{ticket}",
        "parent_id": None,
        "fields": fields,
    }


def wait_receiver(url: str, expected: int, limit: float, poll: float = 0.02) -> float | None:
    """Monotonic time at which the receiver had seen ``expected`` creates, or None."""
    deadline = time.monotonic() + limit
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if c.receiver_stats(url, client)["count"] >= expected:
                return time.monotonic()
            time.sleep(poll)
    return None


def settle_count(url: str) -> dict[str, Any]:
    """The receiver's counters once nothing more arrives (catches late duplicates)."""
    time.sleep(0.5)
    return c.receiver_stats(url)


# --- (a) syncd -------------------------------------------------------------------


def run_syncd(workdir: Path, receiver_url: str, events: int, limit: float) -> dict[str, Any]:
    wd = workdir / "syncd"
    wd.mkdir()
    port = c.free_port()
    config = c.write_syncd_config(wd, port=port, receiver_url=receiver_url)
    fill_s = c.prefill_outbox(config, events)
    print(f"  syncd: outbox pre-filled with {events:,} events in {fill_s:.1f} s", flush=True)
    c.receiver_reset(receiver_url)
    daemon = c.syncd_child(wd, config).start()
    base = f"http://127.0.0.1:{port}"
    done_at: float | None = None
    totals: dict[str, int] = {}
    cut_at = 0.0
    try:
        daemon.wait_http(base + "/healthz")
        if wait_receiver(receiver_url, events, limit) is not None:
            deadline = time.monotonic() + 30
            with httpx.Client(timeout=5) as client:
                while time.monotonic() < deadline:
                    totals = c.syncd_totals(base, client)
                    if totals.get("delivered", 0) >= events:
                        done_at = time.monotonic()
                        break
                    time.sleep(0.02)
        else:
            with httpx.Client(timeout=5) as client:
                totals = c.syncd_totals(base, client)
        cut_at = time.monotonic()
    finally:
        code = daemon.stop(signal.SIGTERM)
    seen = settle_count(receiver_url)
    return _result(
        "syncd",
        events,
        started=daemon.started_at,
        done_at=done_at,
        cut_at=cut_at,
        seen=seen,
        extra={
            "concurrency": 16,
            "batch_size": 100,
            "prefill_seconds": round(fill_s, 2),
            "final_totals": totals,
            "exit_code": code,
            "log": str(daemon.log_path),
        },
    )


# --- (b) huey --------------------------------------------------------------------


def run_huey(
    workdir: Path, receiver_url: str, events: int, workers: int, limit: float
) -> dict[str, Any]:
    wd = workdir / "huey"
    wd.mkdir()
    db = wd / "huey.db"
    t0 = time.perf_counter()
    # Filling is not timed; it skips fsync only to keep the benchmark short.
    filler, task = huey_tasks.make_huey(str(db), fsync=False)
    records = receiver_url + "/records"
    for i in range(events):
        task(records, crm_body(f"T{i:07d}"))
    fill_s = time.perf_counter() - t0
    queued = filler.pending_count()
    print(f"  huey: {queued:,} tasks enqueued in {fill_s:.1f} s", flush=True)
    c.receiver_reset(receiver_url)
    consumer = c.Child(
        "huey-consumer",
        [c.PYTHON, str(c.BENCH_DIR / "huey_tasks.py"), "--db", str(db), "--workers", str(workers)],
        wd / "huey.log",
    ).start()
    try:
        done_at = wait_receiver(receiver_url, events, limit)
        cut_at = time.monotonic()
        left = filler.pending_count()
    finally:
        code = consumer.stop(signal.SIGINT)
        filler.storage.close()
    seen = settle_count(receiver_url)
    return _result(
        "huey",
        events,
        started=consumer.started_at,
        done_at=done_at,
        cut_at=cut_at,
        seen=seen,
        extra={
            "workers": workers,
            "worker_type": "thread",
            "prefill_seconds": round(fill_s, 2),
            "left_in_queue": left,
            "exit_code": code,
            "log": str(consumer.log_path),
        },
    )


# --- (c) one-by-one loop ---------------------------------------------------------------


def run_loop(receiver_url: str, events: int) -> dict[str, Any]:
    c.receiver_reset(receiver_url)
    bodies = [crm_body(f"T{i:07d}") for i in range(events)]
    started = time.monotonic()
    with httpx.Client(base_url=receiver_url, timeout=10) as client:
        for i, body in enumerate(bodies):
            response = client.post("/records", json=body, headers={"Idempotency-Key": f"b-{i}"})
            if response.status_code != 201:
                raise RuntimeError(f"receiver answered {response.status_code}")
    done_at = time.monotonic()
    seen = settle_count(receiver_url)
    return _result(
        "loop", events, started=started, done_at=done_at, cut_at=done_at, seen=seen, extra={}
    )


def _result(
    name: str,
    events: int,
    *,
    started: float,
    done_at: float | None,
    cut_at: float,
    seen: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Rates over the full drain; for a drain cut short by the limit, over the part done."""
    first = seen["first"]
    finished = done_at is not None
    ok = finished and seen["count"] == events and seen["other"] == 0
    end = done_at if done_at is not None else cut_at
    drained = events if finished else seen["count"]
    rate = drained / (end - first) if first is not None and end > first else None
    out = {
        "contender": name,
        "events": events,
        "receiver_count": seen["count"],
        "receiver_other_requests": seen["other"],
        "complete": ok,
        "finished_within_limit": finished,
        "events_per_second": None if rate is None else round(rate, 1),
        "drain_seconds": round(end - first, 3) if finished and first is not None else None,
        "wall_seconds_incl_startup": round(end - started, 3) if finished else None,
        "projected_drain_seconds": None if finished or not rate else round(events / rate, 1),
        **extra,
    }
    status = "" if finished else " (cut at the limit; rate over the part drained)"
    print(
        f"  {name}: {seen['count']:,} received, "
        + (f"{rate:,.0f} events/s{status}" if rate is not None else "nothing delivered"),
        flush=True,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="syncd vs huey vs a plain loop, draining.")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=16, help="huey thread workers")
    parser.add_argument(
        "--limit", type=float, default=120.0, help="seconds allowed per contender's drain"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()

    watch = c.LoadWatch()
    workdir = Path(tempfile.mkdtemp(prefix="syncd-bench-delivery-"))
    print(f"delivery benchmark: {args.events:,} events, work dir {workdir}", flush=True)
    receiver, receiver_url = c.start_receiver(workdir)
    try:
        results = [
            run_syncd(workdir, receiver_url, args.events, args.limit),
            run_huey(workdir, receiver_url, args.events, args.workers, args.limit),
            run_loop(receiver_url, args.events),
        ]
    finally:
        receiver.stop()
    by = {r["contender"]: r for r in results}

    def ratio(a: str, b: str) -> float | None:
        x, y = by[a]["events_per_second"], by[b]["events_per_second"]
        return None if not x or not y else round(x / y, 3)

    vs_huey, vs_loop = ratio("syncd", "huey"), ratio("syncd", "loop")
    data = {
        **c.result_header(NAME, watch),
        "receiver": "bench/receiver.py (raw asyncio HTTP/1.1, separate process)",
        "distinct_tickets": args.events,
        "limit_s": args.limit,
        "contenders": results,
        "syncd_vs_huey": vs_huey,
        "syncd_vs_loop": vs_loop,
        "targets": {"syncd_vs_huey": TARGET_VS_HUEY, "syncd_vs_loop": TARGET_VS_LOOP},
        "met": {
            "syncd_vs_huey": vs_huey is not None and vs_huey >= TARGET_VS_HUEY,
            "syncd_vs_loop": vs_loop is not None and vs_loop >= TARGET_VS_LOOP,
        },
    }
    path = c.write_results(NAME, data)
    print(f"other processes on the machine: {data['machine_load']['other_processes_cores']} cores")
    rows = []
    for r in results:
        eps = r["events_per_second"]
        drain = (
            f"{r['drain_seconds']:.2f}"
            if r["drain_seconds"] is not None
            else f"cut at {args.limit:.0f} s (~{r['projected_drain_seconds']} projected)"
        )
        rows.append(
            [
                r["contender"],
                f"{r['receiver_count']:,}/{r['events']:,}",
                "n/a" if eps is None else c.fmt(eps),
                drain,
            ]
        )
    print()
    print(c.md_table(["contender", "received", "events/s", "drain s"], rows))
    print()
    print(
        f"syncd/huey = {vs_huey}x (target >= {TARGET_VS_HUEY}x), "
        f"syncd/loop = {vs_loop} (target >= {TARGET_VS_LOOP})"
    )
    print(f"results: {path}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r["complete"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
