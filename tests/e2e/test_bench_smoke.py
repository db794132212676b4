"""The CRM benchmark, small, as a test: it must keep running, and its own checks must hold.

`bench/crm.py` drives `syncd run` into both CRM emulators under their real rate
limits. At this size the figures mean nothing (most of the work fits in the burst),
so only what must be true at any size is checked: every phase completes, one
contact and one deal per ticket, one note per message, and nothing refused by
either CRM after the burst. Results go to a temp dir, not to bench/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_crm_benchmark_small_run_keeps_its_promises(tmp_path: Path) -> None:
    tickets = {"bitrix24": 60, "amocrm": 12}
    argv = [
        sys.executable,
        str(ROOT / "bench" / "crm.py"),
        "--tickets",
        ",".join(f"{k}={v}" for k, v in tickets.items()),
        "--follow-up-rounds",
        "bitrix24=1,amocrm=2",
        "--limit",
        "90",
    ]
    recorded = ROOT / "bench" / "results" / "crm.json"
    recorded_before = recorded.read_bytes() if recorded.exists() else None
    env = {**os.environ, "SYNCD_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "crm.json").read_text(encoding="utf-8"))
    by_crm = {r["crm"]: r for r in data["results"]}
    assert set(by_crm) == set(tickets)
    for name, count in tickets.items():
        r = by_crm[name]
        assert r["phases"]["new"]["complete"] and r["phases"]["follow_up"]["complete"]
        assert r["records"]["contacts"] == count
        assert r["records"]["deals"] == count
        assert r["records"]["notes"] == r["expected_notes"] == count * (1 + r["follow_up_rounds"])
        assert r["refused_after_burst"] == 0, r
    assert by_crm["bitrix24"]["records"]["max_deals_per_ticket"] == 1
    assert (recorded.read_bytes() if recorded.exists() else None) == recorded_before
