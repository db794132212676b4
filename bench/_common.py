"""Shared plumbing for the benchmarks: processes, ports, configs, backlogs, results.

Everything here talks to 127.0.0.1 only. Each benchmark script puts this
folder on ``sys.path`` (it is its own directory when run as
``python bench/<name>.py``) and imports this module as ``_common``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BIN = Path(sys.executable).parent
PYTHON = sys.executable

SOURCE = "helpdesk"
DESTINATION = "crm"
SECRET = "bench-secret-0123456789"


# --- machine -----------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "packages": package_versions(),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- child processes -------------------------------------------------------------


@dataclass
class Child:
    """A benchmark subprocess whose output goes to a log file (never to an unread pipe)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child until it exits
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
            cwd=REPO,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_http(self, url: str, timeout: float = 30.0) -> float:
        """Poll ``url`` until it answers 200; returns the monotonic time it did."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited early; see {self.log_path}:\n" + self.tail()
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(url).status_code == 200:
                        return time.monotonic()
                time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout} s\n" + self.tail())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_receiver(workdir: Path) -> tuple[Child, str]:
    """The counting receiver (bench/receiver.py) on a free port, in its own process."""
    port = free_port()
    child = Child(
        "receiver",
        [PYTHON, str(BENCH_DIR / "receiver.py"), "--port", str(port)],
        workdir / "receiver.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    child.wait_http(url + "/_stats")
    return child, url


def receiver_stats(url: str, client: httpx.Client | None = None) -> dict[str, Any]:
    if client is not None:
        return dict(client.get(url + "/_stats").json())
    return dict(httpx.get(url + "/_stats", timeout=5).json())


def receiver_reset(url: str) -> None:
    httpx.post(url + "/_reset", timeout=5).raise_for_status()


# --- syncd ---------------------------------------------------------------------


#: The monitor API needs a login; the benchmarks read /api/v1/stats with this token.
API_TOKEN = "bench-api-token-0123456789"


def syncd_config(
    *,
    port: int,
    receiver_url: str | None,
    concurrency: int = 16,
    batch_size: int = 100,
    log_level: str = "info",
    with_destination: bool = True,
    intake_writer: str = "process",
) -> str:
    """A config for ``syncd run``: SQLite beside the file, one source, one REST destination.

    With ``with_destination=False`` no destination is configured at all, so intake
    stores events with no deliveries and the dispatcher stays idle. ``intake_writer``
    is ``store.intake_writer`` (the default, "process", or "thread").
    """
    dest = ""
    if with_destination:
        assert receiver_url is not None
        dest = f'[destinations.{DESTINATION}]\nkind = "rest"\nbase_url = "{receiver_url}"\n'
    return (
        "# Written by a syncd benchmark (bench/).\n"
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n\n"
        "[store]\n"
        'url = "sqlite:///syncd.db"\n'
        f'intake_writer = "{intake_writer}"\n\n'
        "[delivery]\n"
        f"concurrency = {concurrency}\n"
        f"batch_size = {batch_size}\n"
        "request_timeout_seconds = 10\n"
        "lease_seconds = 60\n\n"
        "[logging]\n"
        f'level = "{log_level}"\n'
        'format = "json"\n\n'
        f"[sources.{SOURCE}]\n"
        'kind = "generic"\n'
        'secret = "${SYNCD_BENCH_SECRET}"\n\n'
        "[[monitor.tokens]]\n"
        'name = "bench"\n'
        f'token = "{API_TOKEN}"\n\n'
        f"{dest}"
    )


def write_syncd_config(workdir: Path, **kwargs: Any) -> Path:
    path = workdir / "syncd.toml"
    path.write_text(syncd_config(**kwargs), encoding="utf-8")
    return path


def syncd_child(workdir: Path, config: Path, name: str = "syncd") -> Child:
    return Child(
        name,
        [str(BIN / "syncd"), "run", "--config", str(config)],
        workdir / f"{name}.log",
        env={"SYNCD_BENCH_SECRET": SECRET},
    )


def sample_payload(ticket: str) -> dict[str, Any]:
    """One new ticket, no comment and no client: maps to exactly one create (POST /records).

    A client would add a contact to find or create, and one client shared by every
    ticket would make all deliveries contend for that contact; neither is what these
    benchmarks measure.
    """
    return {
        "event": "ticket_created",
        "ticket_id": ticket,
        "subject": f"Benchmark ticket {ticket}",
        "status": "new",
        "channel": "email",
        "priority": "normal",
    }


def sample_body(ticket: str) -> bytes:
    return json.dumps(sample_payload(ticket), separators=(",", ":")).encode()


def prefill_outbox(config_path: Path, count: int, batch: int = 5000) -> float:
    """Store ``count`` events for distinct tickets, each with one pending delivery.

    Each body is parsed by the configured source exactly as intake would (so the
    stored event is what ``POST /hooks/{source}`` stores), then written with
    ``outbox.enqueue``, ``batch`` events per transaction. Returns the seconds taken.
    """
    from syncd.config import load_config, resolve_store_url
    from syncd.events import IncomingEvent
    from syncd.intake import registry
    from syncd.intake.base import RawRequest
    from syncd.retry import outbox
    from syncd.store import Store

    t0 = time.perf_counter()
    os.environ.setdefault("SYNCD_BENCH_SECRET", SECRET)
    config = load_config(config_path)
    source = registry.build(
        SOURCE, config.sources[SOURCE], default_region=config.intake.default_country
    )
    destinations = tuple(config.destinations_for(SOURCE))
    headers = {"x-syncd-secret": SECRET, "content-type": "application/json"}
    store = Store(resolve_store_url(config))
    try:
        store.migrate()
        for start in range(0, count, batch):
            now = time.time()
            incoming = [
                IncomingEvent.from_ticket_event(event, destinations)
                for i in range(start, min(count, start + batch))
                for event in source.parse(
                    RawRequest(body=sample_body(f"T{i:07d}"), headers=headers, received_at=now)
                )
            ]

            def _fill(conn: Any, items: list[IncomingEvent] = incoming, at: float = now) -> None:
                for item in items:
                    outbox.enqueue(conn, item, at)

            store.write_sync(_fill)
    finally:
        store.close()
    return time.perf_counter() - t0


def db_count(db_path: Path, sql: str) -> int:
    """A read-only count straight from the SQLite file (WAL: never blocks the daemon)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def syncd_totals(base_url: str, client: httpx.Client) -> dict[str, int]:
    data = client.get(
        base_url + "/api/v1/stats", headers={"Authorization": f"Bearer {API_TOKEN}"}
    ).json()
    return {str(k): int(v) for k, v in data["totals"].items()}


# --- other load on the machine ----------------------------------------------------


class LoadWatch:
    """How much CPU the rest of the machine used while a benchmark ran.

    On a 2-core machine any other busy process moves the figures, so each result
    records it: system-wide busy CPU minus what this benchmark's own process tree
    used (itself, and its children whether still running or already waited for),
    in cores.
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._t0 = time.monotonic()
        self._sys0 = psutil.cpu_times()
        self._own0 = self._own()
        self._load0 = os.getloadavg()[0]

    def _own(self) -> float:
        t = self._me.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        for child in self._me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                ct = child.cpu_times()
                total += ct.user + ct.system
        return total

    def result(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        sys1 = psutil.cpu_times()
        busy = sum(
            getattr(sys1, f) - getattr(self._sys0, f)
            # irq/softirq left out: loopback traffic is mostly the benchmark's own.
            for f in ("user", "nice", "system")
            if hasattr(sys1, f)
        )
        steal = getattr(sys1, "steal", 0.0) - getattr(self._sys0, "steal", 0.0)
        own = self._own() - self._own0
        return {
            "seconds": round(elapsed, 1),
            "machine_busy_cores": round(busy / elapsed, 2),
            "benchmark_cores": round(own / elapsed, 2),
            "other_processes_cores": round(max(busy - own, 0.0) / elapsed, 2),
            "steal_cores": round(steal / elapsed, 2),
            "loadavg_1m_start": round(self._load0, 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
        }


# --- results -------------------------------------------------------------------


def result_header(name: str, watch: LoadWatch) -> dict[str, Any]:
    """What every results file starts with: which benchmark, how it was run, on what."""
    return {
        "benchmark": name,
        "command": command_line(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "syncd_revision": git_revision(),
        "machine": machine_facts(),
        "machine_load": watch.result(),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    """``bench/results/<name>.json``, or under ``$SYNCD_BENCH_RESULTS`` (the smoke tests,
    which must not overwrite the recorded results)."""
    folder = Path(os.environ.get("SYNCD_BENCH_RESULTS") or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def command_line() -> str:
    """How this benchmark was invoked, relative to the repo, for the docs."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def git_revision() -> str:
    """HEAD, plus a fingerprint of any uncommitted change under syncd/ (what actually ran)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "syncd"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
        untracked = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "--", "syncd"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not diff and not untracked:
        return rev
    digest = hashlib.sha1(diff + untracked, usedforsecurity=False).hexdigest()[:8]
    return f"{rev} + uncommitted syncd/ changes ({digest})"


def package_versions() -> dict[str, str]:
    found = {}
    for name in ("fastapi", "uvicorn", "httpx", "aiohttp", "sqlalchemy", "huey", "psutil"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


# --- memory of one process ----------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples one process's RSS every ``interval`` seconds until stopped, and the
    PSS of it and its children together (syncd's intake writer process): each page
    counted once, shared ones split between the processes that map them."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        #: (time, PSS of the process and all its children, number of processes)
        self.tree_samples: list[tuple[float, int, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                rss = int(self.process.memory_info().rss)
                tree = [self.process, *self.process.children(recursive=True)]
            except psutil.Error:
                return
            now = time.monotonic()
            self.samples.append((now, rss))
            pss = 0
            for proc in tree:
                with contextlib.suppress(psutil.Error):
                    pss += int(proc.memory_full_info().pss)
            self.tree_samples.append((now, pss, len(tree)))
            self._stop_event.wait(self.interval)

    @property
    def tree_peak(self) -> int:
        return max((pss for _, pss, _ in self.tree_samples), default=0)

    @property
    def tree_processes(self) -> int:
        return max((n for _, _, n in self.tree_samples), default=0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)

    def peak_mb(self, since: float = 0.0) -> float:
        """The highest sample taken at or after ``since`` (monotonic), in MB."""
        values = [rss for t, rss in self.samples if t >= since]
        return round(max(values, default=0) / 2**20, 1)

    def at(self, when: float) -> int:
        """The last sample taken at or before ``when``."""
        found = 0
        for t, rss in self.samples:
            if t > when:
                break
            found = rss
        return found
