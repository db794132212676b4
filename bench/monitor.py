"""Monitor latency at 1,000,000 events: the overview and the events list, over HTTP.

1. A SQLite store with ``--events`` events is built once and cached under
   ``bench/results/cache/`` (its name carries a version and a digest of the schema
   files, so a change to an index builds it again; a file older than ``--max-age-hours``
   is rebuilt too, because the overview looks at the last 24 hours). The schema comes
   from ``syncd migrate`` on a fresh config; rows are then bulk-inserted with sqlite3
   ``executemany`` in big transactions, the migration's indexes dropped meanwhile and
   re-created afterwards from their own stored SQL, so the schema is exactly the real one.

   The mix: received times over 30 days, one delivery per event (2 destinations,
   2 sources), ~95 % delivered, ~2 % failed, ~1 % expired, ~1 % retry_wait and ~1 %
   pending (the last two among the newest events), about 4 events per ticket,
   200,000 distinct clients (e-mail and/or phone) on the events, error texts and
   attempt rows on the failed/expired/retrying deliveries (and on the few delivered
   ones that needed a retry), contact and deal links for the delivered ones.

2. ``syncd run`` serves a copy of that file with a config whose destinations point at
   a closed port. Pending and retrying deliveries are due 7 days after the build, and the
   retry window is 7 days, so the dispatcher sends nothing and writes nothing while we
   measure: the daemon is idle apart from its polling and the requests we make.

3. Each case is requested ``--requests`` times, round-robin over the cases (so other load
   on the machine spreads evenly), one request at a time on a keep-alive connection,
   after ``--warmup`` unmeasured rounds; the JSON API with the bearer token, the HTML
   pages with a session cookie from ``/login``. The daemon's RSS is sampled every 50 ms
   from its start to its stop.

Run: ``.venv/bin/python bench/monitor.py [--events 1000000] [--requests 200] [--rebuild]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

NAME = "monitor"
#: Bump when the generated data changes shape; the schema digest is added on top.
DATA_VERSION = 1
CACHE_DIR = c.RESULTS_DIR / "cache"
TARGET_P95_MS = 200.0
TARGET_RSS_MB = 200.0

SOURCES = ("support", "sales")
DESTINATIONS = ("crm_main", "crm_second")
CLIENTS = 200_000
DAY = 86400.0
SPAN = 30 * DAY
#: Pending and retry_wait deliveries fall due this long after the build: never during a run.
NOT_DUE = 7 * DAY
USER, PASSWORD = "manager", "bench-password"

#: (text, HTTP status) of errors that are retried, and of errors that fail at once.
TRANSIENT = (
    ("timeout after 10.0 s waiting for the CRM", None),
    ("connection refused by crm host", None),
    ("HTTP 503 Service Unavailable: upstream is overloaded", 503),
    ("HTTP 502 Bad Gateway", 502),
    ("HTTP 429 Too Many Requests: QUERY_LIMIT_EXCEEDED", 429),
)
PERMANENT = (
    ("HTTP 400 Bad Request: field PHONE has an invalid value", 400),
    ("HTTP 422 Unprocessable Entity: deal stage C7:NEW does not exist", 422),
    ("HTTP 403 Forbidden: insufficient rights for crm.deal.add", 403),
    ("mapping: no rule matches this ticket and unmatched = fail", None),
    ("HTTP 404 Not Found: contact 88213 was deleted in the CRM", 404),
)
KINDS = (
    ("comment_added", 0.55),
    ("status_changed", 0.28),
    ("ticket_updated", 0.12),
    ("rating", 0.05),
)
STATUSES = ("open", "pending", "solved", "closed")


# --- the store -------------------------------------------------------------------


def schema_digest() -> str:
    """Changes whenever a migration or the models change (an index added, say)."""
    h = hashlib.sha256()
    files = sorted((c.REPO / "syncd" / "store" / "migrations" / "versions").glob("*.py"))
    for path in [*files, c.REPO / "syncd" / "store" / "models.py"]:
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def cache_path(events: int, seed: int) -> Path:
    return CACHE_DIR / f"monitor-v{DATA_VERSION}-{events}-s{seed}-{schema_digest()}.db"


def bench_config(*, db: Path, port: int, closed_port: int, users: str = "") -> str:
    dests = "".join(
        f'[destinations.{name}]\nkind = "rest"\nbase_url = "http://127.0.0.1:{closed_port}"\n\n'
        for name in DESTINATIONS
    )
    sources = "".join(
        f'[sources.{name}]\nkind = "generic"\nsecret = "{c.SECRET}"\n\n' for name in SOURCES
    )
    return (
        "# Written by bench/monitor.py.\n"
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n\n"
        "[store]\n"
        f'url = "sqlite:///{db}"\n\n'
        "[delivery]\n"
        # Nothing may expire or be purged while we measure (see the module docstring).
        f"retry_window_seconds = {NOT_DUE:.0f}\n"
        "retention_days = 365\n\n"
        "[logging]\n"
        'level = "info"\n'
        'format = "json"\n\n'
        f"{sources}{dests}"
        "[monitor]\n"
        'session_secret = "bench-session-secret-0123456789"\n\n'
        "[[monitor.tokens]]\n"
        'name = "bench"\n'
        f'token = "{c.API_TOKEN}"\n\n'
        f"{users}"
    )


def _pick_kind(rng: random.Random) -> str:
    r = rng.random()
    for kind, share in KINDS:
        if r < share:
            return kind
        r -= share
    return KINDS[-1][0]


def _client(n: int) -> tuple[str | None, str | None]:
    email = None if n % 10 == 0 else f"client{n}@mail{n % 37}.example.ru"
    phone = None if n % 3 == 0 else f"+7999{n:07d}"
    return email, phone


def build_store(path: Path, events: int, seed: int) -> dict[str, Any]:
    """Write the database file at ``path`` (see the module docstring)."""
    t0 = time.perf_counter()
    tmp = path.with_suffix(".building")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        leftover.unlink(missing_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="syncd-bench-monitor-build-"))
    try:
        config = workdir / "syncd.toml"
        config.write_text(bench_config(db=tmp, port=1, closed_port=9), encoding="utf-8")
        subprocess.run(
            [str(c.BIN / "syncd"), "migrate", "--config", str(config)],
            check=True,
            cwd=c.REPO,
            stdout=subprocess.DEVNULL,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    (tmp.with_name(tmp.name + ".lock")).unlink(missing_ok=True)

    built_at = time.time()
    db = sqlite3.connect(tmp, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-400000")
    indexes = [
        (name, sql)
        for name, sql in db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            "AND tbl_name IN ('events', 'deliveries', 'attempts', 'links')"
        )
    ]
    for name, _ in indexes:
        db.execute(f'DROP INDEX "{name}"')

    rng = random.Random(seed)
    start = built_at - SPAN
    recent: deque[int] = deque(maxlen=4000)
    next_ticket = 0
    # The newest ~12 h hold the pending backlog, the newest 24 h the retries.
    per_hour = events / (SPAN / 3600)
    p_pending = min(1.0, 0.01 * events / (per_hour * 12))
    p_retry = min(1.0, 0.01 * events / max(per_hour * 24 - 0.01 * events, 1.0))
    p_failed, p_expired = 0.02 / 0.97, 0.01 / 0.97
    ev_rows: list[tuple[Any, ...]] = []
    dl_rows: list[tuple[Any, ...]] = []
    at_rows: list[tuple[Any, ...]] = []
    ln_rows: list[tuple[Any, ...]] = []
    counts = {"events": 0, "deliveries": 0, "attempts": 0, "links": 0}
    states: dict[str, int] = {}

    def flush() -> None:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO events (id, source, ticket_id, kind, dedup_key, payload, received_at, "
            "occurred_at, recovered_by_poll, client_email, client_phone) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            ev_rows,
        )
        db.executemany(
            "INSERT INTO deliveries (id, event_id, destination, source, ordering_key, state, "
            "attempts, next_attempt_at, first_failed_at, outcome_unknown, last_error, "
            "last_status_code, created_at, updated_at, finished_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,0,?,?,?,?,?)",
            dl_rows,
        )
        db.executemany(
            'INSERT INTO attempts (delivery_id, number, "trigger", started_at, duration_ms, '
            "status_code, outcome, error, next_attempt_at) VALUES (?,?,?,?,?,?,?,?,?)",
            at_rows,
        )
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO links (destination, entity, external_key, crm_id, url, "
            "delivery_id, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            ln_rows,
        )
        counts["links"] += db.total_changes - before
        db.execute("COMMIT")
        counts["events"] += len(ev_rows)
        counts["deliveries"] += len(dl_rows)
        counts["attempts"] += len(at_rows)
        for rows in (ev_rows, dl_rows, at_rows, ln_rows):
            rows.clear()

    for i in range(1, events + 1):
        ts = start + SPAN * (i - 1 + rng.random()) / events
        age = built_at - ts
        if not recent or rng.random() < 0.26:
            ticket = next_ticket
            next_ticket += 1
            recent.append(ticket)
            kind = "ticket_created"
        else:
            ticket = recent[rng.randrange(len(recent))]
            kind = _pick_kind(rng)
        mix = (ticket * 2654435761) >> 8
        source = SOURCES[mix & 1]
        dest = DESTINATIONS[(mix >> 1) & 1]
        ticket_id = str(100_000 + ticket)
        email, phone = _client((ticket * 7919) % CLIENTS)
        with_client = kind == "ticket_created" or rng.random() < 0.4
        body: dict[str, Any] = {
            "source": source,
            "ticket_id": ticket_id,
            "kind": kind,
            "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts - 0.4)),
            "delivery_id": f"{source}-{i}",
        }
        if kind == "ticket_created":
            body["subject"] = f"Order {ticket_id}: question about delivery"
            body["status"] = "new"
            body["channel"] = "email"
        elif kind == "status_changed":
            body["status"] = STATUSES[i % 4]
        elif kind == "comment_added":
            body["comment"] = {"id": f"c{i}", "text": "Thank you, any news on this?"}
        elif kind == "rating":
            body["rating"] = {"value": "good"}
        if with_client:
            body["client"] = {
                "name": f"Client {ticket % CLIENTS}",
                "emails": [email] if email else [],
                "phones": [phone] if phone else [],
            }
        ev_rows.append(
            (
                i,
                source,
                ticket_id,
                kind,
                f"id:{source}-{i}",
                json.dumps(body, ensure_ascii=False, separators=(",", ":")),
                ts,
                ts - 0.4,
                0,
                email if with_client else None,
                phone if with_client else None,
            )
        )

        r = rng.random()
        if age < 12 * 3600 and r < p_pending:
            state = "pending"
        elif age < DAY and rng.random() < p_retry:
            state = "retry_wait"
        elif age > DAY + 3600 and r < p_failed:
            state = "failed"
        elif age > DAY + 3600 and r < p_failed + p_expired:
            state = "expired"
        else:
            state = "delivered"
        states[state] = states.get(state, 0) + 1

        tries: list[tuple[float, str | None, int | None]] = []  # (start, error, status)
        t = ts + rng.uniform(0.05, 0.6)
        next_at = first_failed = finished = error = status = None
        if state == "pending":
            next_at = built_at + NOT_DUE
        elif state == "retry_wait":
            for _ in range(rng.randint(1, 6)):
                tries.append((t, *rng.choice(TRANSIENT)))
                t += rng.uniform(30, 900)
            next_at = built_at + NOT_DUE
        elif state == "failed":
            for _ in range(rng.randint(0, 2)):
                tries.append((t, *rng.choice(TRANSIENT)))
                t += rng.uniform(30, 300)
            tries.append((t, *rng.choice(PERMANENT)))
            finished = t + 0.3
        elif state == "expired":
            text, code = rng.choice(TRANSIENT)
            n = rng.randint(8, 12)
            for k in range(n):
                tries.append((t + k * DAY / n, text, code))
            finished = t + DAY
        else:
            if rng.random() < 0.03:
                for _ in range(rng.randint(1, 2)):
                    tries.append((t, *rng.choice(TRANSIENT)))
                    t += rng.uniform(30, 600)
            tries.append((t, None, 201))
            finished = t + rng.uniform(0.08, 0.9)
        if tries and tries[0][1] is not None:
            first_failed = tries[0][0]
        last = tries[-1] if tries else None
        if last is not None and state != "delivered":
            error, status = last[1], last[2]
        elif state == "delivered":
            status = 201
        dl_rows.append(
            (
                i,
                i,
                dest,
                source,
                f"{source}:{ticket_id}",
                state,
                len(tries),
                next_at,
                first_failed,
                error,
                status,
                ts,
                finished or (last[0] if last else ts),
                finished,
            )
        )
        if len(tries) > 1 or state != "delivered":
            for number, (at, err, code) in enumerate(tries, 1):
                final = number == len(tries)
                outcome = (
                    "retry_scheduled"
                    if not final or state == "retry_wait"
                    else {"delivered": "delivered", "failed": "failed"}.get(state, "expired")
                )
                at_rows.append(
                    (
                        i,
                        number,
                        "scheduled" if number > 1 else "new",
                        at,
                        rng.uniform(40, 10_000)
                        if err and "timeout" in err
                        else rng.uniform(40, 900),
                        code,
                        outcome,
                        err,
                        None if final and state != "retry_wait" else at + 60,
                    )
                )
        if state == "delivered":
            done = finished or ts
            deal = 500_000 + ticket
            ln_rows.append(
                (
                    dest,
                    "deal",
                    f"{source}:ticket:{ticket_id}",
                    str(deal),
                    f"https://{dest}.example.ru/crm/deal/details/{deal}/",
                    i,
                    done,
                    done,
                )
            )
            if email or phone:
                contact = 900_000 + (ticket * 7919) % CLIENTS
                ln_rows.append(
                    (
                        dest,
                        "contact",
                        f"client:{email or phone}",
                        str(contact),
                        f"https://{dest}.example.ru/crm/contact/details/{contact}/",
                        i,
                        done,
                        done,
                    )
                )
        if len(ev_rows) >= 50_000:
            flush()
            print(f"  built {i:,} / {events:,} events", end="\r", flush=True)
    flush()
    print()
    t_rows = time.perf_counter() - t0
    for _name, sql in indexes:
        db.execute(sql)
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    tmp.replace(path)
    meta = {
        "built_at": built_at,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "insert_seconds": round(t_rows, 1),
        "tickets": next_ticket,
        "states": states,
        **counts,
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def cached_store(
    events: int, seed: int, *, rebuild: bool, max_age_h: float
) -> tuple[Path, dict[str, Any], bool]:
    path = cache_path(events, seed)
    meta_path = path.with_suffix(".json")
    if not rebuild and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if time.time() - meta["built_at"] < max_age_h * 3600:
            return path, meta, True
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for old in CACHE_DIR.glob("monitor-*"):
        old.unlink(missing_ok=True)
    print(f"building {path.name} ({events:,} events)", flush=True)
    meta = build_store(path, events, seed)
    print(f"built in {meta['build_seconds']} s", flush=True)
    return path, meta, False


# --- measuring ---------------------------------------------------------------------


def pick_values(db: Path, built_at: float) -> dict[str, str]:
    """Real filter values from the store: a client, a ticket, a cursor in the middle."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (max_id,) = conn.execute("SELECT max(id) FROM deliveries").fetchone()
        email = conn.execute(
            "SELECT client_email FROM events WHERE id > ? AND client_email IS NOT NULL "
            "ORDER BY id LIMIT 1",
            (max_id * 3 // 4,),
        ).fetchone()[0]
        phone = conn.execute(
            "SELECT client_phone FROM events WHERE id > ? AND client_phone IS NOT NULL "
            "ORDER BY id LIMIT 1",
            (max_id // 3,),
        ).fetchone()[0]
        source, ticket = conn.execute(
            "SELECT source, ticket_id FROM events WHERE id > ? AND kind = 'ticket_created' "
            "ORDER BY id LIMIT 1",
            (max_id // 2,),
        ).fetchone()
    finally:
        conn.close()
    # The way a person types it: 8 (999) 001-23-45.
    local = phone[2:]
    spoken = f"8 ({local[:3]}) {local[3:6]}-{local[6:8]}-{local[8:]}"
    return {
        "email": email.upper(),
        "phone": spoken,
        "source": source,
        "ticket": ticket,
        "middle": str(max_id // 2),
        "since": time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - DAY)),
    }


def cases(v: dict[str, str]) -> list[tuple[str, str, str, bool]]:
    """(name, how: api/html, path, counts toward the target)."""
    q = httpx.QueryParams
    return [
        ("overview (JSON)", "api", "/api/v1/overview", True),
        # The same figures counted anew on every request, bypassing the few-second cache.
        ("overview (JSON, fresh count)", "api", "/api/v1/overview?fresh=true", False),
        ("overview page (HTML)", "html", "/", True),
        ("events, first page (JSON)", "api", "/api/v1/events", True),
        ("events page (HTML)", "html", "/events", True),
        ("state=failed", "api", "/api/v1/events?state=failed", True),
        (
            "state=missing & destination",
            "api",
            f"/api/v1/events?{q(state='missing', destination=DESTINATIONS[1])}",
            True,
        ),
        ("client=e-mail", "api", f"/api/v1/events?{q(client=v['email'])}", True),
        ("client=phone", "api", f"/api/v1/events?{q(client=v['phone'])}", True),
        ("ticket=id", "api", f"/api/v1/events?{q(ticket=v['ticket'])}", True),
        ("error=text (common)", "api", f"/api/v1/events?{q(error='timeout')}", True),
        ("error=text (no match)", "api", f"/api/v1/events?{q(error='certificate expired')}", True),
        ("since=yesterday", "api", f"/api/v1/events?{q(since=v['since'])}", True),
        (
            "state=failed & destination (HTML)",
            "html",
            f"/events?{q(state='failed', destination=DESTINATIONS[0])}",
            True,
        ),
        ("deep page (cursor in the middle)", "api", f"/api/v1/events?before={v['middle']}", True),
        ("ticket trace page (HTML)", "html", f"/tickets/{v['source']}/{v['ticket']}", False),
    ]


def login(client: httpx.Client) -> None:
    form = client.get("/login")
    form.raise_for_status()
    found = re.search(r'name="csrf" value="([^"]+)"', form.text)
    if found is None:
        raise RuntimeError("no CSRF token in the login form")
    r = client.post(
        "/login",
        data={"user": USER, "password": PASSWORD, "csrf": found.group(1), "next": "/"},
    )
    if r.status_code != 303:
        raise RuntimeError(f"login answered {r.status_code}")


def percentile(sorted_ms: list[float], p: float) -> float:
    k = max(0, min(len(sorted_ms) - 1, round(p / 100 * len(sorted_ms) + 0.5) - 1))
    return sorted_ms[k]


def measure(
    base: str, items: list[tuple[str, str, str, bool]], rounds: int, warmup: int
) -> list[dict[str, Any]]:
    api = httpx.Client(
        base_url=base, timeout=60, headers={"Authorization": f"Bearer {c.API_TOKEN}"}
    )
    html = httpx.Client(base_url=base, timeout=60)
    times: dict[str, list[float]] = {name: [] for name, *_ in items}
    first: dict[str, float] = {}
    sizes: dict[str, int] = {}
    try:
        login(html)
        for rnd in range(-warmup, rounds):
            for name, how, path, _ in items:
                client = api if how == "api" else html
                t = time.perf_counter()
                r = client.get(path)
                ms = (time.perf_counter() - t) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: {path} answered {r.status_code}: {r.text[:300]}")
                if name not in first:
                    first[name] = ms
                    if how == "api" and "items" in r.json():
                        sizes[name] = len(r.json()["items"])
                if rnd >= 0:
                    times[name].append(ms)
    finally:
        api.close()
        html.close()
    out = []
    for name, how, path, counted in items:
        ms = sorted(times[name])
        out.append(
            {
                "case": name,
                "kind": how,
                "path": path,
                "counts_toward_target": counted,
                "requests": len(ms),
                "rows_on_page": sizes.get(name),
                "first_ms": round(first[name], 1),
                "p50_ms": round(percentile(ms, 50), 1),
                "p95_ms": round(percentile(ms, 95), 1),
                "p99_ms": round(percentile(ms, 99), 1),
                "max_ms": round(ms[-1], 1),
                "mean_ms": round(statistics.fmean(ms), 1),
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="Monitor latency and RSS at 1M events.")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200, help="measured requests per case")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--rebuild", action="store_true", help="build the store even if cached")
    parser.add_argument("--max-age-hours", type=float, default=6.0)
    parser.add_argument("--output", default=NAME, help="results file name (bench/results/)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()

    cached_db, meta, reused = cached_store(
        args.events, args.seed, rebuild=args.rebuild, max_age_h=args.max_age_hours
    )
    watch = c.LoadWatch()
    workdir = Path(tempfile.mkdtemp(prefix="syncd-bench-monitor-"))
    db = workdir / "syncd.db"
    t = time.perf_counter()
    shutil.copyfile(cached_db, db)
    print(f"copied the store to {db} in {time.perf_counter() - t:.1f} s", flush=True)

    from syncd.monitor.passwords import hash_password

    port = c.free_port()
    users = (
        "[[monitor.users]]\n"
        f'name = "{USER}"\n'
        'role = "viewer"\n'
        f'password_hash = "{hash_password(PASSWORD)}"\n'
    )
    config = workdir / "syncd.toml"
    config.write_text(
        bench_config(db=db, port=port, closed_port=c.free_port(), users=users), encoding="utf-8"
    )
    values = pick_values(db, meta["built_at"])
    items = cases(values)
    daemon = c.syncd_child(workdir, config)
    daemon.start()
    sampler = c.RssSampler(daemon.pid)
    sampler.start()
    base = f"http://127.0.0.1:{port}"
    try:
        ready_at = daemon.wait_http(base + "/healthz", timeout=120)
        rss_ready = sampler.peak_mb()
        print(
            f"syncd up in {ready_at - daemon.started_at:.1f} s, RSS {rss_ready} MB; "
            f"{len(items)} cases x {args.requests} requests",
            flush=True,
        )
        t_measure = time.monotonic()
        results = measure(base, items, args.requests, args.warmup)
        measure_s = time.monotonic() - t_measure
        with httpx.Client(base_url=base, timeout=30) as client:
            totals = c.syncd_totals(base, client)
    finally:
        code = daemon.stop()
        sampler.stop()
    counted = [r for r in results if r["counts_toward_target"]]
    worst = max(counted, key=lambda r: r["p95_ms"])
    peak = sampler.peak_mb()
    data = {
        **c.result_header(NAME, watch),
        "store": {
            **meta,
            "file_mb": round(cached_db.stat().st_size / 2**20, 1),
            "reused_cache": reused,
            "age_hours": round((time.time() - meta["built_at"]) / 3600, 2),
            "totals_seen_by_daemon": totals,
        },
        "requests_per_case": args.requests,
        "warmup_rounds": args.warmup,
        "measure_seconds": round(measure_s, 1),
        "filter_values": values,
        "results": results,
        "rss": {
            "peak_mb": peak,
            "after_startup_mb": rss_ready,
            "samples": len(sampler.samples),
            "sample_interval_s": sampler.interval,
        },
        "daemon_exit_code": code,
        "target_p95_ms": TARGET_P95_MS,
        "target_rss_mb": TARGET_RSS_MB,
        "worst_p95": {"case": worst["case"], "p95_ms": worst["p95_ms"]},
        "met": {
            "latency": all(r["p95_ms"] < TARGET_P95_MS for r in counted),
            "rss": peak < TARGET_RSS_MB,
        },
    }
    path = c.write_results(args.output, data)
    print()
    print(
        c.md_table(
            ["case", "first ms", "p50 ms", "p95 ms", "p99 ms", "rows"],
            [
                [
                    r["case"] + ("" if r["counts_toward_target"] else " (not in the target)"),
                    r["first_ms"],
                    r["p50_ms"],
                    r["p95_ms"],
                    r["p99_ms"],
                    "-" if r["rows_on_page"] is None else r["rows_on_page"],
                ]
                for r in results
            ],
        )
    )
    print()
    print(
        f"peak RSS {peak} MB (target < {TARGET_RSS_MB:.0f}); worst p95 {worst['p95_ms']} ms "
        f"({worst['case']}; target < {TARGET_P95_MS:.0f})"
    )
    print(f"other processes on the machine: {data['machine_load']['other_processes_cores']} cores")
    print(f"results: {path}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
