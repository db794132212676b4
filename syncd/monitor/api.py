"""``/api/v1/stats`` and ``/healthz``: what the outbox holds, per destination and state."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request

from syncd.config import Config
from syncd.intake import quarantine
from syncd.intake.reconcile import poll_states
from syncd.preview import preview
from syncd.retry import outbox
from syncd.store import Store


def monitor_router(store: Store, config: Config | None = None) -> APIRouter:
    router = APIRouter()

    @router.post("/api/v1/preview", tags=["mapping"])
    async def preview_plan(
        request: Request,
        source: str,
        destination: str | None = None,
        client: Literal["new", "existing", "unknown"] = "unknown",
    ) -> dict[str, Any]:
        """The plan the request body would produce, without storing it or calling the CRM."""
        if config is None:
            return {"error": "preview needs the daemon's config"}
        if destination is not None and destination not in config.destinations:
            raise HTTPException(404, f"no destination named {destination!r}")
        result = preview(
            config, source, await request.body(), destination=destination, client=client
        )
        if "plans" not in result and result.get("error", "").startswith("no source"):
            raise HTTPException(404, result["error"])
        return result

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
                "destination_status": outbox.destination_statuses(conn),
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
            "destination_status": result["destination_status"],
        }

    return router
