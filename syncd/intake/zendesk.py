"""Zendesk as a source: signed webhooks in two shapes; polling is in :mod:`.zendesk_poll`.

A Zendesk webhook is connected either to triggers (the admin writes the JSON
body with placeholders; syncd documents one body, :data:`TRIGGER_BODY_TEMPLATE`)
or to event subscriptions (Zendesk's own ``zen:event-type:ticket.*``
envelope). Both are signed the same way, so one source reads both.

Zendesk writes the same value differently per channel (``Open`` from a
placeholder, ``OPEN`` in an event, ``open`` in the API), so status, priority
and ``source_status`` are lower-cased here: the same ticket reads the same
whichever way it arrived.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from syncd.errors import InvalidPayload
from syncd.intake.base import RawRequest, WebhookSource, json_object, text_value
from syncd.intake.generic import parse_time
from syncd.intake.signing import verify_zendesk
from syncd.intake.zendesk_poll import ZendeskPoller, comment_delivery_id
from syncd.ticket import (
    AuthorKind,
    Client,
    Comment,
    EventKind,
    Status,
    TicketEvent,
    as_id,
    make_client,
)

INVOCATION_HEADER = "x-zendesk-webhook-invocation-id"
EVENT_TYPE_PREFIX = "zen:event-type:"

#: The body to paste into every trigger's "Notify active webhook" action. Only ``event``
#: changes between triggers: ticket_created, comment_added, status_changed or ticket_updated.
TRIGGER_BODY_TEMPLATE = """\
{
  "event": "comment_added",
  "ticket_id": "{{ticket.id}}",
  "subject": "{{ticket.title}}",
  "status": "{{ticket.status}}",
  "priority": "{{ticket.priority}}",
  "via": "{{ticket.via}}",
  "tags": "{{ticket.tags}}",
  "updated_at": "{{ticket.updated_at_with_timestamp}}",
  "assignee_id": "{{ticket.assignee.id}}",
  "group_id": "{{ticket.group.id}}",
  "requester": {
    "id": "{{ticket.requester.id}}",
    "name": "{{ticket.requester.name}}",
    "email": "{{ticket.requester.email}}",
    "phone": "{{ticket.requester.phone}}"
  },
  "comment": {
    "id": "{{ticket.latest_comment.id}}",
    "body": "{{ticket.latest_comment.value}}",
    "public": "{{ticket.latest_comment.is_public}}",
    "author_id": "{{ticket.latest_comment.author.id}}"
  }
}
"""

_STATUS_WORDS: dict[str, Status] = {
    "new": Status.NEW,
    "open": Status.OPEN,
    "pending": Status.PENDING,
    "hold": Status.PENDING,
    "on-hold": Status.PENDING,
    "on hold": Status.PENDING,
    "solved": Status.SOLVED,
    "closed": Status.CLOSED,
}

#: ``{{ticket.via}}`` renders a display name; events and the API use the channel code.
_VIA_NAMES: dict[str, str] = {
    "web form": "web",
    "web widget": "web",
    "mail": "email",
    "email": "email",
    "web service": "api",
    "api": "api",
    "chat": "chat",
    "phone call (incoming)": "voice",
    "phone call (outgoing)": "voice",
    "voicemail": "voice",
    "mobile": "mobile",
    "mobile sdk": "mobile_sdk",
    "closed ticket": "closed_ticket",
}

_TRIGGER_EVENTS: dict[str, EventKind] = {
    "ticket_created": EventKind.TICKET_CREATED,
    "ticket_updated": EventKind.TICKET_UPDATED,
    "status_changed": EventKind.STATUS_CHANGED,
    "comment_added": EventKind.COMMENT_ADDED,
}

_SUBSCRIPTION_EVENTS: dict[str, EventKind] = {
    "created": EventKind.TICKET_CREATED,
    "status_changed": EventKind.STATUS_CHANGED,
    "comment_added": EventKind.COMMENT_ADDED,
}


class ZendeskSettings(BaseModel):
    """``[sources.<name>]`` for ``kind = "zendesk"``. Polling needs the API keys below."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The webhook's signing secret (Zendesk Admin Center, the webhook's page).
    signing_secret: SecretStr
    #: How far X-Zendesk-Webhook-Signature-Timestamp may be from now, either way, in seconds.
    tolerance_seconds: float = Field(default=300, gt=0)
    #: ``acme`` for https://acme.zendesk.com; or ``base_url`` for anything else.
    subdomain: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")
    base_url: str | None = Field(default=None, pattern=r"^https?://")
    #: API user and token: Basic auth as ``{email}/token:{api_token}``.
    email: str | None = None
    api_token: SecretStr | None = None
    #: Poll the ticket export for changes whose webhooks were lost; on when credentials are set.
    poll: bool | None = None
    poll_interval_seconds: float = Field(default=300, gt=0)
    #: How far back the first poll starts when no cursor is stored yet.
    poll_lookback_seconds: float = Field(default=86400, gt=0)
    #: Also read comments from the ticket event export, so a lost comment webhook is recovered.
    poll_comments: bool = True
    request_timeout_seconds: float = Field(default=30, gt=0)
    #: Extra status values (custom statuses) mapped to new/open/pending/solved/closed/spam.
    status_map: dict[str, Status] = Field(default_factory=dict)
    #: More ``{{ticket.via}}`` display names mapped to channel codes ("Facebook Post": "facebook").
    channel_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("status_map", "channel_map")
    @classmethod
    def _lower_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {k.strip().lower(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _polling_has_credentials(self) -> ZendeskSettings:
        if self.subdomain and self.base_url:
            raise ValueError("set subdomain or base_url, not both")
        has_email, has_token = bool(self.email), self.api_token is not None
        if self.poll is None and has_email != has_token:
            raise ValueError("set both email and api_token to poll, or neither")
        if self.polling:
            missing = [
                key
                for key, present in (
                    ("email", has_email),
                    ("api_token", has_token),
                    ("subdomain or base_url", bool(self.subdomain or self.base_url)),
                )
                if not present
            ]
            if missing:
                raise ValueError(f"polling needs {', '.join(missing)} (or set poll = false)")
        return self

    @property
    def polling(self) -> bool:
        if self.poll is not None:
            return self.poll
        return bool(self.email) and self.api_token is not None

    @property
    def api_base(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"https://{self.subdomain}.zendesk.com"


# --- small readers ----------------------------------------------------------------


def _text(value: Any) -> str | None:
    """A non-empty string, or None: empty and unrendered placeholders mean "no value"."""
    text = text_value(value)
    if text is None or (text.startswith("{{") and text.endswith("}}")):
        return None
    return text


def _id(value: Any) -> str | None:
    return as_id(_text(value))


def _lower(value: Any) -> str | None:
    text = _text(value)
    return text.lower() if text else None


def _flag(value: Any, default: bool) -> bool:
    if isinstance(value, bool):
        return value
    text = _lower(value)
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    return default


def _tags(value: Any) -> tuple[str, ...]:
    parts = value if isinstance(value, list) else (_text(value) or "").split()
    return tuple(tag for tag in (_text(p) for p in parts) if tag)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _author_kind(author_id: str | None, requester_id: str | None, is_staff: Any) -> AuthorKind:
    """Staff flag when Zendesk sends one; else the requester writes as client, anyone else agent."""
    if isinstance(is_staff, bool):
        return AuthorKind.AGENT if is_staff else AuthorKind.CLIENT
    if author_id and requester_id and author_id != requester_id:
        return AuthorKind.AGENT
    return AuthorKind.CLIENT


class ZendeskSource(WebhookSource):
    kind = "zendesk"
    settings_model = ZendeskSettings
    settings: ZendeskSettings

    def authenticate(self, request: RawRequest) -> None:
        verify_zendesk(
            self.settings.signing_secret.get_secret_value(),
            request.headers,
            request.body,
            now=request.received_at,
            tolerance=self.settings.tolerance_seconds,
        )

    def parse(self, request: RawRequest) -> list[TicketEvent]:
        data = json_object(request.body)
        invocation = _text(request.headers.get(INVOCATION_HEADER))
        event_type = data.get("type")
        if isinstance(event_type, str) and event_type.startswith(EVENT_TYPE_PREFIX):
            return self._parse_subscription(data, event_type, invocation)
        if "ticket_id" in data:
            return [self._parse_trigger(data, invocation)]
        raise InvalidPayload(
            "expected syncd's Zendesk trigger body (with ticket_id) or a Zendesk event "
            f"(type {EVENT_TYPE_PREFIX}ticket.*); see docs/helpdesks/zendesk.md"
        )

    # --- (a) the trigger body ----------------------------------------------------------

    def _parse_trigger(self, data: dict[str, Any], invocation: str | None) -> TicketEvent:
        ticket_id = _id(data.get("ticket_id"))
        if ticket_id is None:
            raise InvalidPayload(
                "ticket_id is empty or an unrendered placeholder "
                "(Zendesk's 'Test webhook' sends placeholders as written)"
            )
        event_name = _lower(data.get("event")) or "ticket_updated"
        kind = _TRIGGER_EVENTS.get(event_name)
        if kind is None:
            known = ", ".join(_TRIGGER_EVENTS)
            raise InvalidPayload(f"event {event_name!r} is not one of {known}")
        requester = _object(data.get("requester"))
        requester_id = _id(requester.get("id"))
        comment = None
        if kind == EventKind.COMMENT_ADDED:
            raw = _object(data.get("comment"))
            comment = self._comment(
                raw.get("id"),
                raw.get("body"),
                _flag(raw.get("public"), default=True),
                _id(raw.get("author_id")),
                requester_id,
                is_staff=None,
            )
        source_status = _lower(data.get("status"))
        return self._event(
            ticket_id=ticket_id,
            kind=kind,
            subject=_text(data.get("subject")),
            source_status=source_status,
            channel=self._channel(data.get("via")),
            priority=_lower(data.get("priority")),
            tags=_tags(data.get("tags")),
            assignee_id=_id(data.get("assignee_id")),
            group_id=_id(data.get("group_id")),
            comment=comment,
            client=self._client(requester_id, requester),
            occurred_at=parse_time(_text(data.get("updated_at"))),
            # A comment is added once: keyed by its id, a second invocation of the same
            # trigger (Zendesk allows that), or the poller, cannot post the note twice.
            delivery_id=comment_delivery_id(comment.id)
            if comment is not None and comment.id
            else invocation,
        )

    # --- (b) event subscriptions -------------------------------------------------------

    def _parse_subscription(
        self, data: dict[str, Any], event_type: str, invocation: str | None
    ) -> list[TicketEvent]:
        name = event_type[len(EVENT_TYPE_PREFIX) :]
        if not name.startswith("ticket."):
            # Answered 202 with nothing stored: a 4xx here would count towards the
            # circuit breaker that pauses this webhook for ticket events too.
            return []
        action = name[len("ticket.") :]
        detail = data.get("detail")
        if not isinstance(detail, dict):
            raise InvalidPayload(f"{event_type}: 'detail' must be an object")
        subject_ref = _text(data.get("subject")) or ""
        ticket_id = _id(detail.get("id")) or (
            _id(subject_ref.rpartition(":")[2]) if subject_ref.startswith("zen:ticket:") else None
        )
        if ticket_id is None:
            raise InvalidPayload(f"{event_type}: detail.id (the ticket id) is missing")
        kind = _SUBSCRIPTION_EVENTS.get(action, EventKind.TICKET_UPDATED)
        change = _object(data.get("event"))
        requester_id = _id(detail.get("requester_id"))
        source_status = _lower(detail.get("status"))
        previous = None
        if kind == EventKind.STATUS_CHANGED:
            source_status = source_status or self._status_value(change.get("current"))
            previous = self._status(self._status_value(change.get("previous")))
        comment = None
        if kind == EventKind.COMMENT_ADDED:
            raw = _object(change.get("comment"))
            author = _object(raw.get("author"))
            comment = self._comment(
                raw.get("id"),
                raw.get("body"),
                _flag(raw.get("is_public"), default=True),
                _id(author.get("id")),
                requester_id,
                is_staff=author.get("is_staff"),
            )
        return [
            self._event(
                ticket_id=ticket_id,
                kind=kind,
                subject=_text(detail.get("subject")),
                source_status=source_status,
                previous_status=previous,
                channel=self._channel(_object(detail.get("via")).get("channel")),
                priority=_lower(detail.get("priority")),
                tags=_tags(detail.get("tags")),
                assignee_id=_id(detail.get("assignee_id")),
                group_id=_id(detail.get("group_id")),
                comment=comment,
                client=make_client(source_id=requester_id) if requester_id else None,
                occurred_at=parse_time(_text(detail.get("updated_at")))
                or parse_time(_text(data.get("time"))),
                # The event id names the change itself, so it also merges two invocations;
                # a comment is keyed by its own id, as the trigger and the poller key it.
                delivery_id=comment_delivery_id(comment.id)
                if comment is not None and comment.id
                else _text(data.get("id")) or invocation,
            )
        ]

    # --- shared ------------------------------------------------------------------------

    def _event(
        self,
        *,
        ticket_id: str,
        kind: EventKind,
        source_status: str | None,
        comment: Comment | None,
        previous_status: Status | None = None,
        **fields: Any,
    ) -> TicketEvent:
        if kind == EventKind.COMMENT_ADDED and comment is None:
            kind = EventKind.TICKET_UPDATED  # nothing to add as a note; the state still counts
        return TicketEvent(
            source=self.name,
            ticket_id=ticket_id,
            kind=kind,
            status=self._status(source_status),
            source_status=source_status,
            previous_status=previous_status,
            comment=comment,
            **fields,
        )

    def _comment(
        self,
        comment_id: Any,
        body: Any,
        public: bool,
        author_id: str | None,
        requester_id: str | None,
        *,
        is_staff: Any,
    ) -> Comment | None:
        text = _text(body)
        if text is None:
            return None
        return Comment(
            id=_id(comment_id),
            text=text,
            author=_author_kind(author_id, requester_id, is_staff),
            author_id=author_id,
            public=public,
        )

    def _client(self, requester_id: str | None, requester: dict[str, Any]) -> Client | None:
        name, email, phone = (_text(requester.get(k)) for k in ("name", "email", "phone"))
        if not (requester_id or name or email or phone):
            return None
        return make_client(
            source_id=requester_id,
            name=name,
            emails=[email] if email else [],
            phones=[phone] if phone else [],
            default_region=self.default_region,
        )

    @staticmethod
    def _status_value(value: Any) -> str | None:
        """``event.current`` / ``event.previous`` are a status word or ``{"status": ...}``."""
        if isinstance(value, dict):
            value = value.get("status")
        return _lower(value)

    def _status(self, value: str | None) -> Status | None:
        if value is None:
            return None
        return self.settings.status_map.get(value) or _STATUS_WORDS.get(value)

    def _channel(self, value: Any) -> str | None:
        text = _lower(value)
        if text is None:
            return None
        mapped = self.settings.channel_map.get(text) or _VIA_NAMES.get(text)
        return mapped or "_".join(text.split())

    # --- polling -----------------------------------------------------------------------

    def poller(self, transport: httpx.AsyncBaseTransport | None = None) -> ZendeskPoller | None:
        if not self.settings.polling:
            return None
        return ZendeskPoller(self, transport=transport)

    def ticket_event(self, ticket: dict[str, Any]) -> TicketEvent | None:
        """A ticket from the REST API as one state event; None without an id."""
        ticket_id = _id(ticket.get("id"))
        if ticket_id is None:
            return None
        requester_id = _id(ticket.get("requester_id"))
        return self._event(
            ticket_id=ticket_id,
            kind=EventKind.TICKET_UPDATED,
            subject=_text(ticket.get("subject")),
            source_status=_lower(ticket.get("status")),
            channel=self._channel(_object(ticket.get("via")).get("channel")),
            priority=_lower(ticket.get("priority")),
            tags=_tags(ticket.get("tags")),
            assignee_id=_id(ticket.get("assignee_id")),
            group_id=_id(ticket.get("group_id")),
            comment=None,
            client=make_client(source_id=requester_id) if requester_id else None,
            occurred_at=_updated_at(ticket),
        )


def _updated_at(ticket: dict[str, Any]) -> datetime | None:
    found = parse_time(_text(ticket.get("updated_at")))
    if found is None and isinstance(ticket.get("generated_timestamp"), int):
        found = parse_time(ticket["generated_timestamp"])
    return found
