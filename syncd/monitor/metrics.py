"""``/metrics`` in Prometheus' text format.

Two kinds of figures: what happens in this process (attempt latency, intake
requests), counted as it happens; and what the store holds (deliveries by state,
backlog, oldest pending, quarantine), read at scrape time so every replica on a
shared PostgreSQL reports the same truth.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from syncd.intake import quarantine
from syncd.replicas import seen
from syncd.retry import outbox
from syncd.store import Store

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _StoreSnapshot(Collector):
    """Yields the gauges read from the store just before this scrape."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.attempt_seconds = Histogram(
            "syncd_attempt_duration_seconds",
            "How long one delivery attempt took (mapping and CRM requests), by its outcome.",
            ["destination", "outcome"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.intake_requests = Counter(
            "syncd_intake_requests_total",
            "Webhook requests received, by source and HTTP status.",
            ["source", "status"],
            registry=self.registry,
        )
        self.intake_writer_crashes = Counter(
            "syncd_intake_writer_crashes",
            "Times the intake writer process exited on its own (it is started again).",
            registry=self.registry,
        )
        self._snapshot = _StoreSnapshot()
        self.registry.register(self._snapshot)

    def observe_attempt(self, destination: str, outcome: str, seconds: float) -> None:
        """The dispatcher's report of one attempt (see ``Dispatcher.on_attempt``)."""
        self.attempt_seconds.labels(destination, outcome).observe(seconds)

    async def render(
        self, store: Store, breakers: dict[str, dict[str, Any]], *, heartbeat: float
    ) -> bytes:
        def _read(conn: Any) -> dict[str, Any]:
            return {
                "counts": outbox.counts_by_state(conn),
                "oldest": outbox.oldest_pending_at(conn),
                "quarantined": quarantine.count_by_source(conn),
                "replicas": [r for r in seen(conn, heartbeat) if r.live],
            }

        data = await store.read(_read)
        now = time.time()
        by_state = GaugeMetricFamily(
            "syncd_deliveries",
            "Deliveries in the store, by destination and state.",
            labels=["destination", "state"],
        )
        backlog = GaugeMetricFamily(
            "syncd_backlog",
            "Deliveries still to send (pending, in flight, retrying).",
            labels=["destination"],
        )
        for dest, states in sorted(data["counts"].items()):
            for state, count in sorted(states.items()):
                by_state.add_metric([dest, state], count)
            backlog.add_metric(
                [dest], sum(states.get(s, 0) for s in ("pending", "in_flight", "retry_wait"))
            )
        oldest = GaugeMetricFamily(
            "syncd_oldest_pending_age_seconds",
            "Age of the oldest delivery not yet finished (0 when none).",
        )
        oldest.add_metric([], 0.0 if data["oldest"] is None else max(0.0, now - data["oldest"]))
        held = GaugeMetricFamily(
            "syncd_quarantined", "Webhooks held in quarantine, by source.", labels=["source"]
        )
        for src, count in sorted(data["quarantined"].items()):
            held.add_metric([src], count)
        breaker = GaugeMetricFamily(
            "syncd_breaker_open",
            "1 while a destination is paused by its circuit breaker.",
            labels=["destination"],
        )
        for dest, info in sorted(breakers.items()):
            until = info.get("paused_until")
            breaker.add_metric([dest], 1.0 if until and until > now else 0.0)
        live = GaugeMetricFamily(
            "syncd_replicas_live",
            "Daemons on this store whose heartbeat is current (each paces at 1/n of CRM limits).",
        )
        live.add_metric([], len(data["replicas"]))
        self._snapshot.families = [by_state, backlog, oldest, held, breaker, live]
        return generate_latest(self.registry)


class IntakeCounter:
    """Plain ASGI middleware (no per-request task) counting ``/hooks/{source}`` answers."""

    def __init__(self, app: ASGIApp, counter: Counter, sources: Iterable[str]) -> None:
        self.app = app
        self.counter = counter
        #: Only configured names become labels: random paths must not grow the series.
        self.sources = frozenset(sources)
        #: One labelled child per (source, status), looked up once: ``labels()`` is not free.
        self._children: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/hooks/"):
            await self.app(scope, receive, send)
            return
        source = path[len("/hooks/") :].split("/", 1)[0]
        if source not in self.sources:
            source = "unknown"

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                key = (source, message["status"])
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self.counter.labels(source, str(key[1]))
                child.inc()
            await send(message)

        await self.app(scope, receive, _send)
