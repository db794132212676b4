"""Memory: the daemon's peak RSS while it drains a 100,000-event backlog.

The outbox is pre-filled through the source's parser and ``outbox.enqueue`` (as in
bench/delivery.py: distinct tickets, one create each), then ``syncd run`` delivers to
bench/receiver.py. The daemon's RSS (psutil, that process only) and the PSS of the
daemon and its intake writer process together (each page counted once; the writer
is a fork that shares most of the daemon's pages) are sampled every 50 ms from
start-up until ``/api/v1/stats`` shows every delivery ``delivered``, or until
``--limit`` seconds have passed. Both must stay under the target. If the limit cuts the drain
short, the figures cover the part drained and the full drain time is projected from
the rate, and both are marked as such.

Run: ``.venv/bin/python bench/memory.py [--events 100000] [--limit 150]``
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

NAME = "memory"
TARGET_MB = 150.0
MB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description="Peak RSS of syncd draining a backlog.")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--limit", type=float, default=150.0, help="seconds allowed to drain")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--output", default=NAME, help="results name: bench/results/<output>.json")
    args = parser.parse_args()

    watch = c.LoadWatch()
    workdir = Path(tempfile.mkdtemp(prefix="syncd-bench-memory-"))
    print(f"memory benchmark: {args.events:,} events, work dir {workdir}", flush=True)
    receiver, receiver_url = c.start_receiver(workdir)
    port = c.free_port()
    base = f"http://127.0.0.1:{port}"
    config = c.write_syncd_config(workdir, port=port, receiver_url=receiver_url)
    try:
        fill_s = c.prefill_outbox(config, args.events)
        print(f"  outbox pre-filled with {args.events:,} events in {fill_s:.1f} s", flush=True)
        daemon = c.syncd_child(workdir, config).start()
        sampler = c.RssSampler(daemon.pid)
        sampler.start()
        progress: list[tuple[float, int]] = []
        done_at: float | None = None
        totals: dict[str, int] = {}
        try:
            up_at = daemon.wait_http(base + "/healthz")
            deadline = up_at + args.limit
            with httpx.Client(timeout=10) as client:
                while time.monotonic() < deadline:
                    seen = c.receiver_stats(receiver_url, client)["count"]
                    progress.append((time.monotonic(), seen))
                    if seen >= args.events:
                        totals = c.syncd_totals(base, client)
                        if totals.get("delivered", 0) >= args.events:
                            done_at = time.monotonic()
                            break
                        time.sleep(0.05)
                        continue
                    time.sleep(1.0)
                if done_at is None:
                    totals = c.syncd_totals(base, client)
        finally:
            sampler.stop()
            code = daemon.stop(signal.SIGTERM)
        stats = c.receiver_stats(receiver_url)
    finally:
        receiver.stop()

    delivered = int(totals.get("delivered", 0))
    first = stats["first"]
    end = done_at if done_at is not None else progress[-1][0]
    drained = stats["count"] if done_at is None else args.events
    elapsed = end - first if first is not None else 0.0
    rate = drained / elapsed if elapsed > 0 else 0.0
    complete = done_at is not None
    rss_start = sampler.at(up_at)
    peak = sampler.peak
    # RSS growth over the drain, per 10,000 deliveries: a leak shows here even on a cut run.
    half = first + elapsed / 2 if first is not None else up_at
    rss_mid, rss_end = sampler.at(half), sampler.at(end)
    half_count = next((n for t, n in progress if t >= half), drained)
    growth = (
        (rss_end - rss_mid) / MB / ((drained - half_count) / 10_000)
        if drained > half_count
        else 0.0
    )
    result: dict[str, Any] = {
        **c.result_header(NAME, watch),
        "events": args.events,
        "distinct_tickets": args.events,
        "sample_interval_s": sampler.interval,
        "samples": len(sampler.samples),
        "complete": complete,
        "limit_s": args.limit,
        "delivered": delivered,
        "received_by_receiver": stats["count"],
        "prefill_seconds": round(fill_s, 1),
        "rss_after_startup_mb": round(rss_start / MB, 1),
        "peak_rss_mb": round(peak / MB, 1),
        "peak_tree_pss_mb": round(sampler.tree_peak / MB, 1),
        "tree_processes": sampler.tree_processes,
        "rss_growth_mb_per_10k_second_half": round(growth, 2),
        "drain_seconds": round(elapsed, 1) if complete else None,
        "events_per_second": round(rate, 1),
        "projected_drain_seconds": None if complete or rate <= 0 else round(args.events / rate),
        "target_peak_rss_mb": TARGET_MB,
        "met": peak / MB < TARGET_MB and sampler.tree_peak / MB < TARGET_MB,
        "exit_code": code,
    }
    path = c.write_results(args.output, result)
    print(
        f"other processes on the machine: {result['machine_load']['other_processes_cores']} cores"
    )
    drain = (
        f"{elapsed:.1f}"
        if complete
        else f"not finished in {args.limit:.0f} s ({drained:,} drained); "
        f"~{result['projected_drain_seconds']:,} projected"
    )
    print()
    print(
        c.md_table(
            [
                "backlog",
                "peak RSS MB",
                "peak PSS MB, with intake writer",
                "RSS after start-up MB",
                "drain s",
                "events/s",
            ],
            [
                [
                    f"{args.events:,}",
                    f"{peak / MB:.1f}",
                    f"{sampler.tree_peak / MB:.1f}",
                    f"{rss_start / MB:.1f}",
                    drain,
                    c.fmt(rate),
                ]
            ],
        )
    )
    print()
    print(f"target: peak RSS < {TARGET_MB:.0f} MB; results: {path}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
