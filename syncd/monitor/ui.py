"""The web UI: server-rendered pages for managers (read) and admins (resend, re-ingest).

Plain HTML forms and links, no JavaScript framework and nothing from the internet:
every filter is in the URL, so a manager can send a colleague the exact view.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from syncd.intake import quarantine
from syncd.intake.reconcile import poll_states
from syncd.monitor import queries
from syncd.monitor.actions import reingest, resend_deliveries
from syncd.monitor.app import HERE, Monitor, age_text
from syncd.monitor.auth import Forbidden, Principal, TooManyAttempts
from syncd.monitor.i18n import pick_language, translator
from syncd.monitor.plans import keys_for_trace, plan_of
from syncd.replicas import seen
from syncd.retry import outbox

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.autoescape = True

STATE_LABELS = {
    "delivered": "Delivered",
    "pending": "Pending",
    "in_flight": "In flight",
    "retry_wait": "Retrying",
    "failed": "Failed",
    "expired": "Missing",
    "coalesced": "Coalesced",
}
#: Everything the pages need is served by syncd itself: forbid the rest, and framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
EMPTY_FILTER = "an empty filter would resend everything: name at least one condition"
#: States from which an admin may send again (in the air ones are left to the dispatcher).
RESENDABLE = ("delivered", "failed", "expired", "coalesced")


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _language(request: Request, monitor: Monitor) -> str:
    wanted = request.query_params.get("lang")
    if wanted in ("en", "ru") and "session" in request.scope:
        request.session["lang"] = wanted
    chosen = request.session.get("lang") if "session" in request.scope else None
    return pick_language(
        monitor.config.monitor.language, chosen, request.headers.get("accept-language")
    )


def render(
    request: Request,
    monitor: Monitor,
    name: str,
    context: dict[str, Any],
    *,
    principal: Principal | None,
    status_code: int = 200,
) -> HTMLResponse:
    language = _language(request, monitor)
    base = {
        "_": translator(language),
        "lang": language,
        "user": principal,
        "csrf": monitor.auth.csrf_token(request) if "session" in request.scope else "",
        "fmt_time": fmt_time,
        "age": age_text,
        "now": time.time(),
        "qs": lambda params: urlencode({k: v for k, v in params.items() if v not in (None, "")}),
        "state_labels": STATE_LABELS,
        "destinations": sorted(monitor.config.destinations),
        "sources": sorted(monitor.config.sources),
        "path": request.url.path,
    }
    response = templates.TemplateResponse(
        request, name, {**base, **context}, status_code=status_code
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def render_error(request: Request, monitor: Monitor, status: int, message: str) -> HTMLResponse:
    return render(
        request,
        monitor,
        "error.html",
        {"status": status, "message": message},
        principal=monitor.auth.principal(request),
        status_code=status,
    )


def _safe_next(target: str | None) -> str:
    """Only same-site paths: a login link must not bounce the user to someone else's page."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def ui_router(monitor: Monitor) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    auth = monitor.auth
    store = monitor.store

    def admin(request: Request, action: str) -> Principal:
        principal = auth.require(request)
        if not principal.is_admin:
            raise Forbidden(principal, action)
        return principal

    async def form_of(request: Request, principal: Principal) -> dict[str, Any]:
        form = await request.form()
        auth.check_csrf(request, principal, str(form.get("csrf") or "") or None)
        return {k: form.getlist(k) if k == "delivery" else form.get(k) for k in form}

    # --- login ----------------------------------------------------------------------

    @router.get("/login")
    async def login_form(request: Request, next: str = "/") -> Response:
        return render(
            request,
            monitor,
            "login.html",
            {"next": _safe_next(next), "failed": False, "no_users": not auth.has_users},
            principal=None,
        )

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        target = _safe_next(str(form.get("next") or "/"))
        # The login form carries the anonymous session's token too: no login CSRF.
        expected = request.session.get("csrf")
        if not expected or form.get("csrf") != expected:
            return render_error(
                request,
                monitor,
                403,
                "the form is stale or was not sent by this site: reload the page and try again",
            )
        try:
            principal = auth.login(str(form.get("user") or ""), str(form.get("password") or ""))
        except TooManyAttempts as exc:
            response = render(
                request,
                monitor,
                "login.html",
                {"next": target, "failed": False, "no_users": False, "locked": exc.retry_after},
                principal=None,
                status_code=429,
            )
            response.headers["Retry-After"] = str(int(exc.retry_after) + 1)
            return response
        if principal is None:
            return render(
                request,
                monitor,
                "login.html",
                {"next": target, "failed": True, "no_users": not auth.has_users},
                principal=None,
                status_code=401,
            )
        auth.start_session(request, principal)
        return RedirectResponse(target, status_code=303)

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        principal = auth.principal(request)
        if principal is not None:
            await form_of(request, principal)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- overview ---------------------------------------------------------------------

    @router.get("/")
    async def overview_page(request: Request) -> Response:
        principal = auth.require(request)

        def _read(conn: Any) -> dict[str, Any]:
            return {
                "quarantined": quarantine.count_by_source(conn),
                "pollers": poll_states(conn),
                "status": outbox.destination_statuses(conn),
                "replicas": seen(conn, monitor.config.delivery.replica_heartbeat_seconds),
            }

        assert monitor.overview is not None
        data = await store.read(_read)
        ov = data["overview"] = await monitor.overview.get()
        peak = max([1.0] + [h["delivered"] + h["failed"] + h["expired"] for h in ov.hourly])
        return render(
            request,
            monitor,
            "overview.html",
            {
                **data,
                "ov": ov,
                "peak": peak,
                "runtime": monitor.runtime.destinations(),
                "shown_states": list(STATE_LABELS),
            },
            principal=principal,
        )

    # --- events -----------------------------------------------------------------------

    def _filter(request: Request) -> queries.EventFilter:
        return queries.EventFilter.from_url(request.query_params)

    @router.get("/events")
    async def events_page(
        request: Request, before: int | None = None, after: int | None = None
    ) -> Response:
        principal = auth.require(request)
        try:
            flt = _filter(request)
        except ValueError as exc:
            return render_error(request, monitor, 400, str(exc))
        page = await store.read(
            lambda c: queries.list_deliveries(c, flt, before=before, after=after, limit=50)
        )
        return render(
            request,
            monitor,
            "events.html",
            {
                "flt": flt,
                "query": flt.to_query(),
                "page": page,
                "message": request.query_params.get("message"),
                "resendable": RESENDABLE,
            },
            principal=principal,
        )

    @router.get("/events/{event_id}")
    async def event_page(request: Request, event_id: int) -> Response:
        principal = auth.require(request)
        detail = await store.read(lambda c: queries.event_detail(c, event_id))
        if detail is None:
            return render_error(request, monitor, 404, f"no event {event_id}")
        plans = {
            d.destination: plan_of(monitor.config, detail, d.destination) for d in detail.deliveries
        }
        return render(
            request,
            monitor,
            "event.html",
            {
                "ev": detail,
                "plans": plans,
                "payload": json.dumps(detail.payload, ensure_ascii=False, indent=2),
                "message": request.query_params.get("message"),
                "resendable": RESENDABLE,
            },
            principal=principal,
        )

    @router.post("/events/{event_id}/resend")
    async def resend_event(request: Request, event_id: int) -> Response:
        principal = admin(request, "resend")
        form = await form_of(request, principal)
        destination = form.get("destination") or None
        flt = queries.EventFilter(event_id=event_id, destination=destination)

        def _do(conn: Any) -> int:
            ids = [i for chunk in queries.iter_delivery_ids(conn, flt) for i in chunk]
            return resend_deliveries(
                conn,
                ids,
                actor=principal.actor,
                detail={"event": event_id, "destination": destination},
            )

        count = await store.writer.run(_do)
        monitor.wake()
        return RedirectResponse(
            f"/events/{event_id}?{urlencode({'message': f'{count} queued again'})}",
            status_code=303,
        )

    @router.post("/resend/selected")
    async def resend_selected(request: Request) -> Response:
        principal = admin(request, "resend")
        form = await form_of(request, principal)
        ids = [int(v) for v in form.get("delivery", []) if str(v).isdigit()]
        back = _safe_next(str(form.get("back") or "/events"))
        count = await store.writer.run(
            lambda c: resend_deliveries(
                c, ids, actor=principal.actor, detail={"deliveries": ids[:1000]}
            )
        )
        monitor.wake()
        sep = "&" if "?" in back else "?"
        return RedirectResponse(
            f"{back}{sep}{urlencode({'message': f'{count} queued again'})}", status_code=303
        )

    @router.get("/resend/confirm")
    async def resend_confirm(request: Request) -> Response:
        principal = admin(request, "resend")
        try:
            flt = _filter(request)
        except ValueError as exc:
            return render_error(request, monitor, 400, str(exc))
        if flt.is_empty():
            return render_error(request, monitor, 400, EMPTY_FILTER)
        count = await store.read(lambda c: queries.count_deliveries(c, flt))
        return render(
            request,
            monitor,
            "resend_confirm.html",
            {
                "flt": flt,
                "query": flt.to_query(),
                "count": count,
                "window_hours": monitor.config.delivery.retry_window_seconds / 3600,
            },
            principal=principal,
        )

    @router.post("/resend/filter")
    async def resend_filter(request: Request) -> Response:
        principal = admin(request, "resend")
        form = await form_of(request, principal)
        params = json.loads(str(form.get("filter") or "{}"))
        flt = queries.EventFilter.from_query(params)
        if flt.is_empty():
            # As the API refuses it: a forgotten filter must not resend the whole history.
            return render_error(request, monitor, 400, EMPTY_FILTER)
        job = await monitor.jobs.start(flt, actor=principal.actor)
        return RedirectResponse(f"/resend/jobs/{job.id}", status_code=303)

    @router.get("/resend/jobs/{job_id}")
    async def resend_job_page(request: Request, job_id: int) -> Response:
        principal = auth.require(request)
        job = await store.read(lambda c: queries.resend_job(c, job_id))
        if job is None:
            return render_error(request, monitor, 404, f"no resend job {job_id}")
        flt = queries.EventFilter.from_query(_as_query(job.filter))
        return render(
            request,
            monitor,
            "resend_job.html",
            {"job": job, "query": flt.to_query()},
            principal=principal,
        )

    # --- ticket trace -----------------------------------------------------------------

    @router.get("/tickets/{source}/{ticket_id}")
    async def ticket_page(request: Request, source: str, ticket_id: str) -> Response:
        principal = auth.require(request)

        def _read(conn: Any) -> Any:
            first = queries.ticket_trace(conn, source, ticket_id, {})
            if first is None:
                return None
            keys = keys_for_trace(monitor.config, first.events)
            return queries.ticket_trace(conn, source, ticket_id, keys)

        trace = await store.read(_read)
        if trace is None:
            return render_error(
                request, monitor, 404, f"no events of ticket {ticket_id} from {source}"
            )
        latest = trace.events[-1]
        plans = {
            d.destination: plan_of(monitor.config, latest, d.destination) for d in latest.deliveries
        }
        return render(
            request,
            monitor,
            "ticket.html",
            {"trace": trace, "plans": plans, "latest": latest, "landed": landed(trace.links)},
            principal=principal,
        )

    # --- quarantine -------------------------------------------------------------------

    @router.get("/quarantine")
    async def quarantine_page(
        request: Request, state: str = "held", before: int | None = None
    ) -> Response:
        principal = auth.require(request)
        items = await store.read(
            lambda c: quarantine.list_held(
                c, state=None if state == "all" else state, limit=51, before_id=before
            )
        )
        return render(
            request,
            monitor,
            "quarantine.html",
            {
                "items": items[:50],
                "next_cursor": items[49].id if len(items) > 50 else None,
                "state": state,
                "message": request.query_params.get("message"),
            },
            principal=principal,
        )

    @router.get("/quarantine/{item_id}")
    async def quarantine_item(request: Request, item_id: int) -> Response:
        principal = auth.require(request)
        item = await store.read(lambda c: quarantine.get(c, item_id))
        if item is None:
            return render_error(request, monitor, 404, f"no quarantine item {item_id}")
        return render(
            request,
            monitor,
            "quarantine_item.html",
            {
                "item": item,
                "body": item.body.decode("utf-8", errors="replace"),
                "headers": json.dumps(item.headers, ensure_ascii=False, indent=2),
                "message": request.query_params.get("message"),
            },
            principal=principal,
        )

    @router.post("/quarantine/{item_id}/reingest")
    async def quarantine_reingest(request: Request, item_id: int) -> Response:
        principal = admin(request, "reingest")
        await form_of(request, principal)
        message = await reingest(monitor.store, monitor.intake, item_id, actor=principal.actor)
        monitor.wake()
        return RedirectResponse(
            f"/quarantine/{item_id}?{urlencode({'message': message})}", status_code=303
        )

    # --- audit ------------------------------------------------------------------------

    @router.get("/audit")
    async def audit_page(request: Request, before: int | None = None) -> Response:
        principal = auth.require(request)
        rows = await store.read(lambda c: queries.audit_log(c, before=before, limit=101))
        return render(
            request,
            monitor,
            "audit.html",
            {"rows": rows[:100], "next_cursor": rows[99].id if len(rows) > 100 else None},
            principal=principal,
        )

    return router


def landed(found: list[queries.LinkRow]) -> list[queries.LinkRow]:
    """One row per CRM record for "Where it landed".

    A contact is linked under its own key and again under each e-mail and phone it
    was matched by (those aliases carry no URL): show the record once, with its link.
    """
    rows: dict[tuple[str, str, str], queries.LinkRow] = {}
    for link in found:
        key = (link.destination, link.entity, link.crm_id or f"?{link.external_key}")
        seen = rows.get(key)
        if seen is None or (seen.url is None and link.url is not None):
            rows[key] = link
    return list(rows.values())


def _as_query(described: dict[str, Any]) -> dict[str, Any]:
    """An audit/job filter (EventFilter.describe) back into URL parameters."""
    names = {"states": "state", "ticket_id": "ticket"}
    return {names.get(k, k): v for k, v in described.items()}
