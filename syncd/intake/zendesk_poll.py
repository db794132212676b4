"""Polling Zendesk: ticket states from the cursor ticket export, comments from the event export.

The ticket export (``/api/v2/incremental/tickets/cursor.json``) carries each
changed ticket's state but none of its comments. A lost ``comment_added``
webhook is therefore recovered from the ticket event export
(``/api/v2/incremental/ticket_events.json?include=comment_events``), which
lists every audit with its comments as child events. A poll reads the ticket
export to its end, then the event export to its end; one stored cursor holds
where each stands.

Zendesk's comments do not say whether their author is staff, so each author's
role is looked up once (``/api/v2/users/show_many.json``) and remembered.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx

from syncd.connectors.http import classified, error_for_response
from syncd.errors import AccessDenied, RateLimited, ServerError
from syncd.intake.base import PolledTicket, Poller, PollPage
from syncd.intake.base import text_value as _text
from syncd.intake.generic import parse_time
from syncd.ticket import AuthorKind, Comment, EventKind, TicketEvent, as_id

if TYPE_CHECKING:
    from syncd.intake.zendesk import ZendeskSource

EXPORT_PATH = "/api/v2/incremental/tickets/cursor.json"
ME_PATH = "/api/v2/users/me.json"
EVENTS_PATH = "/api/v2/incremental/ticket_events.json"
USERS_PATH = "/api/v2/users/show_many.json"
#: Used when a 429 from an export carries no Retry-After: its limit is counted per minute.
DEFAULT_RATE_LIMIT_WAIT = 60.0
#: The event export refuses a start_time less than a minute old; a newer one is moved back.
EVENTS_MIN_AGE_SECONDS = 60
#: ``show_many`` takes up to 100 ids.
USERS_PER_REQUEST = 100
#: Author roles remembered between polls; agents repeat, so a small cache answers most.
ROLE_CACHE_SIZE = 10_000

Phase = Literal["tickets", "comments"]


@dataclass(frozen=True)
class PollCursor:
    """Where each export stands, and which one the poll is reading now.

    Stored as JSON. A bare string is a ticket export cursor stored before
    comments were polled; it is read as such, and the event export starts
    at the look-back.
    """

    tickets: str | None = None
    comments_since: int | None = None
    phase: Phase = "tickets"

    def dump(self) -> str:
        return json.dumps(
            {"v": 1, "tickets": self.tickets, "comments_since": self.comments_since,
             "phase": self.phase},
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def load(cls, text: str | None) -> PollCursor:
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except ValueError:
            return cls(tickets=text)
        if not isinstance(data, dict) or data.get("v") != 1:
            return cls(tickets=text)
        since = data.get("comments_since")
        phase: Phase = "comments" if data.get("phase") == "comments" else "tickets"
        tickets = data.get("tickets")
        return cls(
            tickets=tickets if isinstance(tickets, str) else None,
            comments_since=since if isinstance(since, int) else None,
            phase=phase,
        )


class ZendeskPoller(Poller):
    """Pages through the ticket export, then the comment events, from one stored cursor."""

    def __init__(
        self,
        source: ZendeskSource,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = source.settings
        assert settings.email is not None and settings.api_token is not None
        self.source = source
        self.interval = settings.poll_interval_seconds
        self.lookback = settings.poll_lookback_seconds
        self.comments = settings.poll_comments
        self.clock = clock
        self._roles: OrderedDict[str, str] = OrderedDict()
        self._client = httpx.AsyncClient(
            base_url=settings.api_base,
            auth=httpx.BasicAuth(f"{settings.email}/token", settings.api_token.get_secret_value()),
            timeout=settings.request_timeout_seconds,
            transport=transport,
            headers={"Accept": "application/json"},
        )

    async def check(self) -> list[str]:
        """Who the token signs in as: the incremental exports need an admin."""
        data = await self._get(ME_PATH, {}, "user", shape=dict)
        user = data["user"]
        if user.get("id") is None:
            # Zendesk answers bad credentials here with the anonymous user, not a 401.
            raise AccessDenied("Zendesk did not accept the email and API token")
        role = str(user.get("role") or "unknown")
        who = f"{user.get('email') or user.get('name')} ({role})"
        if role != "admin":
            raise AccessDenied(
                f"the token signs in as {who}; the incremental exports need an admin's token"
            )
        return [f"signed in as {who}"]

    async def fetch(self, cursor: str | None) -> PollPage:
        at = PollCursor.load(cursor)
        if at.phase == "comments" and self.comments:
            return await self._comment_page(at)
        data = await self._get(
            EXPORT_PATH,
            {"cursor": at.tickets}
            if at.tickets is not None
            else {"start_time": int(self.clock() - self.lookback)},
            "tickets",
        )
        tickets: list[PolledTicket] = []
        for raw in data["tickets"]:
            event = self.source.ticket_event(raw) if isinstance(raw, dict) else None
            # A ticket without an id or change time cannot be reconciled; skipping it
            # keeps the cursor moving instead of failing every poll on it.
            if event is None or event.occurred_at is None:
                continue
            tickets.append(PolledTicket(event.ticket_id, event.occurred_at, [event]))
        after = _text(data.get("after_cursor"))
        # Without a cursor to go on from, asking again would return this page again.
        done = data.get("end_of_stream") is True or after is None
        at = replace(at, tickets=after or at.tickets, phase="tickets")
        if done and self.comments:
            return PollPage(tickets, cursor=replace(at, phase="comments").dump(), done=False)
        return PollPage(tickets, cursor=at.dump(), done=done)

    async def _comment_page(self, at: PollCursor) -> PollPage:
        now = self.clock()
        since = at.comments_since
        if since is None:
            since = int(now - self.lookback)
        # Moved back, the last minute is read again: its comments are already held
        # and known by their ids, so nothing is stored twice.
        since = min(since, int(now) - EVENTS_MIN_AGE_SECONDS)
        finished = replace(at, comments_since=since, phase="tickets")
        data = await self._get(
            EVENTS_PATH, {"start_time": since, "include": "comment_events"}, "ticket_events"
        )
        found = _comments(data["ticket_events"])
        await self._learn_roles({c.author_id for _, c in found if c.author_id is not None})
        by_ticket: dict[str, list[TicketEvent]] = {}
        for ticket_id, one in found:
            by_ticket.setdefault(ticket_id, []).append(self._event(ticket_id, one))
        tickets = [
            PolledTicket(ticket_id, max(e.occurred_at or _EPOCH for e in events), events)
            for ticket_id, events in by_ticket.items()
        ]
        end = data.get("end_time")
        moved = isinstance(end, int) and end > since
        if moved:
            assert isinstance(end, int)
            finished = replace(finished, comments_since=end)
        if data.get("end_of_stream") is True or not moved:
            # Not moved yet not at the end: more than a page shares one second. Asking
            # again now would return the same page; the next poll tries once more.
            return PollPage(tickets, cursor=finished.dump(), done=True)
        return PollPage(tickets, cursor=replace(finished, phase="comments").dump(), done=False)

    def _event(self, ticket_id: str, found: _Found) -> TicketEvent:
        role = self._roles.get(found.author_id or "")
        author = AuthorKind.CLIENT if role in (None, "end-user") else AuthorKind.AGENT
        comment = Comment(
            id=found.id, text=found.body, author=author, author_id=found.author_id,
            public=found.public,
        )  # fmt: skip
        return TicketEvent(
            source=self.source.name,
            ticket_id=ticket_id,
            kind=EventKind.COMMENT_ADDED,
            comment=comment,
            occurred_at=found.at,
            delivery_id=comment_delivery_id(found.id),
        )

    async def _learn_roles(self, authors: set[str]) -> None:
        """Look up the roles of authors not seen before, a hundred per request."""
        unknown = sorted(a for a in authors if a not in self._roles)
        for start in range(0, len(unknown), USERS_PER_REQUEST):
            chunk = unknown[start : start + USERS_PER_REQUEST]
            data = await self._get(USERS_PATH, {"ids": ",".join(chunk)}, "users")
            for user in data["users"]:
                if isinstance(user, dict) and (user_id := as_id(user.get("id"))):
                    self._remember(user_id, str(user.get("role") or "end-user"))
            for user_id in chunk:
                # A deleted user is not listed; count them as the client, like the webhook.
                if user_id not in self._roles:
                    self._remember(user_id, "end-user")
        for author in authors:
            if author in self._roles:
                self._roles.move_to_end(author)

    def _remember(self, user_id: str, role: str) -> None:
        self._roles[user_id] = role
        while len(self._roles) > ROLE_CACHE_SIZE:
            self._roles.popitem(last=False)

    async def _get(
        self, path: str, params: dict[str, Any], key: str, *, shape: type = list
    ) -> dict[str, Any]:
        """GET from Zendesk; errors classified, and the body checked to hold ``key``."""
        async with classified():
            response = await self._client.get(path, params=params)
        error = error_for_response(response)
        if isinstance(error, RateLimited) and error.retry_after is None:
            error = RateLimited(
                error.message, status_code=error.status_code, retry_after=DEFAULT_RATE_LIMIT_WAIT
            )
        if error is not None:
            raise error
        try:
            data = response.json()
        except ValueError:
            raise ServerError(
                f"Zendesk {path} answered with a body that is not JSON",
                status_code=response.status_code,
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get(key), shape):
            raise ServerError(
                f"Zendesk {path} answered without a {key!r} {shape.__name__}",
                status_code=response.status_code,
            )
        return data

    async def aclose(self) -> None:
        await self._client.aclose()


def comment_delivery_id(comment_id: str) -> str:
    """One key per Zendesk comment, whichever way it arrives (trigger, event or poll)."""
    return f"comment:{comment_id}"


@dataclass(frozen=True)
class _Found:
    id: str
    body: str
    author_id: str | None
    public: bool
    at: datetime | None


_EPOCH = datetime.fromtimestamp(0, tz=UTC)


def _comments(audits: list[Any]) -> list[tuple[str, _Found]]:
    """The comments in the event export's audits, as (ticket id, comment), in export order."""
    found: list[tuple[str, _Found]] = []
    for audit in audits:
        if not isinstance(audit, dict) or (ticket_id := as_id(audit.get("ticket_id"))) is None:
            continue
        when = parse_time(_text(audit.get("created_at")))
        if when is None and isinstance(audit.get("timestamp"), int):
            when = parse_time(audit["timestamp"])
        for child in audit.get("child_events") or []:
            if not isinstance(child, dict):
                continue
            if (child.get("event_type") or child.get("type")) != "Comment":
                continue
            comment_id = as_id(child.get("id"))
            body = _text(child.get("plain_body")) or _text(child.get("body"))
            if comment_id is None or body is None:
                continue
            public = child.get("public")
            found.append(
                (
                    ticket_id,
                    _Found(
                        id=comment_id,
                        body=body,
                        author_id=as_id(child.get("author_id")),
                        public=public if isinstance(public, bool) else True,
                        at=parse_time(_text(child.get("created_at"))) or when,
                    ),
                )
            )
    return found


__all__ = [
    "DEFAULT_RATE_LIMIT_WAIT",
    "EVENTS_PATH",
    "EXPORT_PATH",
    "USERS_PATH",
    "PollCursor",
    "ZendeskPoller",
    "comment_delivery_id",
]
