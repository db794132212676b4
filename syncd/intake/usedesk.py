"""Usedesk: webhooks from an API channel, plus a poller because webhooks alone can be lost.

Usedesk puts the channel's secret key in the body (no signature, no
timestamp, no delivery id, no documented retries), names the event only by
which key the body carries (``ticket``, ``comment``, ``trigger``, ``csi``),
sends most numbers as strings and writes times as naive
``YYYY-MM-DD HH:MM:SS`` in a zone it does not document. So every id goes
through :func:`~syncd.ticket.as_id`, every time through the configured zone,
and the poller re-reads an overlap window on each pass: the dedup key makes
whatever it sees twice harmless.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Final
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from syncd.connectors.http import classified, error_for_response
from syncd.errors import (
    AccessDenied,
    AuthenticationFailed,
    DeliveryError,
    InvalidPayload,
    NotFound,
    RateLimited,
    Rejected,
    RetriableError,
    ServerError,
)
from syncd.intake.base import PolledTicket, Poller, PollPage, RawRequest, WebhookSource
from syncd.intake.base import text_value as _text
from syncd.ticket import (
    AuthorKind,
    Client,
    Comment,
    EventKind,
    Rating,
    Status,
    TicketEvent,
    as_id,
    make_client,
)

#: Usedesk ``status_id`` → normalized status. The raw id is kept in ``source_status``.
USEDESK_STATUSES: Final[dict[str, Status]] = {
    "1": Status.OPEN,  # open
    "2": Status.SOLVED,  # solved / completed
    "3": Status.CLOSED,  # closed
    "4": Status.CLOSED,  # deleted: gone from the helpdesk, so closed for the CRM
    "5": Status.PENDING,  # on hold
    "6": Status.PENDING,  # pending
    "7": Status.SPAM,
    "8": Status.NEW,
    "9": Status.OPEN,  # mailing: an outgoing newsletter thread; treated as an open ticket
    "10": Status.CLOSED,  # merged into another ticket
}

#: ``/tickets`` returns at most this many tickets per page.
PAGE_SIZE: Final = 100

_AUTHORS: Final[dict[str, AuthorKind]] = {
    "client": AuthorKind.CLIENT,
    "user": AuthorKind.AGENT,
    "trigger": AuthorKind.SYSTEM,
}
_SHAPES: Final = ("ticket", "comment", "trigger", "csi")
_FORM_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class UsedeskSettings(BaseModel):
    """``[sources.<name>]`` with ``kind = "usedesk"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The API channel's secret key; Usedesk sends it in every webhook body as ``secret``.
    secret: SecretStr
    #: Token for polling the API. None: use ``secret`` (Usedesk uses one key for both).
    api_token: SecretStr | None = None
    api_url: str = Field(default="https://api.usedesk.ru", pattern=r"^https?://\S+$")
    #: Zone of Usedesk's naive times (``last_updated_at``, ``published_at``, ``updated_after``).
    timezone: str = "UTC"
    poll: bool = True
    poll_interval_seconds: float = Field(default=300, gt=0)
    #: Each pass starts this far before the newest change the previous pass saw.
    poll_overlap_seconds: float = Field(default=600, ge=0)
    #: How far back the very first pass looks.
    poll_lookback_seconds: float = Field(default=86400, gt=0)
    request_timeout_seconds: float = Field(default=30, gt=0)
    #: Poll only these channels (``fchannel``); None polls all of them.
    channel_ids: list[int] | None = None

    @field_validator("secret", "api_token")
    @classmethod
    def _not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty secret would let any body with "secret": "" through.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as 'Europe/Moscow'"
            ) from None
        return value

    @field_validator("api_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def token(self) -> str:
        """The API token for polling: ``api_token`` if set, else the channel secret."""
        return (self.api_token or self.secret).get_secret_value()


# --- small readers --------------------------------------------------------------------


def _truthy(value: object) -> bool:
    return value not in (None, False, 0, "0", "", "false")


def usedesk_status(value: object) -> tuple[Status | None, str | None]:
    """(normalized, raw id) for a status given as 3, "3" or {"id": 3}."""
    if isinstance(value, dict):
        value = value.get("id")
    raw = as_id(value)
    return (USEDESK_STATUSES.get(raw) if raw else None), raw


def parse_usedesk_time(value: object, zone: tzinfo) -> datetime | None:
    """A Usedesk time in UTC; naive values are read in ``zone``. None if it cannot be read."""
    try:
        parsed = _parse_usedesk_time(value, zone)
    except (ValueError, OverflowError, OSError):
        return None  # out of any calendar
    return parsed if parsed is None or 1970 <= parsed.year <= 9000 else None


def _parse_usedesk_time(value: object, zone: tzinfo) -> datetime | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC) if value > 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or text.startswith("0000"):
        return None
    if text.isdigit():
        return datetime.fromtimestamp(int(text), tz=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone)
    return parsed.astimezone(UTC)


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise InvalidPayload(f"{key!r} must be an object, got {type(value).__name__}")
    return value


def _items(value: object) -> list[Any]:
    """A list, or the values of a form-decoded ``{"0": …, "1": …}``, or one item."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return [value]


def _tag_names(value: object) -> tuple[str, ...]:
    names: list[str] = []
    for item in _items(value):
        raw = item.get("name") if isinstance(item, dict) else item
        for part in str(raw).split(",") if raw is not None else ():
            name = part.strip()
            if name and name not in names:
                names.append(name)
    return tuple(names)


def _custom_fields(value: object) -> dict[str, Any]:
    """``[{id|ticket_field_id, value}]`` as ``{"54": value}``, keyed by the field id."""
    fields: dict[str, Any] = {}
    for item in _items(value):
        if isinstance(item, dict):
            key = as_id(item.get("id", item.get("ticket_field_id")))
            if key is not None:
                fields[key] = item.get("value")
    return fields


def _decode_form(text: str) -> dict[str, Any]:
    """PHP-style ``a[b][0][c]=v`` pairs as nested dicts (lists stay ``{"0": …}`` dicts)."""
    data: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True, strict_parsing=True):
        match = _FORM_KEY.match(key)
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))] if match else [key]
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            if path[i + 1] == "":
                path[i + 1] = str(len(child))
            node = child
        node[path[-1]] = value
    return data


def decode_body(body: bytes) -> dict[str, Any]:
    """A webhook body as a dict: JSON ("JSON request" ticked) or form-encoded (not ticked)."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise InvalidPayload("body is not UTF-8 text") from None
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InvalidPayload(f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidPayload(f"body must be a JSON object, got {type(data).__name__}")
        return data
    try:
        return _decode_form(stripped)
    except ValueError:
        raise InvalidPayload(
            "body is neither a JSON object nor form-encoded; "
            'tick "JSON request" on the Usedesk API channel'
        ) from None


# --- the source -----------------------------------------------------------------------


class UsedeskSource(WebhookSource):
    kind = "usedesk"
    settings_model = UsedeskSettings
    settings: UsedeskSettings

    def authenticate(self, request: RawRequest) -> None:
        secret = self.settings.secret.get_secret_value().encode()
        token = request.query.get("token")
        if token is not None and hmac.compare_digest(token.encode(), secret):
            return
        try:
            given = _text(decode_body(request.body).get("secret"))
        except InvalidPayload:
            given = None
        if given is not None and hmac.compare_digest(given.encode(), secret):
            return
        raise AuthenticationFailed(
            "missing or wrong secret; Usedesk sends the API channel's secret key in the body "
            'as "secret" (or add ?token=<secret> to the Redirect URL)'
        )

    def parse(self, request: RawRequest) -> list[TicketEvent]:
        data = decode_body(request.body)
        if "chat_id" in data:
            # Chat messages are stored as ticket comments too; the comment webhook and
            # the poller report them with comment ids, which a chat event lacks.
            return []
        if "trigger" in data:
            return [self._changed(data, _obj(data, "trigger"))]
        if "changed_at" in data and "ticket_id" in data:
            # The documentation lists the change's fields at the top level; the
            # public clients read them under "trigger". Accept both.
            return [self._changed(data, data)]
        if "comment" in data:
            return [self._comment_added(data)]
        if "csi" in data:
            return [self._rated(data)]
        if "ticket" in data:
            return [self._created(data)]
        if "ping" in data:
            return []
        keys = ", ".join(sorted(repr(k) for k in data if k != "secret")) or "none"
        raise InvalidPayload(
            "not a Usedesk webhook: expected one of the keys "
            + ", ".join(repr(k) for k in _SHAPES)
            + f" (or 'ping'); got {keys}"
        )

    # -- the four shapes --

    def _created(self, data: dict[str, Any]) -> TicketEvent:
        ticket = _obj(data, "ticket")
        ticket_id = self._ticket_id(ticket.get("id"), "ticket.id")
        status, raw_status = usedesk_status(ticket.get("status_id", ticket.get("status")))
        client = self.read_client(data.get("client"), ticket)
        message = _text(ticket.get("message"))
        custom = _custom_fields(ticket.get("custom_fields")) or _custom_fields(
            data.get("custom_fields")
        )
        return TicketEvent(
            source=self.name,
            ticket_id=ticket_id,
            kind=EventKind.TICKET_CREATED,
            subject=_text(ticket.get("subject")),
            status=status,
            source_status=raw_status,
            channel=as_id(ticket.get("channel_id")),
            priority=_text(ticket.get("priority")),
            tags=_tag_names(ticket.get("tags")),
            assignee_id=as_id(ticket.get("assignee_id")),
            group_id=as_id(ticket.get("group")),
            custom_fields=custom,
            comment=Comment(
                text=message,
                author=AuthorKind.CLIENT,
                author_id=client.source_id if client else None,
            )
            if message
            else None,
            client=client,
            occurred_at=self.read_time(ticket.get("published_at") or ticket.get("last_updated_at")),
        )

    def _comment_added(self, data: dict[str, Any]) -> TicketEvent:
        raw = _obj(data, "comment")
        ticket_id = self._ticket_id(
            raw.get("ticket_id", data.get("ticket_id")), "comment.ticket_id"
        )
        return TicketEvent(
            source=self.name,
            ticket_id=ticket_id,
            kind=EventKind.COMMENT_ADDED,
            assignee_id=as_id(data.get("assignee_id")),
            custom_fields=_custom_fields(data.get("custom_fields")),
            comment=self.read_comment(raw),
            client=self.read_client(data.get("client"), raw),
            occurred_at=self.read_time(raw.get("published_at")),
        )

    def _changed(self, data: dict[str, Any], change: dict[str, Any]) -> TicketEvent:
        ticket_id = self._ticket_id(
            change.get("ticket_id", data.get("ticket_id")), "trigger.ticket_id"
        )
        entries = [e for e in _items(change.get("data")) if isinstance(e, dict)]
        by_target = {str(e.get("target")): e for e in entries}
        status_entry = by_target.get("status_id")
        new_raw = change.get("new_status")
        old_raw = change.get("old_status")
        if status_entry is not None:
            new_raw = status_entry.get("value", new_raw)
            old_raw = status_entry.get("old_value", old_raw)
        status, raw_status = usedesk_status(new_raw)
        previous, raw_previous = usedesk_status(old_raw)
        moved = status_entry is not None or (
            raw_previous is not None and raw_status is not None and raw_previous != raw_status
        )
        tags: list[str] = []
        for entry in entries:
            if entry.get("target") == "new_tags":
                tags.extend(t for t in _tag_names(entry.get("value")) if t not in tags)
        subject = by_target.get("subject")
        assignee = by_target.get("assignee_id")
        change_id = as_id(change.get("id"))
        return TicketEvent(
            source=self.name,
            ticket_id=ticket_id,
            kind=EventKind.STATUS_CHANGED if moved else EventKind.TICKET_UPDATED,
            subject=_text(subject.get("value")) if subject else None,
            status=status,
            source_status=raw_status,
            previous_status=previous if moved else None,
            tags=tuple(tags),
            assignee_id=as_id(assignee.get("value") if assignee else data.get("assignee_id")),
            custom_fields=_custom_fields(data.get("custom_fields")),
            client=self.read_client(data.get("client"), {}),
            occurred_at=self.read_time(change.get("changed_at")),
            # The change id names this change, so a repeated delivery of it is
            # recognised and two different changes in the same second are not merged.
            delivery_id=f"change:{change_id}" if change_id else None,
        )

    def _rated(self, data: dict[str, Any]) -> TicketEvent:
        csi = _obj(data, "csi")
        ticket = data.get("ticket")
        ticket_id = self._ticket_id(
            csi.get("ticket_id")
            or data.get("ticket_id")
            or (ticket.get("id") if isinstance(ticket, dict) else None),
            "csi.ticket_id",
        )
        value = _text(csi.get("rating"))
        if value is None:
            raise InvalidPayload("csi.rating is missing")
        return TicketEvent(
            source=self.name,
            ticket_id=ticket_id,
            kind=EventKind.RATING,
            rating=Rating(value=value, comment=_text(csi.get("comment"))),
            client=self.read_client(data.get("client"), csi),
            occurred_at=self.read_time(
                csi.get("created_at") or csi.get("published_at") or csi.get("changed_at")
            ),
        )

    # -- pieces shared with the poller --

    def _ticket_id(self, value: object, where: str) -> str:
        ticket_id = as_id(value) if isinstance(value, str | int) else None
        if ticket_id is None:
            raise InvalidPayload(f"{where} must hold the ticket id (a number or digits)")
        return ticket_id

    def read_time(self, value: object) -> datetime | None:
        return parse_usedesk_time(value, self.settings.zone)

    def read_comment(self, raw: dict[str, Any]) -> Comment:
        sender = str(raw.get("from") or "").strip().lower()
        if sender in _AUTHORS:
            author = _AUTHORS[sender]
        else:
            author = AuthorKind.AGENT if as_id(raw.get("user_id")) else AuthorKind.CLIENT
        author_id = {
            AuthorKind.AGENT: raw.get("user_id"),
            AuthorKind.CLIENT: raw.get("client_id"),
            AuthorKind.SYSTEM: raw.get("trigger_id"),
        }[author]
        return Comment(
            id=as_id(raw.get("id")),
            text=str(raw.get("message") or ""),
            author=author,
            author_id=as_id(author_id),
            public=str(raw.get("type") or "public").strip().lower() != "private",
        )

    def read_client(self, value: object, fallback: dict[str, Any]) -> Client | None:
        """The top-level ``client`` object, else what the ticket or comment says of its client."""
        if isinstance(value, dict):
            emails = [
                e.get("email") if isinstance(e, dict) else e for e in _items(value.get("emails"))
            ]
            phones = [
                p.get("phone") if isinstance(p, dict) else p for p in _items(value.get("phones"))
            ]
            return make_client(
                source_id=value.get("id", fallback.get("client_id")),
                name=_text(value.get("name")),
                emails=emails,
                phones=phones,
                default_region=self.default_region,
            )
        client_id = as_id(fallback.get("client_id"))
        email = fallback.get("email")
        name = fallback.get("client_name")
        if client_id is None and not email and not name:
            return None
        return make_client(
            source_id=client_id,
            name=_text(name),
            emails=[email] if isinstance(email, str) else [],
            default_region=self.default_region,
        )

    def poller(self, transport: httpx.AsyncBaseTransport | None = None) -> UsedeskPoller | None:
        if not self.settings.poll:
            return None
        return UsedeskPoller(self, transport=transport)


# --- polling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cursor:
    """Where a pass stands: its window start, the next page, the newest change seen so far."""

    since: float
    page: int = 0
    newest: float | None = None

    def dump(self) -> str:
        return json.dumps({"v": 1, "since": self.since, "page": self.page, "newest": self.newest})

    @classmethod
    def load(cls, text: str | None) -> _Cursor | None:
        """None for no cursor or one this version cannot read (the pass then starts over)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            newest = data.get("newest")
            return cls(
                since=float(data["since"]),
                page=int(data.get("page", 0)),
                newest=float(newest) if newest is not None else None,
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _answer_error(method: str, answer: dict[str, Any]) -> DeliveryError:
    """Classify ``{"error": …, "code": …}``, which Usedesk may send with HTTP 200."""
    text = str(answer.get("error"))[:300]
    message = f"Usedesk {method}: {text}"
    code = as_id(answer.get("code"))
    number = int(code) if code and code.isdigit() else None
    if number in (401, 403) or any(
        word in text.lower() for word in ("token", "токен", "auth", "access", "доступ")
    ):
        return AccessDenied(message, status_code=number)
    if number == 429 or "too many" in text.lower():
        return RateLimited(message, status_code=number)
    if number == 404 or "not found" in text.lower() or "не найден" in text.lower():
        return NotFound(message, status_code=number)
    if number in (400, 422):
        return Rejected(message, status_code=number)
    if number is not None and number >= 500:
        return ServerError(message, status_code=number)
    return RetriableError(message, status_code=number)


class UsedeskPoller(Poller):
    """Pages ``POST /tickets?updated_after=…`` and reads each ticket's comments from ``/ticket``.

    A pass walks pages 0, 1, 2… of one window; when a page holds fewer than
    100 tickets the pass is done and the next window starts the overlap before
    the newest ``last_updated_at`` seen, because Usedesk's clock, zone and
    indexing delay are not documented.
    """

    def __init__(
        self,
        source: UsedeskSource,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.settings = source.settings
        self.interval = self.settings.poll_interval_seconds
        self._clock = clock
        self._client = httpx.AsyncClient(
            base_url=self.settings.api_url,
            timeout=self.settings.request_timeout_seconds,
            transport=transport,
        )

    async def fetch(self, cursor: str | None) -> PollPage:
        at = _Cursor.load(cursor) or _Cursor(
            since=float(self._clock()) - self.settings.poll_lookback_seconds
        )
        query: dict[str, Any] = {
            "updated_after": datetime.fromtimestamp(at.since, tz=self.settings.zone).strftime(
                "%Y-%m-%d %H:%M"
            ),
            "offset": at.page,
        }
        if self.settings.channel_ids:
            query["fchannel"] = ",".join(str(c) for c in self.settings.channel_ids)
        answer = await self._call("/tickets", query)
        listed = answer.get("tickets") if isinstance(answer, dict) else answer
        if not isinstance(listed, list):
            raise RetriableError(f"Usedesk /tickets: expected a list, got {type(answer).__name__}")
        tickets = [await self._ticket(item) for item in listed if isinstance(item, dict)]
        newest = max(
            [t.updated_at.timestamp() for t in tickets]
            + ([at.newest] if at.newest is not None else []),
            default=None,
        )
        if len(listed) >= PAGE_SIZE:
            following = _Cursor(since=at.since, page=at.page + 1, newest=newest)
            return PollPage(tickets=tickets, cursor=following.dump(), done=False)
        since = at.since
        if newest is not None:
            since = max(since, newest - self.settings.poll_overlap_seconds)
        return PollPage(tickets=tickets, cursor=_Cursor(since=since).dump(), done=True)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def check(self) -> list[str]:
        """One ``/tickets`` request for the last minute: the token works and the list reads."""
        since = datetime.fromtimestamp(float(self._clock()) - 60, tz=self.settings.zone)
        answer = await self._call("/tickets", {"updated_after": since.strftime("%Y-%m-%d %H:%M")})
        listed = answer.get("tickets") if isinstance(answer, dict) else answer
        if not isinstance(listed, list):
            raise RetriableError(f"Usedesk /tickets: expected a list, got {type(answer).__name__}")
        return [f"/tickets answered with {len(listed)} ticket(s) changed in the last minute"]

    async def _call(self, method: str, fields: dict[str, Any]) -> Any:
        payload = {"api_token": self.settings.token(), **fields}
        async with classified():
            response = await self._client.post(method, json=payload)
        error = error_for_response(response)
        if error is not None:
            raise error
        try:
            answer = response.json()
        except ValueError:
            raise ServerError(
                f"Usedesk {method}: answer is not JSON: {response.text[:200]!r}",
                status_code=response.status_code,
            ) from None
        if isinstance(answer, dict) and answer.get("error"):
            raise _answer_error(method, answer)
        return answer

    async def _ticket(self, item: dict[str, Any]) -> PolledTicket:
        """One listed ticket: its current state, then every comment, oldest first."""
        ticket_id = as_id(item.get("id"))
        if ticket_id is None:
            raise RetriableError("Usedesk /tickets: a listed ticket has no id")
        detail = await self._detail(ticket_id)
        found = detail.get("ticket")
        ticket = {**item, **found} if isinstance(found, dict) else dict(item)
        now = datetime.fromtimestamp(float(self._clock()), tz=UTC)
        updated = (
            self.source.read_time(ticket.get("last_updated_at"))
            or self.source.read_time(ticket.get("published_at") or ticket.get("created_at"))
            or now
        )
        status, raw_status = usedesk_status(ticket.get("status_id", ticket.get("status")))
        client = self.source.read_client(None, ticket)
        tags = _tag_names(detail.get("tags") or item.get("tags"))
        custom = _custom_fields(detail.get("custom_fields")) or _custom_fields(
            item.get("ticket_fields")
        )
        events = [
            TicketEvent(
                source=self.source.name,
                ticket_id=ticket_id,
                kind=EventKind.TICKET_UPDATED,
                subject=_text(ticket.get("subject")),
                status=status,
                source_status=raw_status,
                channel=as_id(ticket.get("channel_id")),
                priority=_text(ticket.get("priority")),
                tags=tags,
                assignee_id=as_id(ticket.get("assignee_id")),
                group_id=as_id(ticket.get("group")),
                custom_fields=custom,
                client=client,
                occurred_at=updated,
                recovered_by_poll=True,
            )
        ]
        comments = [c for c in _items(detail.get("comments")) if isinstance(c, dict)]
        for raw in sorted(comments, key=self._comment_order):
            if _truthy(raw.get("is_first")):
                # The ticket-created webhook carries the first message without its
                # comment id; ride on the state event so it is stored only with a
                # ticket syncd never heard of (the reconciler drops it otherwise).
                events[0] = events[0].model_copy(update={"comment": self.source.read_comment(raw)})
                continue
            events.append(
                TicketEvent(
                    source=self.source.name,
                    ticket_id=ticket_id,
                    kind=EventKind.COMMENT_ADDED,
                    comment=self.source.read_comment(raw),
                    client=client,
                    occurred_at=self.source.read_time(raw.get("published_at")),
                    recovered_by_poll=True,
                )
            )
        return PolledTicket(ticket_id=ticket_id, updated_at=updated, events=events)

    async def _detail(self, ticket_id: str) -> dict[str, Any]:
        try:
            answer = await self._call("/ticket", {"ticket_id": ticket_id})
        except NotFound:
            # Deleted between the list and the read: the list item is all there is.
            return {}
        if isinstance(answer, list):
            answer = answer[0] if answer else {}
        return answer if isinstance(answer, dict) else {}

    def _comment_order(self, raw: dict[str, Any]) -> tuple[float, int]:
        when = self.source.read_time(raw.get("published_at"))
        number = as_id(raw.get("id")) or "0"
        return (when.timestamp() if when else 0.0, int(number) if number.isdigit() else 0)


__all__ = [
    "PAGE_SIZE",
    "USEDESK_STATUSES",
    "UsedeskPoller",
    "UsedeskSettings",
    "UsedeskSource",
    "decode_body",
    "parse_usedesk_time",
    "usedesk_status",
]
