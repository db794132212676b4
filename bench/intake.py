"""Intake: durable webhooks per second and latency of ``POST /hooks/{source}``.

wrk drives a fixed number of connections for a fixed time against three servers,
one after another, each in its own process:

1. ``syncd run`` with delivery live: the source routes to a REST destination that is
   bench/receiver.py (answers at once), so the dispatcher delivers what intake stores
   while intake is measured: the realistic case.
2. ``syncd run`` with no destination configured: intake stores events with no
   deliveries and the dispatcher stays idle (intake alone).
3. The same with ``store.intake_writer = "thread"``: events written by the daemon's
   own writer thread instead of its intake writer process, for comparison.
4. The ceiling: bench/noop_app.py, a FastAPI no-op POST endpoint served by the same
   uvicorn with the same settings, in a separate process. It is measured twice, first
   and last, and the faster run is the ceiling, so one disturbed run cannot lower it.

Every request carries a distinct ticket id. SQLite in a temp dir, config written here.
After each syncd run the events in the SQLite file are counted and compared with the
202 answers wrk received: each 202 must be in the store. Requests wrk abandons in
flight when its clock runs out may still be stored, so the store may hold up to
``connections`` more than the 202 count, never fewer.

Run: ``.venv/bin/python bench/intake.py [--connections 16] [--duration 10]``
Needs wrk (Debian: ``apt-get install -y wrk``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

NAME = "intake"
TARGET_RATIO = 0.70
LUA = c.BENCH_DIR / "intake.lua"


def run_wrk(
    url: str, label: str, *, connections: int, duration: int, threads: int
) -> dict[str, Any]:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        label,
        c.SECRET,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            data["requests_per_second"] = data["requests"] / (data["duration_us"] / 1e6)
            data["accepted_per_second"] = data["accepted"] / (data["duration_us"] / 1e6)
            return data
    raise RuntimeError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


def measure(
    url: str, label: str, args: argparse.Namespace, count_events: Any = None
) -> dict[str, Any]:
    """A short warm-up, then the measured run; with ``count_events``, the durability check."""
    run_wrk(
        url,
        f"{label}-warm",
        connections=args.connections,
        duration=args.warmup,
        threads=args.threads,
    )
    time.sleep(1.0)
    before = count_events() if count_events else None
    result = run_wrk(
        url, label, connections=args.connections, duration=args.duration, threads=args.threads
    )
    if count_events:
        time.sleep(1.5)  # let requests wrk abandoned at the cut-off finish
        after = count_events()
        stored = after - before
        abandoned = result["sent"] - result["accepted"] - result["other"]
        result["durability"] = {
            "events_stored": stored,
            "answered_202": result["accepted"],
            "abandoned_in_flight_by_wrk": abandoned,
            "ok": result["accepted"] <= stored <= result["accepted"] + max(abandoned, 0),
            "exact": stored == result["accepted"],
        }
    return result


def run_syncd(
    workdir: Path,
    args: argparse.Namespace,
    *,
    deliver: bool,
    receiver_url: str | None,
    intake_writer: str = "process",
) -> dict[str, Any]:
    name = "syncd-deliver" if deliver else "syncd-intake-only"
    if intake_writer != "process":
        name += f"-{intake_writer}"
    wd = workdir / name
    wd.mkdir()
    port = c.free_port()
    config = c.write_syncd_config(
        wd,
        port=port,
        receiver_url=receiver_url,
        with_destination=deliver,
        intake_writer=intake_writer,
    )
    daemon = c.syncd_child(wd, config, name=name).start()
    db = wd / "syncd.db"
    try:
        daemon.wait_http(f"http://127.0.0.1:{port}/healthz")
        result = measure(
            f"http://127.0.0.1:{port}/hooks/{c.SOURCE}",
            name,
            args,
            count_events=lambda: c.db_count(db, "SELECT count(*) FROM events"),
        )
        if deliver:
            result["delivered_during_run"] = c.db_count(
                db, "SELECT count(*) FROM deliveries WHERE state = 'delivered'"
            )
    finally:
        result_code = daemon.stop(signal.SIGTERM)
    result.update(server=name, exit_code=result_code, log=str(daemon.log_path))
    return result


def run_ceiling(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = c.free_port()
    server = c.Child(
        "noop",
        [c.PYTHON, str(c.BENCH_DIR / "noop_app.py"), "--port", str(port)],
        workdir / "noop.log",
    ).start()
    try:
        server.wait_http(f"http://127.0.0.1:{port}/healthz")
        result = measure(f"http://127.0.0.1:{port}/hooks/{c.SOURCE}", "ceiling", args)
    finally:
        server.stop(signal.SIGTERM)
    result.update(server="fastapi-noop")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description="Intake throughput of syncd vs a no-op.")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per server")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per server")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print(
            "bench/intake.py needs wrk, which is not installed.\n"
            "  Debian/Ubuntu: apt-get update && apt-get install -y wrk",
            file=sys.stderr,
        )
        return 2

    watch = c.LoadWatch()
    workdir = Path(tempfile.mkdtemp(prefix="syncd-bench-intake-"))
    print(
        f"intake benchmark: wrk -t{args.threads} -c{args.connections} -d{args.duration}s "
        f"(+{args.warmup}s warm-up), work dir {workdir}",
        flush=True,
    )
    first_ceiling = run_ceiling(workdir, args)
    print(f"  no-op ceiling, first:  {first_ceiling['requests_per_second']:,.0f} req/s", flush=True)
    receiver, receiver_url = c.start_receiver(workdir)
    try:
        live = run_syncd(workdir, args, deliver=True, receiver_url=receiver_url)
        print(f"  syncd (delivery live): {live['accepted_per_second']:,.0f} req/s", flush=True)
        alone = run_syncd(workdir, args, deliver=False, receiver_url=None)
        print(f"  syncd (intake only):   {alone['accepted_per_second']:,.0f} req/s", flush=True)
        thread = run_syncd(workdir, args, deliver=False, receiver_url=None, intake_writer="thread")
        print(f"  syncd (writer thread): {thread['accepted_per_second']:,.0f} req/s", flush=True)
    finally:
        receiver.stop()
    last_ceiling = run_ceiling(workdir, args)
    print(f"  no-op ceiling, last:   {last_ceiling['requests_per_second']:,.0f} req/s", flush=True)
    ceiling = max(first_ceiling, last_ceiling, key=lambda r: r["accepted_per_second"])
    ceiling["runs_per_second"] = [
        round(r["accepted_per_second"]) for r in (first_ceiling, last_ceiling)
    ]

    rows = []
    for label, r in (
        ("syncd run, delivery live", live),
        ("syncd run, no destination", alone),
        ("syncd run, no destination, writer thread", thread),
        ("FastAPI no-op (ceiling)", ceiling),
    ):
        rate = r["accepted_per_second"]
        r["ratio_to_ceiling"] = round(rate / ceiling["accepted_per_second"], 3)
        dur = r.get("durability")
        rows.append(
            [
                label,
                c.fmt(rate),
                f"{r['p50_us'] / 1000:.1f}",
                f"{r['p99_us'] / 1000:.1f}",
                f"{r['ratio_to_ceiling']:.0%}",
                "n/a"
                if dur is None
                else f"{dur['events_stored']:,} stored / {dur['answered_202']:,} x 202"
                + (" ok" if dur["ok"] else " MISMATCH"),
            ]
        )
    data: dict[str, Any] = {
        **c.result_header(NAME, watch),
        "load": {
            "tool": "wrk",
            "threads": args.threads,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "script": "bench/intake.lua",
        },
        "results": {
            "syncd_deliver": live,
            "syncd_intake_only": alone,
            "syncd_intake_only_thread": thread,
            "ceiling": ceiling,
        },
        "target_ratio": TARGET_RATIO,
        "met": {
            "delivery_live": live["ratio_to_ceiling"] >= TARGET_RATIO,
            "intake_only": alone["ratio_to_ceiling"] >= TARGET_RATIO,
        },
        "durable": all(r["durability"]["ok"] for r in (live, alone, thread)),
    }
    path = c.write_results(NAME, data)
    print(f"other processes on the machine: {data['machine_load']['other_processes_cores']} cores")
    print()
    print(c.md_table(["server", "202/s", "p50 ms", "p99 ms", "of ceiling", "durability"], rows))
    print()
    print(f"target: >= {TARGET_RATIO:.0%} of the ceiling; results: {path}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = data["durable"] and all(
        r["other"] == 0 for r in (live, alone, thread, first_ceiling, last_ceiling)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
