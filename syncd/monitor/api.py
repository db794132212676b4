"""``/api/v1/stats`` and ``/healthz``: what the outbox holds, per destination and state."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from syncd.intake import quarantine
from syncd.intake.reconcile import poll_states
from syncd.retry import outbox
from syncd.store import Store


def monitor_router(store: Store) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/api/v1/stats", tags=["monitor"])
    async def stats() -> dict[str, Any]:
        def _query(conn: Any) -> dict[str, Any]:
            return {
                "destinations": outbox.counts_by_state(conn),
                "oldest_pending_at": outbox.oldest_pending_at(conn),
                "quarantined": quarantine.count_by_source(conn),
                "pollers": poll_states(conn),
            }

        result = await store.read(_query)
        totals: dict[str, int] = {}
        for states in result["destinations"].values():
            for state, count in states.items():
                totals[state] = totals.get(state, 0) + count
        oldest = result["oldest_pending_at"]
        return {
            "destinations": result["destinations"],
            "totals": totals,
            "oldest_pending_age_seconds": None
            if oldest is None
            else round(time.time() - oldest, 3),
            "quarantined": result["quarantined"],
            "pollers": result["pollers"],
        }

    return router
