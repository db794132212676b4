"""The JSON API under ``/api/v1`` (described at ``/api/v1/openapi.json``) and the ops endpoints.

Every ``/api/v1`` call needs a login: a session cookie (then POSTs also need the
``X-CSRF-Token`` header) or ``Authorization: Bearer <token>`` from ``[[monitor.tokens]]``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from syncd.intake import quarantine
from syncd.intake.reconcile import poll_states
from syncd.monitor import queries
from syncd.monitor.actions import reingest, resend_deliveries
from syncd.monitor.app import Monitor
from syncd.monitor.auth import Forbidden, Principal
from syncd.monitor.plans import keys_for_trace, plan_of
from syncd.preview import preview
from syncd.replicas import seen
from syncd.retry import outbox
from syncd.store import head_revision


class ResendRequest(BaseModel):
    """Either explicit delivery ids, or a filter (the events list's query parameters)."""

    delivery_ids: list[int] = Field(default_factory=list, max_length=10_000)
    filter: dict[str, str | list[str]] | None = None


def _iso_event(detail: queries.EventDetail) -> dict[str, Any]:
    out = asdict(detail)
    for key in ("received_at", "occurred_at"):
        out[key] = queries.iso(out[key])
    for d in out["deliveries"]:
        for key in ("next_attempt_at", "first_failed_at", "created_at", "finished_at"):
            d[key] = queries.iso(d[key])
        for a in d["tries"]:
            a["started_at"] = queries.iso(a["started_at"])
            a["next_attempt_at"] = queries.iso(a["next_attempt_at"])
    return out


def api_router(monitor: Monitor) -> APIRouter:
    router = APIRouter()
    store, config, auth = monitor.store, monitor.config, monitor.auth

    def viewer(request: Request) -> Principal:
        return auth.require(request)

    def admin(action: str) -> Any:
        def _check(request: Request) -> Principal:
            principal = auth.require(request)
            if not principal.is_admin:
                raise Forbidden(principal, action)
            auth.check_csrf(request, principal, request.headers.get("x-csrf-token"))
            return principal

        return _check

    def event_filter(request: Request) -> queries.EventFilter:
        try:
            return queries.EventFilter.from_url(request.query_params)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    # --- ops ----------------------------------------------------------------------------

    @router.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is alive and serving HTTP."""
        return {"status": "ok"}

    @router.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        """The store answers, its schema is the one this version expects, and the
        intake writer is running."""
        try:
            revision = await store.read(lambda c: store.revision_of(c))
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "store": f"unreachable: {type(exc).__name__}"},
                status_code=503,
            )
        expected = head_revision()
        if revision != expected:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "store": f"schema {revision}, expected {expected}: run `syncd migrate`",
                },
                status_code=503,
            )
        if monitor.intake is not None and not monitor.intake.accepting:
            return JSONResponse(
                {"status": "unavailable", "intake_writer": "being started again"},
                status_code=503,
            )
        return JSONResponse({"status": "ready", "schema": revision})

    # --- read -----------------------------------------------------------------------------

    @router.get("/api/v1/stats", tags=["monitor"])
    async def stats(_: Principal = Depends(viewer)) -> dict[str, Any]:
        """Counts per destination and state, oldest pending age, quarantine, pollers, replicas."""

        def _query(conn: Any) -> dict[str, Any]:
            return {
                "destinations": outbox.counts_by_state(conn),
                "oldest_pending_at": outbox.oldest_pending_at(conn),
                "quarantined": quarantine.count_by_source(conn),
                "pollers": poll_states(conn),
                "destination_status": outbox.destination_statuses(conn),
                "replicas": seen(conn, config.delivery.replica_heartbeat_seconds),
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
            "replicas": [asdict(r) for r in result["replicas"]],
        }

    @router.get("/api/v1/overview", tags=["monitor"])
    async def overview(
        fresh: bool = Query(
            False, description="count now instead of using figures up to a few seconds old"
        ),
        _: Principal = Depends(viewer),
    ) -> dict[str, Any]:
        """What the overview page shows: counts per destination and source, 24 h by hour, lag."""
        assert monitor.overview is not None
        ov = await monitor.overview.get(fresh=fresh)
        return {
            "generated_at": queries.iso(ov.generated_at),
            "totals": ov.totals,
            "by_destination_and_source": [
                {"destination": dest, "source": src, "counts": counts}
                for (dest, src), counts in sorted(ov.counts.items())
            ],
            "hourly": [{**h, "hour": queries.iso(h["hour"])} for h in ov.hourly],
            "oldest_pending_at": queries.iso(ov.oldest_pending_at),
            "lag_seconds": ov.lag_seconds,
            "runtime": monitor.runtime.destinations(),
        }

    @router.get("/api/v1/events", tags=["monitor"])
    async def list_events(
        flt: queries.EventFilter = Depends(event_filter),
        before: int | None = Query(None, description="next_cursor of the previous page"),
        after: int | None = Query(None, description="prev_cursor, to page back"),
        limit: int = Query(50, ge=1, le=queries.MAX_PAGE),
        state: list[str] = Query(
            [],
            description="delivered, pending, in_flight, retry_wait "
            "(retrying), failed, expired (missing), coalesced",
        ),
        destination: str | None = None,
        source: str | None = None,
        ticket: str | None = None,
        client: str | None = Query(None, description="the client's e-mail or phone"),
        error: str | None = Query(None, description="text within the last error"),
        since: str | None = Query(None, description="ISO time or epoch seconds (UTC)"),
        until: str | None = None,
        _: Principal = Depends(viewer),
    ) -> dict[str, Any]:
        """One page of events (one row per event and destination), newest first."""
        page = await store.read(
            lambda c: queries.list_deliveries(c, flt, before=before, after=after, limit=limit)
        )
        return {
            "items": [r.as_json() for r in page.rows],
            "next_cursor": page.next_cursor,
            "prev_cursor": page.prev_cursor,
            "filter": flt.to_query(),
        }

    @router.get("/api/v1/events/{event_id}", tags=["monitor"])
    async def get_event(event_id: int, _: Principal = Depends(viewer)) -> dict[str, Any]:
        """One event: payload, deliveries, every attempt, and the plan the current config makes."""
        detail = await store.read(lambda c: queries.event_detail(c, event_id))
        if detail is None:
            raise HTTPException(404, f"no event {event_id}")
        out = _iso_event(detail)
        out["plans"] = {
            d.destination: plan_of(config, detail, d.destination) for d in detail.deliveries
        }
        return out

    @router.get("/api/v1/tickets/{source}/{ticket_id}", tags=["monitor"])
    async def get_ticket(
        source: str, ticket_id: str, _: Principal = Depends(viewer)
    ) -> dict[str, Any]:
        """Everything about one ticket, and the CRM records it landed in (with links)."""

        def _read(conn: Any) -> queries.TicketTrace | None:
            first = queries.ticket_trace(conn, source, ticket_id, {})
            if first is None:
                return None
            return queries.ticket_trace(
                conn, source, ticket_id, keys_for_trace(config, first.events)
            )

        trace = await store.read(_read)
        if trace is None:
            raise HTTPException(404, f"no events of ticket {ticket_id!r} from {source!r}")
        return {
            "source": trace.source,
            "ticket_id": trace.ticket_id,
            "links": [asdict(link) for link in trace.links],
            "events": [_iso_event(e) for e in trace.events],
        }

    @router.get("/api/v1/quarantine", tags=["monitor"])
    async def list_quarantine(
        state: Literal["held", "reingested", "discarded", "all"] = "held",
        source: str | None = None,
        before: int | None = None,
        limit: int = Query(50, ge=1, le=queries.MAX_PAGE),
        _: Principal = Depends(viewer),
    ) -> dict[str, Any]:
        """Webhooks that passed authentication but could not be read, newest first."""
        items = await store.read(
            lambda c: quarantine.list_held(
                c,
                state=None if state == "all" else state,
                source=source,
                limit=limit + 1,
                before_id=before,
            )
        )
        return {
            "items": [
                {
                    "id": i.id,
                    "source": i.source,
                    "received_at": queries.iso(i.received_at),
                    "state": i.state,
                    "reason": i.reason,
                    "event_ids": i.event_ids,
                }
                for i in items[:limit]
            ],
            "next_cursor": items[limit - 1].id if len(items) > limit else None,
        }

    @router.get("/api/v1/quarantine/{item_id}", tags=["monitor"])
    async def get_quarantine(item_id: int, _: Principal = Depends(viewer)) -> dict[str, Any]:
        item = await store.read(lambda c: quarantine.get(c, item_id))
        if item is None:
            raise HTTPException(404, f"no quarantine item {item_id}")
        return {
            "id": item.id,
            "source": item.source,
            "received_at": queries.iso(item.received_at),
            "state": item.state,
            "reason": item.reason,
            "headers": item.headers,
            "query": item.query,
            "body": item.body.decode("utf-8", errors="replace"),
            "event_ids": item.event_ids,
        }

    @router.get("/api/v1/audit", tags=["monitor"])
    async def get_audit(
        before: int | None = None,
        limit: int = Query(100, ge=1, le=queries.MAX_PAGE),
        _: Principal = Depends(viewer),
    ) -> dict[str, Any]:
        """Who resent or re-ingested what, and who was refused, newest first."""
        rows = await store.read(lambda c: queries.audit_log(c, before=before, limit=limit + 1))
        return {
            "items": [{**asdict(r), "at": queries.iso(r.at)} for r in rows[:limit]],
            "next_cursor": rows[limit - 1].id if len(rows) > limit else None,
        }

    @router.get("/api/v1/resend/jobs/{job_id}", tags=["resend"])
    async def get_resend_job(job_id: int, _: Principal = Depends(viewer)) -> dict[str, Any]:
        job = await store.read(lambda c: queries.resend_job(c, job_id))
        if job is None:
            raise HTTPException(404, f"no resend job {job_id}")
        return {
            **asdict(job),
            "created_at": queries.iso(job.created_at),
            "finished_at": queries.iso(job.finished_at),
        }

    # --- write ----------------------------------------------------------------------------

    @router.post("/api/v1/events/{event_id}/resend", tags=["resend"])
    async def resend_event(
        event_id: int,
        destination: str | None = None,
        principal: Principal = Depends(admin("resend")),
    ) -> dict[str, Any]:
        """Queue one event again (every destination, or one), with a fresh retry window."""
        flt = queries.EventFilter(event_id=event_id, destination=destination)

        def _do(conn: Any) -> int | None:
            ids = [i for chunk in queries.iter_delivery_ids(conn, flt) for i in chunk]
            if not ids:
                return None
            return resend_deliveries(
                conn,
                ids,
                actor=principal.actor,
                detail={"event": event_id, "destination": destination},
            )

        count = await store.writer.run(_do)
        if count is None:
            raise HTTPException(404, f"no deliveries of event {event_id}")
        monitor.wake()
        return {"queued": count}

    @router.post("/api/v1/resend", tags=["resend"], status_code=202)
    async def resend(
        body: ResendRequest, principal: Principal = Depends(admin("resend"))
    ) -> dict[str, Any]:
        """Resend deliveries by id (at once) or by filter (in the background: poll the job)."""
        if body.delivery_ids and body.filter is not None:
            raise HTTPException(422, "give delivery_ids or filter, not both")
        if body.filter is not None:
            try:
                flt = queries.EventFilter.from_query(body.filter)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            if flt.is_empty():
                raise HTTPException(
                    422, "an empty filter would resend everything: name at least one condition"
                )
            job = await monitor.jobs.start(flt, actor=principal.actor)
            return {
                "job": job.id,
                "total": job.total,
                "status_url": f"/api/v1/resend/jobs/{job.id}",
            }
        if not body.delivery_ids:
            raise HTTPException(422, "give delivery_ids or filter")
        ids = body.delivery_ids
        count = await store.writer.run(
            lambda c: resend_deliveries(
                c, ids, actor=principal.actor, detail={"deliveries": ids[:1000]}
            )
        )
        monitor.wake()
        return {"queued": count, "requested": len(ids)}

    @router.post("/api/v1/quarantine/{item_id}/reingest", tags=["resend"])
    async def reingest_item(
        item_id: int, principal: Principal = Depends(admin("reingest"))
    ) -> dict[str, Any]:
        """Parse a quarantined webhook again with the current config."""
        message = await reingest(monitor.store, monitor.intake, item_id, actor=principal.actor)
        monitor.wake()
        return {"result": message}

    @router.post("/api/v1/preview", tags=["mapping"])
    async def preview_plan(
        request: Request,
        source: str,
        destination: str | None = None,
        client: Literal["new", "existing", "unknown"] = "unknown",
        _: Principal = Depends(viewer),
    ) -> dict[str, Any]:
        """The plan the request body would produce, without storing it or calling the CRM."""
        if destination is not None and destination not in config.destinations:
            raise HTTPException(404, f"no destination named {destination!r}")
        result = preview(
            config, source, await request.body(), destination=destination, client=client
        )
        if "plans" not in result and result.get("error", "").startswith("no source"):
            raise HTTPException(404, result["error"])
        return result

    return router
