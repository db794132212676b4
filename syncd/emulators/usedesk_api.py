"""A stand-in for Usedesk: the two read methods the poller uses, and the webhooks it would send.

Tests and the demo change tickets through plain methods on
:class:`UsedeskState` (``create_ticket``, ``add_comment``, ``set_status``…).
Each change queues the webhook body Usedesk would POST for it, so a test can
deliver it to syncd, deliver it twice, or lose it and let the poller find
the change. Shapes follow the public documentation: ids mostly as strings,
times as naive ``YYYY-MM-DD HH:MM:SS`` in the account's zone, ``offset`` as a
page index over 100-ticket pages, errors as ``{"error": …}``.

Not confirmed by the documentation, so chosen here: the list is ordered by
ticket id, newest first; a wrong ``api_token`` is answered with HTTP 200 and
an ``error`` body (the answer public clients guard against); an unknown
ticket is HTTP 404.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

PAGE_SIZE = 100
_TIME = "%Y-%m-%d %H:%M:%S"


@dataclass
class UsedeskClient:
    id: int
    name: str
    emails: list[str] = field(default_factory=list)
    #: (number as typed, Usedesk phone type: mobile|home|stationary|fax|other)
    phones: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class UsedeskComment:
    id: int
    ticket_id: int
    message: str
    sender: str  # client | user | trigger
    type: str  # public | private
    user_id: int | None
    client_id: int | None
    is_first: bool
    published_at: datetime


@dataclass
class UsedeskChange:
    id: int
    ticket_id: int
    user_id: int | None
    data: list[dict[str, Any]]
    changed_at: datetime
    old_status: int
    new_status: int


@dataclass
class UsedeskTicket:
    id: int
    subject: str
    status_id: int
    client_id: int
    channel_id: int
    created_at: datetime
    last_updated_at: datetime
    priority: str = "medium"
    type: str = "question"
    assignee_id: int | None = None
    tags: list[str] = field(default_factory=list)
    comments: list[UsedeskComment] = field(default_factory=list)
    changes: list[UsedeskChange] = field(default_factory=list)


@dataclass
class Fault:
    """Fail the next ``count`` requests (to ``path`` only, if set) with ``status``."""

    count: int = 0
    status: int = 503
    retry_after: float | None = None
    body: dict[str, Any] | None = None
    path: str | None = None


def _fmt(when: datetime) -> str:
    return when.strftime(_TIME)


def _flatten(prefix: str, value: Any, pairs: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}[{key}]" if prefix else str(key), item, pairs)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten(f"{prefix}[{index}]", item, pairs)
    elif value is None:
        pairs.append((prefix, ""))
    else:
        pairs.append((prefix, str(value)))


def encode_webhook(body: dict[str, Any], *, form: bool = False) -> tuple[bytes, str]:
    """(content, content type) as Usedesk would POST it: JSON, or form fields when
    "JSON request" is not ticked (``ticket[id]=…`` brackets: the exact form layout is
    not documented)."""
    if not form:
        return json.dumps(body, ensure_ascii=False).encode(), "application/json"
    pairs: list[tuple[str, str]] = []
    _flatten("", body, pairs)
    return urlencode(pairs).encode(), "application/x-www-form-urlencoded"


class UsedeskState:
    """Tickets, clients and pending webhooks; safe to change while the app is serving."""

    def __init__(self, api_token: str, *, timezone: str = "UTC", company_id: int = 153561) -> None:
        self.api_token = api_token
        self.zone = ZoneInfo(timezone)
        self.company_id = company_id
        self.default_channel_id = 63818
        self.tickets: dict[int, UsedeskTicket] = {}
        self.clients: dict[int, UsedeskClient] = {}
        #: Webhook bodies for changes made so far, oldest first (see :meth:`take_webhooks`).
        self.webhooks: list[dict[str, Any]] = []
        #: Every API call as (path, body without the token), for assertions.
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fault = Fault()
        self.lock = threading.RLock()
        self._offset = timedelta()
        self._next_ticket = 2265179
        self._next_comment = 2658287
        self._next_client = 261702
        self._next_change = 991

    # --- clock ---

    def now(self) -> datetime:
        """Usedesk's wall clock: naive, in the account's zone, whole seconds."""
        real = datetime.now(self.zone).replace(tzinfo=None, microsecond=0)
        return real + self._offset

    def advance(self, seconds: float) -> None:
        """Shift the emulator's clock (negative values move it back) for the changes that follow."""
        with self.lock:
            self._offset += timedelta(seconds=seconds)

    # --- changes (each queues its webhook) ---

    def add_client(
        self, name: str, emails: Iterable[str] = (), phones: Iterable[tuple[str, str]] = ()
    ) -> int:
        with self.lock:
            client = UsedeskClient(self._next_client, name, list(emails), list(phones))
            self._next_client += 1
            self.clients[client.id] = client
            return client.id

    def create_ticket(
        self,
        subject: str,
        message: str,
        *,
        client_id: int | None = None,
        status_id: int = 1,
        channel_id: int | None = None,
        tags: Iterable[str] = (),
    ) -> int:
        """A ticket opened by a client's first message; a new client is made if none is given."""
        with self.lock:
            if client_id is None:
                client_id = self.add_client(f"Client {self._next_client}")
            now = self.now()
            ticket = UsedeskTicket(
                id=self._next_ticket,
                subject=subject,
                status_id=status_id,
                client_id=client_id,
                channel_id=channel_id or self.default_channel_id,
                created_at=now,
                last_updated_at=now,
                tags=list(tags),
            )
            self._next_ticket += 1
            self.tickets[ticket.id] = ticket
            self._append_comment(ticket, message, "client", "public", None, is_first=True)
            self.webhooks.append(self.ticket_created_body(ticket.id))
            return ticket.id

    def add_comment(
        self,
        ticket_id: int,
        message: str,
        *,
        sender: str = "client",
        public: bool = True,
        user_id: int | None = None,
    ) -> int:
        """``sender`` is Usedesk's ``from``: client, user (an agent) or trigger (a rule)."""
        with self.lock:
            ticket = self.tickets[ticket_id]
            comment = self._append_comment(
                ticket, message, sender, "public" if public else "private", user_id, False
            )
            ticket.last_updated_at = comment.published_at
            self.webhooks.append(self.comment_created_body(comment.id))
            return comment.id

    def set_status(self, ticket_id: int, status_id: int, *, user_id: int | None = 1) -> int:
        with self.lock:
            ticket = self.tickets[ticket_id]
            entry = {"target": "status_id", "value": status_id, "old_value": ticket.status_id}
            change = self._change(ticket, [entry], new_status=status_id, user_id=user_id)
            return change.id

    def add_tags(self, ticket_id: int, *tags: str, user_id: int | None = 1) -> int:
        with self.lock:
            ticket = self.tickets[ticket_id]
            fresh = [t for t in tags if t not in ticket.tags]
            ticket.tags.extend(fresh)
            entry = {"target": "new_tags", "value": ", ".join(fresh), "old_value": None}
            change = self._change(ticket, [entry], new_status=ticket.status_id, user_id=user_id)
            return change.id

    def set_subject(self, ticket_id: int, subject: str, *, user_id: int | None = 1) -> int:
        with self.lock:
            ticket = self.tickets[ticket_id]
            entry = {"target": "subject", "value": subject, "old_value": ticket.subject}
            ticket.subject = subject
            change = self._change(ticket, [entry], new_status=ticket.status_id, user_id=user_id)
            return change.id

    def rate(self, ticket_id: int, rating: str, comment: str | None = None) -> None:
        """A CSAT answer. It changes nothing the API lists, so only the webhook records it."""
        with self.lock:
            ticket = self.tickets[ticket_id]
            self.webhooks.append(
                {
                    "secret": self.api_token,
                    "csi": {"ticket_id": ticket.id, "rating": rating, "comment": comment},
                    "client": self._client_body(ticket.client_id),
                }
            )

    def take_webhooks(self) -> list[dict[str, Any]]:
        """The queued webhook bodies, oldest first; the queue is emptied."""
        with self.lock:
            taken, self.webhooks = self.webhooks, []
            return taken

    def fail_next(
        self,
        count: int,
        status: int = 503,
        *,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
        path: str | None = None,
    ) -> None:
        with self.lock:
            self.fault = Fault(count, status, retry_after, body, path)

    def _append_comment(
        self,
        ticket: UsedeskTicket,
        message: str,
        sender: str,
        kind: str,
        user_id: int | None,
        is_first: bool,
    ) -> UsedeskComment:
        comment = UsedeskComment(
            id=self._next_comment,
            ticket_id=ticket.id,
            message=message,
            sender=sender,
            type=kind,
            user_id=user_id,
            client_id=ticket.client_id if sender == "client" else None,
            is_first=is_first,
            published_at=self.now(),
        )
        self._next_comment += 1
        ticket.comments.append(comment)
        return comment

    def _change(
        self,
        ticket: UsedeskTicket,
        data: list[dict[str, Any]],
        *,
        new_status: int,
        user_id: int | None,
    ) -> UsedeskChange:
        change = UsedeskChange(
            id=self._next_change,
            ticket_id=ticket.id,
            user_id=user_id,
            data=data,
            changed_at=self.now(),
            old_status=ticket.status_id,
            new_status=new_status,
        )
        self._next_change += 1
        ticket.status_id = new_status
        ticket.last_updated_at = change.changed_at
        ticket.changes.append(change)
        self.webhooks.append(self.ticket_changed_body(change.id))
        return change

    # --- webhook bodies ---

    def _client_body(self, client_id: int) -> dict[str, Any]:
        client = self.clients[client_id]
        return {
            "id": client.id,
            "name": client.name,
            "note": None,
            "emails": [{"email": e} for e in client.emails],
            "phones": [{"phone": p, "type": t} for p, t in client.phones],
            "additional_ids": [],
        }

    def ticket_created_body(self, ticket_id: int) -> dict[str, Any]:
        with self.lock:
            ticket = self.tickets[ticket_id]
            client = self.clients[ticket.client_id]
            return {
                "secret": self.api_token,
                "ticket": {
                    "id": str(ticket.id),
                    "status_id": str(ticket.status_id),
                    "subject": ticket.subject,
                    "client_id": str(ticket.client_id),
                    "assignee_id": None,
                    "group": "0",
                    "last_updated_at": _fmt(ticket.created_at),
                    "channel_id": str(ticket.channel_id),
                    "email": client.emails[0] if client.emails else None,
                    "published_at": _fmt(ticket.created_at),
                    "company_id": str(self.company_id),
                    "additional_id": None,
                    "message": ticket.comments[0].message if ticket.comments else None,
                    "custom_fields": [],
                },
                "client": self._client_body(ticket.client_id),
            }

    def comment_created_body(self, comment_id: int) -> dict[str, Any]:
        with self.lock:
            comment = self._find_comment(comment_id)
            ticket = self.tickets[comment.ticket_id]
            return {
                "secret": self.api_token,
                "comment": {**self._comment_body(comment), "id": comment.id},
                "client": self._client_body(ticket.client_id),
                "custom_fields": [],
                "assignee_id": ticket.assignee_id,
            }

    def ticket_changed_body(self, change_id: int) -> dict[str, Any]:
        with self.lock:
            change = next(c for t in self.tickets.values() for c in t.changes if c.id == change_id)
            ticket = self.tickets[change.ticket_id]
            return {
                "secret": self.api_token,
                "trigger": self._change_body(change),
                "client": self._client_body(ticket.client_id),
                "custom_fields": [],
                "assignee_id": ticket.assignee_id,
            }

    def _find_comment(self, comment_id: int) -> UsedeskComment:
        return next(c for t in self.tickets.values() for c in t.comments if c.id == comment_id)

    def _comment_body(self, comment: UsedeskComment) -> dict[str, Any]:
        # The API documents comment ids as strings and client/ticket ids as numbers.
        return {
            "id": str(comment.id),
            "message": comment.message,
            "from": comment.sender,
            "type": comment.type,
            "user_id": comment.user_id,
            "client_id": comment.client_id,
            "ticket_id": comment.ticket_id,
            "is_first": 1 if comment.is_first else 0,
            "published_at": _fmt(comment.published_at),
            "files": [],
        }

    def _change_body(self, change: UsedeskChange) -> dict[str, Any]:
        return {
            "id": change.id,
            "trigger_id": None,
            "user_id": change.user_id,
            "ticket_id": change.ticket_id,
            "data": change.data,
            "changed_at": _fmt(change.changed_at),
            "old_status": change.old_status,
            "new_status": change.new_status,
            "company_id": self.company_id,
        }

    # --- API answers ---

    def list_item(self, ticket: UsedeskTicket) -> dict[str, Any]:
        client = self.clients[ticket.client_id]
        return {
            "id": str(ticket.id),
            "subject": ticket.subject,
            "status": str(ticket.status_id),
            "priority": ticket.priority,
            "type": ticket.type,
            "client_id": str(ticket.client_id),
            "client_name": client.name,
            "assignee_id": str(ticket.assignee_id) if ticket.assignee_id else None,
            "group": None,
            "channel_id": str(ticket.channel_id),
            "created_at": _fmt(ticket.created_at),
            "last_updated_at": _fmt(ticket.last_updated_at),
            "tags": [{"name": t} for t in ticket.tags],
            "ticket_fields": [],
            "last_comment": ticket.comments[-1].message if ticket.comments else "",
        }

    def detail(self, ticket: UsedeskTicket) -> dict[str, Any]:
        client = self.clients[ticket.client_id]
        return {
            "ticket": {
                "id": str(ticket.id),
                "status_id": str(ticket.status_id),
                "subject": ticket.subject,
                "client_id": str(ticket.client_id),
                "assignee_id": str(ticket.assignee_id) if ticket.assignee_id else None,
                "group": "0",
                "last_updated_at": _fmt(ticket.last_updated_at),
                "email": client.emails[0] if client.emails else "0",
                "published_at": _fmt(ticket.created_at),
                "company_id": str(self.company_id),
                "channel_id": str(ticket.channel_id),
                "priority": ticket.priority,
                "type": ticket.type,
            },
            "comments": [self._comment_body(c) for c in ticket.comments],
            "tags": [{"name": t} for t in ticket.tags],
            "changes": [self._change_body(c) for c in ticket.changes],
            "custom_fields": [],
        }


def _parse_filter_time(value: object) -> datetime | None:
    for layout in ("%Y-%m-%d %H:%M", _TIME, "%Y-%m-%d"):
        try:
            return datetime.strptime(str(value), layout)
        except ValueError:
            continue
    return None


def create_usedesk_api(api_token: str, *, timezone: str = "UTC") -> tuple[FastAPI, UsedeskState]:
    """The app to serve (``ServerThread(app).start()``) and the state to drive it with."""
    state = UsedeskState(api_token, timezone=timezone)
    app = FastAPI(title="Usedesk emulator", docs_url=None, redoc_url=None)

    async def _read(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _refused(path: str, body: dict[str, Any]) -> Response | None:
        """Record the call; answer it with an injected fault or a token error, if due."""
        state.calls.append((path, {k: v for k, v in body.items() if k != "api_token"}))
        fault = state.fault
        if fault.count > 0 and fault.path in (None, path):
            fault.count -= 1
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after else {}
            return JSONResponse(
                fault.body or {"error": "injected failure"},
                status_code=fault.status,
                headers=headers,
            )
        if body.get("api_token") != state.api_token:
            return JSONResponse({"error": "api_token is wrong or missing"}, status_code=200)
        return None

    @app.post("/tickets")
    async def list_tickets(request: Request) -> Response:
        body = await _read(request)
        with state.lock:
            refused = _refused("/tickets", body)
            if refused is not None:
                return refused
            after = before = None
            if body.get("updated_after"):
                after = _parse_filter_time(body["updated_after"])
                if after is None:
                    return JSONResponse({"error": "updated_after: wrong date format"})
            if body.get("updated_before"):
                before = _parse_filter_time(body["updated_before"])
                if before is None:
                    return JSONResponse({"error": "updated_before: wrong date format"})
            try:
                page = int(body.get("offset") or 0)
            except (TypeError, ValueError):
                return JSONResponse({"error": "offset must be a number"})
            channels = {c.strip() for c in str(body.get("fchannel") or "").split(",") if c.strip()}
            statuses = {s.strip() for s in str(body.get("fstatus") or "").split(",") if s.strip()}
            found = [
                t
                for t in sorted(state.tickets.values(), key=lambda t: t.id, reverse=True)
                if (after is None or t.last_updated_at >= after)
                and (before is None or t.last_updated_at <= before)
                and (not channels or str(t.channel_id) in channels)
                and (not statuses or str(t.status_id) in statuses)
            ]
            chunk = found[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
            return JSONResponse([state.list_item(t) for t in chunk])

    @app.post("/ticket")
    async def one_ticket(request: Request) -> Response:
        body = await _read(request)
        with state.lock:
            refused = _refused("/ticket", body)
            if refused is not None:
                return refused
            try:
                ticket = state.tickets.get(int(body.get("ticket_id") or 0))
            except (TypeError, ValueError):
                ticket = None
            if ticket is None:
                return JSONResponse({"error": "Ticket not found"}, status_code=404)
            return JSONResponse(state.detail(ticket))

    return app, state
