"""CRM throughput: ticket events/s that ``syncd run`` delivers into the Bitrix24 and amoCRM
emulators under their real rate limits, against the ceiling those limits allow.

Each CRM in turn, with a fresh daemon and a fresh emulator:

* the emulator (``syncd.emulators.bitrix24`` / ``.amocrm``) is served over real HTTP
  by uvicorn on a thread of this process, with its documented limit: Bitrix24 a
  leaky bucket draining 2 requests/s with a burst of 50 (503 ``QUERY_LIMIT_EXCEEDED``
  above it), amoCRM 7 requests in any second (429 above it);
* ``syncd run`` runs as a subprocess with its default delivery settings
  (concurrency 16) and the connector's default pacing; one ``generic`` source;
* phase **new**: the outbox is pre-filled (as intake stores them) with N
  ``ticket_created`` events, each a new ticket from a new client with its first
  message: contact look-up, contact, deal, timeline note;
* phase **follow-up**: once those are delivered, R rounds (``--follow-up-rounds``);
  each round posts N ``comment_added`` events to ``/hooks/helpdesk`` (one per ticket,
  each with its own comment id and a status, so nothing is coalesced): a deal update
  and a note each. A round starts once the previous one is delivered, so a ticket
  never has two pending events. Each round is measured on its own; the phase's rate
  is its rounds' events over their windows' seconds added up.

Measured from the emulator's own state, sampled every 50 ms: requests, requests
refused by the limit, and (from the SQLite file) events delivered. The rate of a phase
counts only what happens after the burst is spent (see ``steady``).

Run: ``.venv/bin/python bench/crm.py [--crm bitrix24,amocrm] [--tickets amocrm=300]
[--follow-up-rounds bitrix24=1,amocrm=4]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

from syncd.connectors.amocrm import PACING_WINDOW
from syncd.emulators.amocrm import PIPELINE_ID, STAGES, create_amocrm_emulator
from syncd.emulators.bitrix24 import create_bitrix24_emulator
from syncd.emulators.serving import ServerThread

NAME = "crm"
TARGET = 0.90
AMO_TOKEN = "bench-amo-long-lived-token-0001"
#: Follow-up rounds per CRM unless ``--follow-up-rounds`` says otherwise.
DEFAULT_ROUNDS = "bitrix24=1,amocrm=4"
#: Bitrix24's batch takes at most this many commands; amoCRM's bulk writes 50 (recommended).
B24_BATCH = 50
AMO_BULK = 50


# --- the workload --------------------------------------------------------------------


def new_ticket(i: int) -> dict[str, Any]:
    return {
        "event": "ticket_created",
        "ticket_id": f"B{i:05d}",
        "subject": f"Order {1000 + i} is late",
        "status": "new",
        "channel": "email",
        "client": {
            "id": f"C{i:05d}",
            "name": f"Client Number{i}",
            "email": f"client{i}@example.com",
            "phone": f"+7 999 {100 + i // 10000:03d}-{(i // 100) % 100:02d}-{i % 100:02d}",
        },
        "comment": {"id": f"B{i:05d}-0", "text": f"Hello, my order {1000 + i} is late"},
    }


def follow_up(i: int, round_: int = 1) -> dict[str, Any]:
    """Round ``round_`` (from 1) of ticket ``i``'s follow-ups: its own comment id, a status."""
    return {
        "event": "comment_added",
        "ticket_id": f"B{i:05d}",
        "status": "open",
        "client": new_ticket(i)["client"],
        "comment": {
            "id": f"B{i:05d}-{round_}",
            "text": f"We are on it ({round_})",
            "author": "agent",
        },
    }


# --- one CRM -----------------------------------------------------------------------------


@dataclass
class Crm:
    """An emulator, how to read it, and the limit it enforces."""

    name: str
    server: ServerThread
    requests: Callable[[], int]
    refused: Callable[[], int]
    breakdown: Callable[[], dict[str, int]]
    records: Callable[[], dict[str, int]]
    destination: str
    #: Requests per second after the burst, and the burst.
    rate: float
    burst: int
    #: The connector's own pacing (rate, burst) with its default settings.
    client_rate: float
    client_burst: int
    notes: list[str] = field(default_factory=list)


def bitrix24() -> Crm:
    app, state = create_bitrix24_emulator(rate_per_second=2.0, burst=50)
    server = ServerThread(app).start()

    def requests() -> int:
        with state.lock:
            return state.requests

    def refused() -> int:
        with state.lock:
            return state.rate_limited

    def breakdown() -> dict[str, int]:
        with state.lock:
            return dict(state.calls)

    def records() -> dict[str, int]:
        with state.lock:
            return {
                "contacts": len(state.contacts),
                "deals": len(state.deals),
                "notes": len(state.comments),
                "max_deals_per_ticket": max(state.deals_per_origin().values(), default=0),
            }

    stages = {"new": "C2:NEW", "open": "C2:PREPARATION", "pending": "C2:EXECUTING"}
    stages |= {"solved": "C2:WON", "closed": "C2:WON", "spam": "C2:LOSE"}
    destination = (
        f'[destinations.{c.DESTINATION}]\nkind = "bitrix24"\n'
        f'webhook_url = "{server.url}{state.webhook_path()}"\n' + _mapping("2", "C2:NEW", stages)
    )
    return Crm(
        "bitrix24", server, requests, refused, breakdown, records, destination, 2.0, 50, 2.0, 40
    )


def amocrm() -> Crm:
    app, state = create_amocrm_emulator(long_lived_token=AMO_TOKEN, rate_limit=7.0)
    server = ServerThread(app).start()

    def requests() -> int:
        with state.lock:
            return len(state.requests)

    def refused() -> int:
        with state.lock:
            return state.rate_limited

    def breakdown() -> dict[str, int]:
        with state.lock:
            seen = list(state.requests)
        out: Counter[str] = Counter()
        for method, path in seen:
            parts = [p if not p.isdigit() else "{id}" for p in path.split("?")[0].split("/")]
            out[f"{method} {'/'.join(parts)}"] += 1
        return dict(out)

    def records() -> dict[str, int]:
        with state.lock:
            return {
                "contacts": len(state.contacts),
                "deals": len(state.leads),
                "notes": len(state.notes),
            }

    s = {k: str(v) for k, v in STAGES.items()}
    stages = {"new": s["new"], "open": s["open"], "pending": s["waiting"]}
    stages |= {"solved": s["won"], "closed": s["won"], "spam": s["lost"]}
    destination = (
        f'[destinations.{c.DESTINATION}]\nkind = "amocrm"\n'
        f'base_url = "{server.url}"\naccess_token = "{AMO_TOKEN}"\n'
        + _mapping(str(PIPELINE_ID), s["new"], stages)
    )
    # The connector's default pacing: 7 requests in any PACING_WINDOW s, all 7 at once.
    return Crm(
        "amocrm",
        server,
        requests,
        refused,
        breakdown,
        records,
        destination,
        7.0,
        7,
        round(7 / PACING_WINDOW, 3),
        7,
    )


def _mapping(pipeline: str, initial: str, stages: dict[str, str]) -> str:
    prefix = f"destinations.{c.DESTINATION}.mapping"
    lines = [
        f"[{prefix}.pipelines.support]",
        f'id = "{pipeline}"',
        f'initial_stage = "{initial}"',
        f"[{prefix}.pipelines.support.stages]",
        *(f'{k} = "{v}"' for k, v in stages.items()),
        f"[[{prefix}.rules]]",
        'name = "all"',
        'then.pipeline = "support"',
        'then.timeline = "all"',
        "",
    ]
    return "\n".join(lines)


# --- running --------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    requests: int
    refused: int
    delivered: int


class Sampler(threading.Thread):
    """Emulator counters and delivered events every ``interval`` s, on a thread."""

    def __init__(self, crm: Crm, db: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.crm, self.db, self.interval = crm, db, interval
        self.samples: list[Sample] = []
        self.stop_flag = threading.Event()

    def delivered(self) -> int:
        if not self.db.exists():
            return 0
        return c.db_count(
            self.db, "SELECT count(*) FROM deliveries WHERE state IN ('delivered', 'coalesced')"
        )

    def run(self) -> None:
        while not self.stop_flag.wait(self.interval):
            self.samples.append(
                Sample(time.monotonic(), self.crm.requests(), self.crm.refused(), self.delivered())
            )


def wait_for(sampler: Sampler, total: int, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if sampler.samples and sampler.samples[-1].delivered >= total:
            return True
        time.sleep(0.05)
    return False


def prefill(config: Path, bodies: list[dict[str, Any]]) -> None:
    """Store events as intake would (parsed by the configured source, then enqueued)."""
    import os

    from syncd.config import load_config, resolve_store_url
    from syncd.events import IncomingEvent
    from syncd.intake import registry
    from syncd.intake.base import RawRequest
    from syncd.retry import outbox
    from syncd.store import Store

    os.environ.setdefault("SYNCD_BENCH_SECRET", c.SECRET)
    cfg = load_config(config)
    source = registry.build(c.SOURCE, cfg.sources[c.SOURCE], default_region="RU")
    headers = {"x-syncd-secret": c.SECRET, "content-type": "application/json"}
    now = time.time()
    incoming = [
        IncomingEvent.from_ticket_event(event, (c.DESTINATION,))
        for body in bodies
        for event in source.parse(
            RawRequest(body=json.dumps(body).encode(), headers=headers, received_at=now)
        )
    ]
    store = Store(resolve_store_url(cfg))
    try:
        store.migrate()
        store.write_sync(lambda conn: [outbox.enqueue(conn, item, now) for item in incoming])
    finally:
        store.close()


@dataclass
class Window:
    """What happened between two samples, unrounded."""

    seconds: float
    events: int
    requests: int
    refused: int

    def __add__(self, other: Window) -> Window:
        return Window(
            self.seconds + other.seconds,
            self.events + other.events,
            self.requests + other.requests,
            self.refused + other.refused,
        )

    def report(self) -> dict[str, Any]:
        seconds = self.seconds
        return {
            "window_seconds": round(seconds, 2),
            "events": self.events,
            "requests": self.requests,
            "events_per_second": round(self.events / seconds, 3) if seconds > 0 else None,
            "requests_per_second": round(self.requests / seconds, 3) if seconds > 0 else None,
            "refused_in_window": self.refused,
        }


def window(samples: list[Sample], start: int, end: int, skip_requests: int) -> Window:
    """The phase's window once ``skip_requests`` of its requests are spent (the burst).

    ``start``/``end``: sample indexes of the phase's first and last sample. The window
    opens at the first sample where the phase has used ``skip_requests`` requests, and
    closes at the sample where its last event was delivered.
    """
    first = samples[start]
    last = samples[end]
    opened = next(
        (s for s in samples[start : end + 1] if s.requests - first.requests >= skip_requests),
        first,
    )
    return Window(
        last.t - opened.t,
        last.delivered - opened.delivered,
        last.requests - opened.requests,
        last.refused - opened.refused,
    )


def steady(samples: list[Sample], start: int, end: int, skip_requests: int) -> dict[str, Any]:
    """:func:`window`, reported."""
    return window(samples, start, end, skip_requests).report()


@dataclass
class Round:
    """Sample indexes of one follow-up round: before its first webhook, after its last
    webhook was accepted, and when its last event was delivered."""

    number: int
    start: int
    posted: int
    end: int
    complete: bool


def run_crm(crm: Crm, tickets: int, rounds: int, workdir: Path, limit: float) -> dict[str, Any]:
    wd = workdir / crm.name
    wd.mkdir()
    port = c.free_port()
    config = wd / "syncd.toml"
    config.write_text(
        c.syncd_config(port=port, receiver_url=None, with_destination=False) + crm.destination,
        encoding="utf-8",
    )
    prefill(config, [new_ticket(i) for i in range(tickets)])
    sampler = Sampler(crm, wd / "syncd.db")
    # Sampling starts before the daemon: its first requests (the burst) come at once.
    sampler.start()
    daemon = c.syncd_child(wd, config).start()
    base = f"http://127.0.0.1:{port}"
    phases: dict[str, Any] = {}
    try:
        daemon.wait_http(base + "/healthz")
        # phase "new": the backlog drains; the burst is spent here
        t0 = time.monotonic()
        done_new = wait_for(sampler, tickets, limit)
        end_new = len(sampler.samples) - 1
        # phase "follow-up": rounds of one more event per ticket, posted as webhooks; a
        # round starts once the previous one is delivered (one pending event per ticket).
        done_rounds: list[Round] = []
        with httpx.Client(base_url=base, timeout=10) as client:
            for number in range(1, rounds + 1) if done_new else ():
                start = len(sampler.samples) - 1
                for i in range(tickets):
                    r = client.post(
                        f"/hooks/{c.SOURCE}",
                        json=follow_up(i, number),
                        headers={"X-Syncd-Secret": c.SECRET},
                    )
                    r.raise_for_status()
                # From here the round is a backlog; before, it trickled in as posted.
                posted = len(sampler.samples) - 1
                done = wait_for(sampler, tickets * (1 + number), limit)
                done_rounds.append(Round(number, start, posted, len(sampler.samples) - 1, done))
                if not done:
                    break
        done_follow = len(done_rounds) == rounds and all(r.complete for r in done_rounds)
        total_s = time.monotonic() - t0
        time.sleep(0.3)  # anything late (a retry) shows in the counters
    finally:
        code = daemon.stop(signal.SIGTERM)
        sampler.stop_flag.set()
        sampler.join()
    samples = sampler.samples
    first = samples[0]
    # The burst: what the CRM lets through at once, less what the client keeps in reserve.
    burst_used = min(crm.burst, crm.client_burst)
    new = steady(samples, 0, end_new, burst_used)
    # Each round's share is taken once all its follow-ups have arrived (a backlog, like the
    # new phase); the rate from its first webhook on, arrival included, is kept beside it.
    # The phase: the rounds' events (and requests) over the sum of their windows' seconds.
    per_round = []
    follow, follow_with_arrival = Window(0.0, 0, 0, 0), Window(0.0, 0, 0, 0)
    whole = Window(0.0, 0, 0, 0)
    for rd in done_rounds:
        backlog = window(samples, rd.posted, rd.end, 0)
        arrival = window(samples, rd.start, rd.end, 0)
        span = Window(
            samples[rd.end].t - samples[rd.start].t,
            tickets,
            samples[rd.end].requests - samples[rd.start].requests,
            samples[rd.end].refused - samples[rd.start].refused,
        )
        follow += backlog
        follow_with_arrival += arrival
        whole += span
        per_round.append(
            {
                "round": rd.number,
                "complete": rd.complete,
                "events": tickets,
                "requests": span.requests,
                "seconds": round(span.seconds, 2),
                "refused": span.refused,
                "steady": backlog.report(),
                "with_arrival": arrival.report(),
            }
        )
    start_follow = done_rounds[0].start if done_rounds else len(samples) - 1
    phases["new"] = {
        "complete": done_new,
        "events": tickets,
        "requests": samples[end_new].requests - first.requests,
        "seconds": round(samples[end_new].t - first.t, 2),
        "refused": samples[end_new].refused - first.refused,
        "steady": new,
    }
    phases["follow_up"] = {
        "complete": done_follow,
        "rounds": rounds,
        "rounds_run": len(done_rounds),
        "events": tickets * len(done_rounds),
        "requests": whole.requests,
        "seconds": round(whole.seconds, 2),
        "refused": whole.refused,
        "steady": follow.report(),
        "with_arrival": follow_with_arrival.report() if done_rounds else None,
        "per_round": per_round,
    }
    refused_after_burst = (
        new["refused_in_window"] + samples[-1].refused - samples[start_follow].refused
    )
    return {
        "crm": crm.name,
        "limit": {"requests_per_second": crm.rate, "burst": crm.burst},
        "client_pacing": {"rate_per_second": crm.client_rate, "burst": crm.client_burst},
        "tickets": tickets,
        "follow_up_rounds": rounds,
        # One note per event (each carries one message): the new ticket's and each round's.
        "expected_notes": tickets * (1 + len(done_rounds)),
        "phases": phases,
        "refused_total": samples[-1].refused - first.refused,
        "refused_after_burst": refused_after_burst,
        "requests_by_method": crm.breakdown(),
        "records": crm.records(),
        "total_seconds": round(total_s, 1),
        "exit_code": code,
        "log": str(daemon.log_path),
    }


def per_crm(spec: str) -> dict[str, int]:
    """``bitrix24=1500,amocrm=300`` -> ``{"bitrix24": 1500, "amocrm": 300}``."""
    return {
        name.strip(): int(count)
        for name, _, count in (part.partition("=") for part in spec.split(","))
        if name.strip()
    }


# --- ceilings ------------------------------------------------------------------------------


def ceilings(name: str, rate: float, concurrency: int = 16) -> dict[str, dict[str, Any]]:
    """Events/s the limit allows, per phase: one event per request vs events sharing one.

    ``per_event``: each event's writes in one request (Bitrix24 ``batch``, amoCRM
    ``/leads/complex``), but never two events in one request: what syncd's design
    can reach. ``shared``: several events' commands in one request (a ``batch`` of up
    to 50 commands; amoCRM's bulk endpoints take 50 records), with at most
    ``concurrency`` events in flight at once, as the dispatcher runs them.
    """
    if name == "bitrix24":
        # new: a look-up batch (contact by ORIGIN_ID, by e-mail, by phone: 3 commands),
        # then a write batch (contact.add, deal.add, comment.add: 3 commands).
        # follow-up: one batch (deal.update, comment.add: 2 commands).
        new_req, follow_req = 2, 1
        new_shared = 2 / min(B24_BATCH // 3, concurrency)
        follow_shared = 1 / min(B24_BATCH // 2, concurrency)
    else:
        # new: GET contacts?query=<e-mail>, GET contacts?query=<phone>, POST leads/complex,
        # POST leads/{id}/notes. follow-up: PATCH leads, POST leads/{id}/notes.
        # Shared: the searches stay one per value (query takes one); complex, PATCH leads and
        # POST leads/notes take up to 50 records each.
        new_req, follow_req = 4, 2
        new_shared = 2 + 2 / min(AMO_BULK, concurrency)
        follow_shared = 2 / min(AMO_BULK, concurrency)
    return {
        "new": {
            "requests_per_event": new_req,
            "per_event": rate / new_req,
            "shared_requests_per_event": round(new_shared, 4),
            "shared": rate / new_shared,
        },
        "follow_up": {
            "requests_per_event": follow_req,
            "per_event": rate / follow_req,
            "shared_requests_per_event": round(follow_shared, 4),
            "shared": rate / follow_shared,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="syncd into the CRM emulators, rate-limited.")
    parser.add_argument("--crm", default="bitrix24,amocrm", help="comma-separated")
    parser.add_argument(
        "--tickets",
        default="bitrix24=1500,amocrm=300",
        help="new tickets (and as many follow-ups) per CRM, e.g. bitrix24=1500,amocrm=300; "
        "enough that the burst is spent early in each phase",
    )
    parser.add_argument(
        "--follow-up-rounds",
        default=DEFAULT_ROUNDS,
        help=f"follow-up rounds per CRM (default {DEFAULT_ROUNDS}; a CRM left out keeps its "
        "default): each round posts one more comment_added per ticket once the previous "
        "round is delivered, and is measured on its own",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=150.0,
        help="seconds allowed per phase (per round in the follow-up phase)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()

    watch = c.LoadWatch()
    workdir = Path(tempfile.mkdtemp(prefix="syncd-bench-crm-"))
    tickets = per_crm(args.tickets)
    rounds = per_crm(DEFAULT_ROUNDS) | per_crm(args.follow_up_rounds)
    print(
        f"crm benchmark: tickets per CRM {tickets}, follow-up rounds {rounds}, work dir {workdir}",
        flush=True,
    )
    makers = {"bitrix24": bitrix24, "amocrm": amocrm}
    results = []
    for name in [n.strip() for n in args.crm.split(",") if n.strip()]:
        crm = makers[name]()
        try:
            result = run_crm(crm, tickets[name], rounds[name], workdir, args.limit)
        finally:
            crm.server.stop()
        ceiling = ceilings(name, crm.rate)
        for phase in ("new", "follow_up"):
            eps = result["phases"][phase]["steady"]["events_per_second"] or 0.0
            ceil = ceiling[phase]
            result["phases"][phase]["ceiling"] = ceil
            result["phases"][phase]["share_of_per_event_ceiling"] = round(
                eps / ceil["per_event"], 3
            )
            result["phases"][phase]["share_of_shared_ceiling"] = round(eps / ceil["shared"], 3)
        for rd in result["phases"]["follow_up"]["per_round"]:
            eps = rd["steady"]["events_per_second"] or 0.0
            rd["share_of_shared_ceiling"] = round(eps / ceiling["follow_up"]["shared"], 3)
        result["met"] = {
            phase: result["phases"][phase]["share_of_shared_ceiling"] >= TARGET
            for phase in ("new", "follow_up")
        } | {"no_refusals_after_burst": result["refused_after_burst"] == 0}
        results.append(result)
        for phase in ("new", "follow_up"):
            p = result["phases"][phase]
            print(
                f"  {name} {phase}: {p['steady']['events_per_second']} events/s after the burst "
                f"({p['share_of_per_event_ceiling']:.0%} of one-event-per-request ceiling "
                f"{p['ceiling']['per_event']:.2f}; {p['share_of_shared_ceiling']:.0%} of shared "
                f"ceiling {p['ceiling']['shared']:.2f}); {p['requests']} requests for "
                f"{p['events']} events; refused {p['refused']}",
                flush=True,
            )
            for rd in p.get("per_round", []):
                s = rd["steady"]
                print(
                    f"    round {rd['round']}: {s['events_per_second']} events/s over "
                    f"{s['window_seconds']} s ({rd['share_of_shared_ceiling']:.1%} of shared "
                    f"ceiling; {rd['with_arrival']['events_per_second']} events/s with arrival); "
                    f"{rd['requests']} requests for {rd['events']} events; "
                    f"refused {rd['refused']}",
                    flush=True,
                )
        print(
            f"  {name}: records {result['records']} (notes expected "
            f"{result['expected_notes']}); requests {result['requests_by_method']}"
        )
    data = {
        **c.result_header(NAME, watch),
        "concurrency": 16,
        "target_share": TARGET,
        "results": results,
    }
    path = c.write_results(NAME, data)
    print(f"results: {path}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = all(
        r["phases"][p]["complete"]
        and r["records"]["deals"] == tickets[r["crm"]]
        and r["records"]["notes"] == r["expected_notes"]
        for r in results
        for p in ("new", "follow_up")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
