"""SIGKILL the daemon again and again while 2,000 events flow: nothing lost or duplicated."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import Faults, SinkState

from .harness import Daemon

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVENTS = 2000
TICKETS = 400
KILLS = 6


def script(rng: random.Random) -> list[dict[str, object]]:
    """Per ticket: created, then comments and status changes, in order."""
    per_ticket: list[list[dict[str, object]]] = [[] for _ in range(TICKETS)]
    for i in range(EVENTS):
        t = i % TICKETS
        kind = (
            "ticket_created"
            if not per_ticket[t]
            else rng.choice(["comment_added", "status_changed"])
        )
        body: dict[str, object] = {"event_uid": f"u{i}", "event": kind, "ticket_id": 10_000 + t}
        if kind == "comment_added":
            body["comment"] = f"comment {i}"
        else:
            body["status"] = rng.choice(["open", "pending", "solved"])
        per_ticket[t].append(body)
    # interleave tickets but keep each ticket's own order
    out: list[dict[str, object]] = []
    cursors = [0] * TICKETS
    while len(out) < EVENTS:
        t = rng.randrange(TICKETS)
        if cursors[t] < len(per_ticket[t]):
            out.append(per_ticket[t][cursors[t]])
            cursors[t] += 1
    return out


def test_random_sigkills_lose_nothing_and_duplicate_nothing(
    daemon_factory: Callable[..., Daemon], authed_sink: tuple[ServerThread, SinkState]
) -> None:
    _, sink = authed_sink
    # a little latency on every request, so kills land while requests are in the air
    sink.faults = Faults(latency_seconds=0.004)
    rng = random.Random(20261125)
    events = script(rng)
    d = daemon_factory(concurrency=16, lease=10.0, timeout=2.0).start()

    accepted: set[str] = set()
    sender_error: list[BaseException] = []

    def send_all() -> None:
        # Like a helpdesk: re-send until a 202 says the event is durable.
        try:
            with httpx.Client(timeout=5) as client:
                for body in events:
                    while True:
                        try:
                            r = client.post(
                                f"{d.url}/hooks/helpdesk",
                                json=body,
                                headers={"X-Syncd-Secret": "e2e-hook-secret-7f3a9c"},
                            )
                            if r.status_code == 202:
                                accepted.add(str(body["event_uid"]))
                                break
                        except httpx.TransportError:
                            pass
                        time.sleep(0.02)
        except BaseException as exc:  # surfaced in the main thread
            sender_error.append(exc)

    sender = threading.Thread(target=send_all)
    sender.start()
    kills = 0
    while kills < KILLS:
        time.sleep(rng.uniform(0.3, 1.2))
        d.kill()
        kills += 1
        d.start()
    sender.join(120)
    assert not sender.is_alive() and not sender_error
    assert len(accepted) == EVENTS

    # An event folded into a later send of its ticket ends "coalesced" (docs/delivery.md).
    totals = d.wait_for(lambda t: t["delivered"] + t["coalesced"] == EVENTS, limit=180)
    assert sum(totals.values()) == EVENTS  # each event stored exactly once, all delivered
    with d.db() as conn:
        orphans = conn.execute(
            "SELECT count(*) FROM deliveries f LEFT JOIN deliveries c ON c.id = f.coalesced_into"
            " WHERE f.state = 'coalesced' AND (c.state IS NULL OR c.state != 'delivered')"
        ).fetchone()[0]
    assert orphans == 0  # every coalesced event was carried by a delivered one
    snap = sink.snapshot()
    assert sink.duplicate_creates() == {}
    n_comments = sum(1 for e in events if e["event"] == "comment_added")
    assert snap["by_entity"] == {"deal": TICKETS, "note": n_comments}
    # the kills really interrupted deliveries
    with d.db() as conn:
        abandoned = conn.execute(
            "SELECT count(*) FROM attempts WHERE outcome='abandoned'"
        ).fetchone()[0]
    assert d.starts == KILLS + 1
    assert abandoned > 0, "no kill caught a delivery in flight; the test proved nothing"
