"""A stand-in for a Zendesk account: the two exports the poller reads, and the webhooks.

Tickets live in memory and change through Python methods (``create_ticket``,
``update_ticket``, ``add_comment``). Each change also queues the signed
webhook Zendesk would send for it, in trigger form (syncd's documented body)
or event-subscription form, so a test can post it, post it twice, or lose
it and let the poller find the change. Each change is also an audit, listed
by the ticket event export with its comments as child events.

The cursor ticket export answers like the real one: start_time or cursor,
``after_cursor`` / ``end_of_stream``, tickets changed in the last minute left
out (configurable). The ticket event export is time-based: ``start_time``
in (refused when less than a minute old), ``end_time`` / ``end_of_stream``
out, comments only with ``include=comment_events``. Both share Basic auth, injected failures and an
optional per-minute rate limit; ``users/show_many`` answers users' roles.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from syncd.intake.base import RawRequest
from syncd.intake.signing import sign_zendesk
from syncd.intake.zendesk import TRIGGER_BODY_TEMPLATE
from syncd.intake.zendesk_poll import EVENTS_PATH, EXPORT_PATH, ME_PATH, USERS_PATH

WebhookMode = Literal["trigger", "events"]

#: How ``{{ticket.via}}`` displays each channel code (the inverse of the source's table).
VIA_DISPLAY: dict[str, str] = {
    "web": "Web Form",
    "email": "Mail",
    "api": "Web Service",
    "chat": "Chat",
    "voice": "Phone call (incoming)",
}
_STATUS_DISPLAY = {"hold": "On-hold"}
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")
_EDITABLE = {"subject", "status", "priority", "tags", "assignee_id", "group_id"}
_EVENT_FOR_FIELD = {
    "subject": "subject_changed",
    "priority": "priority_changed",
    "tags": "tags_changed",
    "assignee_id": "agent_assignment_changed",
    "group_id": "group_assignment_changed",
}


def iso(ts: float) -> str:
    """Zendesk's timestamp format: UTC, whole seconds, ``Z``."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ZendeskUser:
    id: int
    name: str
    email: str | None = None
    phone: str | None = None
    #: "end-user", "agent" or "admin".
    role: str = "end-user"

    @property
    def is_staff(self) -> bool:
        return self.role != "end-user"


@dataclass
class ZendeskComment:
    id: int
    body: str
    author_id: int
    public: bool
    created_at: float


@dataclass
class ZendeskTicket:
    id: int
    subject: str
    status: str
    requester_id: int
    submitter_id: int
    created_at: float
    updated_at: float
    priority: str | None = None
    tags: list[str] = field(default_factory=list)
    assignee_id: int | None = None
    group_id: int | None = None
    #: Channel code, as ``via.channel`` in the API.
    via: str = "web"
    comments: list[ZendeskComment] = field(default_factory=list)

    def as_api(self, base_url: str) -> dict[str, Any]:
        """The ticket as the export lists it."""
        return {
            "id": self.id,
            "url": f"{base_url}/api/v2/tickets/{self.id}.json",
            "external_id": None,
            "type": None,
            "subject": self.subject,
            "raw_subject": self.subject,
            "description": self.comments[0].body if self.comments else "",
            "priority": self.priority,
            "status": self.status,
            "requester_id": self.requester_id,
            "submitter_id": self.submitter_id,
            "assignee_id": self.assignee_id,
            "organization_id": None,
            "group_id": self.group_id,
            "tags": list(self.tags),
            "custom_fields": [],
            "via": {"channel": self.via, "source": {"from": {}, "to": {}, "rel": None}},
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "generated_timestamp": int(self.updated_at),
        }


@dataclass
class ZendeskAudit:
    """One change to a ticket, as the ticket event export lists it."""

    id: int
    ticket_id: int
    updater_id: int
    created_at: float
    #: ``Create``, ``Change`` and ``Comment`` child events, as the export writes them.
    child_events: list[dict[str, Any]]

    def as_api(self, *, comments: bool) -> dict[str, Any]:
        children = [c for c in self.child_events if comments or c["event_type"] != "Comment"]
        return {
            "id": self.id,
            "ticket_id": self.ticket_id,
            "updater_id": self.updater_id,
            "via": "Web form",
            "event_type": "Audit",
            "created_at": iso(self.created_at),
            "timestamp": int(self.created_at),
            "child_events": children,
        }


@dataclass(frozen=True)
class SignedWebhook:
    """One webhook request as Zendesk would send it. Header names as Zendesk writes them."""

    body: bytes
    headers: dict[str, str]
    ticket_id: int
    #: The trigger's ``event`` value, or the event type after ``zen:event-type:``.
    event: str

    @property
    def invocation_id(self) -> str:
        return self.headers["X-Zendesk-Webhook-Invocation-Id"]

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    def raw(self, received_at: float | None = None) -> RawRequest:
        """As syncd's intake route would hand it to a source (received at the signing time)."""
        stamp = self.headers["X-Zendesk-Webhook-Signature-Timestamp"]
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        return RawRequest(
            body=self.body,
            headers={k.lower(): v for k, v in self.headers.items()},
            received_at=when if received_at is None else received_at,
        )


@dataclass
class ExportFaults:
    """The next ``count`` export requests answer ``status`` (429: with Retry-After if set)."""

    count: int = 0
    status: int = 503
    retry_after: float | None = None
    body: str = '{"error": "injected failure"}'


@dataclass
class ZendeskState:
    email: str
    api_token: str
    #: Signs queued webhooks; None queues none.
    webhook_secret: str | None = None
    webhook_mode: WebhookMode = "trigger"
    page_size: int = 1000
    #: The real export leaves out tickets changed in the last minute; 0 keeps tests fast.
    recent_window_seconds: float = 60.0
    #: The role of the user the API token acts as (``users/me``); exports need "admin".
    api_user_role: str = "admin"
    #: The event export refuses a start_time newer than this many seconds ago.
    min_start_age_seconds: float = 60.0
    #: Export requests allowed per rolling minute (Zendesk: 10); None for no limit.
    rate_limit_per_minute: int | None = None
    clock: Callable[[], float] = time.time
    account_id: int = 1
    webhook_id: str = "01HSYNCDEMULATEDWEBHOOK000"
    tickets: dict[int, ZendeskTicket] = field(default_factory=dict)
    users: dict[int, ZendeskUser] = field(default_factory=dict)
    #: Every change, oldest first, for the ticket event export.
    audits: list[ZendeskAudit] = field(default_factory=list)
    #: Signed webhooks for changes so far, oldest first; see :meth:`drain_webhooks`.
    webhooks: list[SignedWebhook] = field(default_factory=list)
    faults: ExportFaults = field(default_factory=ExportFaults)
    #: Query parameters of every export request that passed authentication.
    export_calls: list[dict[str, str]] = field(default_factory=list)
    #: The same for the ticket event export.
    event_export_calls: list[dict[str, str]] = field(default_factory=list)
    #: The ``ids`` of every ``users/show_many`` request.
    user_lookups: list[str] = field(default_factory=list)
    requests: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    _recent: deque[float] = field(default_factory=deque)
    _next_id: dict[str, int] = field(
        default_factory=lambda: {"ticket": 1001, "user": 5001, "comment": 9001, "audit": 70001}
    )

    # --- the account -------------------------------------------------------------------

    def _new_id(self, kind: str) -> int:
        value = self._next_id[kind]
        self._next_id[kind] = value + 1
        return value

    def add_user(
        self,
        name: str,
        *,
        email: str | None = None,
        phone: str | None = None,
        role: str = "end-user",
    ) -> ZendeskUser:
        with self.lock:
            user = ZendeskUser(self._new_id("user"), name, email, phone, role)
            self.users[user.id] = user
            return user

    def create_ticket(
        self,
        subject: str,
        description: str = "Hello, I need help.",
        *,
        requester_id: int | None = None,
        status: str = "new",
        priority: str | None = None,
        tags: tuple[str, ...] | list[str] = (),
        assignee_id: int | None = None,
        group_id: int | None = None,
        via: str = "web",
    ) -> ZendeskTicket:
        """A new ticket whose description is its first (public) comment by the requester."""
        with self.lock:
            if requester_id is None:
                requester_id = self.add_user("Customer").id
            now = self.clock()
            ticket = ZendeskTicket(
                id=self._new_id("ticket"),
                subject=subject,
                status=status,
                requester_id=requester_id,
                submitter_id=requester_id,
                created_at=now,
                updated_at=now,
                priority=priority,
                tags=list(tags),
                assignee_id=assignee_id,
                group_id=group_id,
                via=via,
            )
            first = ZendeskComment(self._new_id("comment"), description, requester_id, True, now)
            ticket.comments.append(first)
            self.tickets[ticket.id] = ticket
            created = [
                {"event_type": "Create", "field_name": name, "value": _str(getattr(ticket, name))}
                for name in ("subject", "status", "requester_id")
            ]
            self._audit(ticket, requester_id, [*created, _comment_event(first)])
            if self.webhook_mode == "trigger":
                self._queue_trigger(ticket, "ticket_created")
                self._queue_trigger(ticket, "comment_added")
            else:
                self._queue_event(ticket, "created", {})
                self._queue_event(ticket, "comment_added", self._comment_change(ticket))
            return ticket

    def update_ticket(self, ticket_id: int, **changes: Any) -> ZendeskTicket:
        """Change subject, status, priority, tags, assignee_id or group_id; bumps updated_at."""
        unknown = set(changes) - _EDITABLE
        if unknown:
            raise TypeError(f"cannot change {sorted(unknown)}; editable: {sorted(_EDITABLE)}")
        with self.lock:
            ticket = self.tickets[ticket_id]
            before = {name: getattr(ticket, name) for name in changes}
            for name, value in changes.items():
                setattr(ticket, name, list(value) if name == "tags" else value)
            ticket.updated_at = self.clock()
            changed = [name for name in changes if before[name] != getattr(ticket, name)]
            if changed:
                self._audit(
                    ticket,
                    ticket.assignee_id or ticket.requester_id,
                    [
                        {
                            "event_type": "Change",
                            "field_name": name,
                            "value": getattr(ticket, name),
                            "previous_value": before[name],
                        }
                        for name in changed
                    ],
                )
            if self.webhook_mode == "trigger":
                if "status" in changed:
                    self._queue_trigger(ticket, "status_changed")
                elif changed:
                    self._queue_trigger(ticket, "ticket_updated")
            else:
                for name in changed:
                    if name == "status":
                        change = {
                            "current": ticket.status.upper(),
                            "previous": str(before["status"]).upper(),
                        }
                        self._queue_event(ticket, "status_changed", change)
                    else:
                        self._queue_event(ticket, _EVENT_FOR_FIELD[name], {})
            return ticket

    def add_comment(
        self, ticket_id: int, body: str, *, author_id: int, public: bool = True
    ) -> ZendeskComment:
        with self.lock:
            ticket = self.tickets[ticket_id]
            now = self.clock()
            comment = ZendeskComment(self._new_id("comment"), body, author_id, public, now)
            ticket.comments.append(comment)
            ticket.updated_at = now
            self._audit(ticket, author_id, [_comment_event(comment)])
            if self.webhook_mode == "trigger":
                self._queue_trigger(ticket, "comment_added")
            else:
                self._queue_event(ticket, "comment_added", self._comment_change(ticket))
            return comment

    def _audit(
        self, ticket: ZendeskTicket, updater_id: int, children: list[dict[str, Any]]
    ) -> None:
        audit_id = self._new_id("audit")
        for child in children:
            child.setdefault("id", self._new_id("audit"))
            child.setdefault("audit_id", audit_id)
        self.audits.append(
            ZendeskAudit(audit_id, ticket.id, updater_id, ticket.updated_at, children)
        )

    def fail_next(self, count: int, status: int = 503, retry_after: float | None = None) -> None:
        with self.lock:
            self.faults = ExportFaults(count=count, status=status, retry_after=retry_after)

    # --- webhooks ----------------------------------------------------------------------

    def drain_webhooks(self) -> list[SignedWebhook]:
        """The queued webhooks, oldest first; the queue is emptied (a test decides their fate)."""
        with self.lock:
            out, self.webhooks = self.webhooks, []
            return out

    def sign(
        self,
        body: bytes,
        *,
        ticket_id: int,
        event: str,
        invocation_id: str | None = None,
        at: float | None = None,
    ) -> SignedWebhook:
        if self.webhook_secret is None:
            raise RuntimeError("set webhook_secret to produce signed webhooks")
        stamp = iso(self.clock() if at is None else at)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Zendesk Webhook",
            "X-Zendesk-Account-Id": str(self.account_id),
            "X-Zendesk-Webhook-Id": self.webhook_id,
            "X-Zendesk-Webhook-Invocation-Id": invocation_id or str(uuid.uuid4().int)[:12],
            "X-Zendesk-Webhook-Signature": sign_zendesk(self.webhook_secret, stamp, body),
            "X-Zendesk-Webhook-Signature-Timestamp": stamp,
        }
        return SignedWebhook(body=body, headers=headers, ticket_id=ticket_id, event=event)

    def reinvoke(self, hook: SignedWebhook, *, at: float | None = None) -> SignedWebhook:
        """The same body as a second invocation: new invocation id and signing time."""
        return self.sign(hook.body, ticket_id=hook.ticket_id, event=hook.event, at=at)

    def trigger_webhook(self, ticket_id: int, event: str) -> SignedWebhook:
        """The documented trigger body, rendered for the ticket as it is now."""
        with self.lock:
            ticket = self.tickets[ticket_id]
            values = self._placeholders(ticket)
        body = _PLACEHOLDER.sub(
            lambda m: _json_text(values.get(m.group(1), "")), TRIGGER_BODY_TEMPLATE
        )
        body = body.replace('"event": "comment_added"', f'"event": {json.dumps(event)}', 1)
        return self.sign(body.encode(), ticket_id=ticket_id, event=event)

    def event_webhook(
        self, ticket_id: int, action: str, change: dict[str, Any] | None = None
    ) -> SignedWebhook:
        """An event-subscription delivery of ``zen:event-type:ticket.<action>``."""
        with self.lock:
            ticket = self.tickets[ticket_id]
            envelope = {
                "type": f"zen:event-type:ticket.{action}",
                "account_id": self.account_id,
                "id": str(uuid.uuid4()),
                "time": iso(self.clock()),
                "zendesk_event_version": "2022-11-06",
                "subject": f"zen:ticket:{ticket.id}",
                "detail": self._detail(ticket),
                "event": change or {},
            }
        body = json.dumps(envelope).encode()
        return self.sign(body, ticket_id=ticket_id, event=f"ticket.{action}")

    def _queue_trigger(self, ticket: ZendeskTicket, event: str) -> None:
        if self.webhook_secret is not None:
            self.webhooks.append(self.trigger_webhook(ticket.id, event))

    def _queue_event(self, ticket: ZendeskTicket, action: str, change: dict[str, Any]) -> None:
        if self.webhook_secret is not None:
            self.webhooks.append(self.event_webhook(ticket.id, action, change))

    def _comment_change(self, ticket: ZendeskTicket) -> dict[str, Any]:
        comment = ticket.comments[-1]
        author = self.users.get(comment.author_id)
        return {
            "comment": {
                "id": str(comment.id),
                "body": comment.body,
                "is_public": comment.public,
                "author": {
                    "id": str(comment.author_id),
                    "is_staff": author.is_staff if author else False,
                    "name": author.name if author else "",
                },
            }
        }

    def _placeholders(self, ticket: ZendeskTicket) -> dict[str, str]:
        requester = self.users.get(ticket.requester_id)
        latest = ticket.comments[-1] if ticket.comments else None
        return {
            "ticket.id": str(ticket.id),
            "ticket.title": ticket.subject,
            "ticket.status": _STATUS_DISPLAY.get(ticket.status, ticket.status.capitalize()),
            "ticket.priority": (ticket.priority or "").capitalize(),
            "ticket.via": VIA_DISPLAY.get(ticket.via, ticket.via.capitalize()),
            "ticket.tags": " ".join(ticket.tags),
            "ticket.updated_at_with_timestamp": iso(ticket.updated_at),
            "ticket.assignee.id": _str(ticket.assignee_id),
            "ticket.group.id": _str(ticket.group_id),
            "ticket.requester.id": str(ticket.requester_id),
            "ticket.requester.name": requester.name if requester else "",
            "ticket.requester.email": (requester.email or "") if requester else "",
            "ticket.requester.phone": (requester.phone or "") if requester else "",
            "ticket.latest_comment.id": _str(latest.id if latest else None),
            "ticket.latest_comment.value": latest.body if latest else "",
            "ticket.latest_comment.is_public": str(latest.public).lower() if latest else "",
            "ticket.latest_comment.author.id": _str(latest.author_id if latest else None),
        }

    def _detail(self, ticket: ZendeskTicket) -> dict[str, Any]:
        return {
            "actor_id": str(ticket.submitter_id),
            "assignee_id": _str(ticket.assignee_id) or None,
            "brand_id": "1",
            "created_at": iso(ticket.created_at),
            "custom_status": None,
            "description": ticket.comments[0].body if ticket.comments else "",
            "external_id": None,
            "form_id": "1",
            "group_id": _str(ticket.group_id) or None,
            "id": str(ticket.id),
            "is_public": True,
            "organization_id": None,
            "priority": ticket.priority.upper() if ticket.priority else None,
            "requester_id": str(ticket.requester_id),
            "status": ticket.status.upper(),
            "subject": ticket.subject,
            "submitter_id": str(ticket.submitter_id),
            "tags": list(ticket.tags),
            "type": None,
            "updated_at": iso(ticket.updated_at),
            "via": {"channel": ticket.via},
        }

    # --- the export --------------------------------------------------------------------

    def export_page(
        self, start_time: int | None, cursor: str | None, base_url: str
    ) -> dict[str, Any]:
        """One export page; raises ValueError for a bad cursor or missing parameters."""
        with self.lock:
            if cursor is not None:
                position = _decode_cursor(cursor)
            elif start_time is not None:
                position = (float(start_time), -1)
            else:
                raise ValueError("start_time or cursor is required")
            cutoff = self.clock() - self.recent_window_seconds
            eligible = sorted(
                (t for t in self.tickets.values() if (t.updated_at, t.id) > position),
                key=lambda t: (t.updated_at, t.id),
            )
            eligible = [t for t in eligible if t.updated_at <= cutoff]
            page = eligible[: self.page_size]
            if page:
                position = (page[-1].updated_at, page[-1].id)
            after = _encode_cursor(position)
            return {
                "tickets": [t.as_api(base_url) for t in page],
                "after_cursor": after,
                "after_url": f"{base_url}{EXPORT_PATH}?cursor={after}",
                "before_cursor": None,
                "before_url": None,
                "end_of_stream": len(eligible) <= self.page_size,
            }

    def event_export_page(self, start_time: int, *, comments: bool) -> dict[str, Any]:
        """One page of the time-based ticket event export, from ``start_time`` (inclusive)."""
        with self.lock:
            cutoff = self.clock() - self.recent_window_seconds
            eligible = [
                a for a in self.audits if start_time <= int(a.created_at) and a.created_at <= cutoff
            ]
            page = eligible[: self.page_size]
            # A page ends on a whole second: the next starts at that second again.
            end_time = int(page[-1].created_at) if page else start_time
            return {
                "ticket_events": [a.as_api(comments=comments) for a in page],
                "count": len(page),
                "end_time": end_time,
                "end_of_stream": len(eligible) <= self.page_size,
                "next_page": None,
            }

    def users_by_id(self, ids: list[int]) -> list[dict[str, Any]]:
        with self.lock:
            return [
                {"id": u.id, "name": u.name, "email": u.email, "role": u.role}
                for u in (self.users.get(i) for i in ids)
                if u is not None
            ]

    def _rate_limited(self) -> float | None:
        """Seconds until a slot frees up, if this request is over the per-minute limit."""
        if self.rate_limit_per_minute is None:
            return None
        now = self.clock()
        while self._recent and now - self._recent[0] >= 60:
            self._recent.popleft()
        if len(self._recent) >= self.rate_limit_per_minute:
            return max(1.0, 60 - (now - self._recent[0]))
        self._recent.append(now)
        return None


def _comment_event(comment: ZendeskComment) -> dict[str, Any]:
    return {
        "id": comment.id,
        "event_type": "Comment",
        "type": "Comment",
        "author_id": comment.author_id,
        "body": comment.body,
        "plain_body": comment.body,
        "html_body": f"<p>{comment.body}</p>",
        "public": comment.public,
        "attachments": [],
        "created_at": iso(comment.created_at),
    }


def _str(value: int | None) -> str:
    return "" if value is None else str(value)


def _json_text(value: str) -> str:
    """A placeholder's value inside a JSON string (Zendesk escapes it in JSON bodies)."""
    return json.dumps(value)[1:-1]


def _encode_cursor(position: tuple[float, int]) -> str:
    text = f"{position[0]!r}|{position[1]}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, ticket = text.partition("|")
        return float(stamp), int(ticket)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError(f"cursor {cursor!r} is not one this export issued") from None


def create_zendesk_api(
    email: str,
    api_token: str,
    *,
    webhook_secret: str | None = None,
    webhook_mode: WebhookMode = "trigger",
    page_size: int = 1000,
    recent_window_seconds: float = 60.0,
    clock: Callable[[], float] = time.time,
) -> tuple[FastAPI, ZendeskState]:
    state = ZendeskState(
        email=email,
        api_token=api_token,
        webhook_secret=webhook_secret,
        webhook_mode=webhook_mode,
        page_size=page_size,
        recent_window_seconds=recent_window_seconds,
        clock=clock,
    )
    app = FastAPI(title="Zendesk emulator", docs_url=None, redoc_url=None)
    expected = "Basic " + base64.b64encode(f"{email}/token:{api_token}".encode()).decode()

    def refused(request: Request, *, export: bool) -> Response | None:
        """Authentication, injected failures and (for the exports) the per-minute limit."""
        state.requests += 1
        if request.headers.get("authorization") != expected:
            return JSONResponse({"error": "Couldn't authenticate you"}, status_code=401)
        if not export:
            return None
        faults = state.faults
        if faults.count > 0:
            faults.count -= 1
            headers = (
                {"Retry-After": f"{faults.retry_after:g}"} if faults.retry_after is not None else {}
            )
            return Response(
                faults.body, status_code=faults.status, media_type="application/json",
                headers=headers,
            )  # fmt: skip
        wait = state._rate_limited()
        if wait is not None:
            return JSONResponse(
                {
                    "error": "APIRateLimitExceeded",
                    "description": "Number of allowed incremental export API requests "
                    "per minute exceeded",
                },
                status_code=429,
                headers={"Retry-After": str(int(wait))},
            )
        return None

    def bad_start(start: str | None) -> Response | None:
        if start is not None and not start.isdigit():
            return JSONResponse(
                {"error": "InvalidValue", "description": "start_time must be unix seconds"},
                status_code=400,
            )
        return None

    @app.get(EXPORT_PATH)
    async def export(request: Request) -> Response:
        with state.lock:
            if (answer := refused(request, export=True)) is not None:
                return answer
            query = dict(request.query_params)
            state.export_calls.append(query)
        start = query.get("start_time")
        if (answer := bad_start(start)) is not None:
            return answer
        base = str(request.base_url).rstrip("/")
        try:
            page = state.export_page(int(start) if start else None, query.get("cursor"), base)
        except ValueError as exc:
            return JSONResponse(
                {"error": "InvalidPaginationParameter", "description": str(exc)}, status_code=400
            )
        return JSONResponse(page)

    @app.get(EVENTS_PATH)
    async def event_export(request: Request) -> Response:
        with state.lock:
            if (answer := refused(request, export=True)) is not None:
                return answer
            query = dict(request.query_params)
            state.event_export_calls.append(query)
        start = query.get("start_time")
        if start is None:
            return JSONResponse(
                {"error": "InvalidValue", "description": "start_time is required"}, status_code=400
            )
        if (answer := bad_start(start)) is not None:
            return answer
        if int(start) > state.clock() - state.min_start_age_seconds:
            return JSONResponse(
                {
                    "error": "InvalidValue",
                    "description": "Too recent start_time. Use a start_time older than a minute",
                },
                status_code=400,
            )
        included = query.get("include", "").split(",")
        page = state.event_export_page(int(start), comments="comment_events" in included)
        return JSONResponse(page)

    @app.get(ME_PATH)
    async def me(request: Request) -> Response:
        with state.lock:
            state.requests += 1
            if request.headers.get("authorization") != expected:
                # Zendesk answers unknown credentials here with the anonymous user.
                anonymous = {"id": None, "name": "Anonymous user", "role": "end-user"}
                return JSONResponse({"user": anonymous})
            user = {"id": 1, "name": "API user", "email": state.email, "role": state.api_user_role}
        return JSONResponse({"user": user})

    @app.get(USERS_PATH)
    async def show_many(request: Request) -> Response:
        with state.lock:
            if (answer := refused(request, export=False)) is not None:
                return answer
            ids = request.query_params.get("ids", "")
            state.user_lookups.append(ids)
        parts = [p for p in ids.split(",") if p]
        if not parts or not all(p.isdigit() for p in parts) or len(parts) > 100:
            return JSONResponse(
                {"error": "InvalidValue", "description": "ids: 1 to 100 numbers, comma-separated"},
                status_code=400,
            )
        return JSONResponse({"users": state.users_by_id([int(p) for p in parts])})

    return app, state
