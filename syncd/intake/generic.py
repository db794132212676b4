"""The generic webhook source: anything that can POST JSON can feed syncd.

Two ways to prove a request is genuine: a shared secret in a header, or
Standard Webhooks signing (``webhook-id`` / ``webhook-timestamp`` /
``webhook-signature``). Where each ticket field sits in the body is
configured as dotted paths, so no code is needed for a new sender.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from syncd.dotted import dig
from syncd.errors import InvalidPayload
from syncd.intake.base import RawRequest, WebhookSource, json_object
from syncd.intake.signing import (
    check_shared_secret,
    standard_webhooks_key,
    verify_standard_webhook,
)
from syncd.ticket import AuthorKind, Comment, EventKind, Status, TicketEvent, as_id, make_client

_STATUS_WORDS: dict[str, Status] = {
    "new": Status.NEW,
    "open": Status.OPEN,
    "opened": Status.OPEN,
    "pending": Status.PENDING,
    "hold": Status.PENDING,
    "on_hold": Status.PENDING,
    "waiting": Status.PENDING,
    "solved": Status.SOLVED,
    "resolved": Status.SOLVED,
    "done": Status.SOLVED,
    "closed": Status.CLOSED,
    "spam": Status.SPAM,
}


class FieldPaths(BaseModel):
    """Dotted paths into the JSON body. ``comment`` and ``client`` may be a string or an object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ticket_id: str = "ticket_id"
    kind: str = "event"
    event_id: str | None = None
    occurred_at: str = "occurred_at"
    subject: str = "subject"
    status: str = "status"
    channel: str = "channel"
    priority: str = "priority"
    tags: str = "tags"
    assignee_id: str = "assignee_id"
    group_id: str = "group_id"
    custom_fields: str = "custom_fields"
    comment: str = "comment"
    client: str = "client"


class GenericSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: "shared_secret": compare a header with ``secret``; "standard_webhooks": verify a signature.
    signing: Literal["shared_secret", "standard_webhooks"] = "shared_secret"
    secret: SecretStr
    secret_header: str = "X-Syncd-Secret"  # noqa: S105 - a header name
    #: Standard Webhooks: how far ``webhook-timestamp`` may be from now, in seconds.
    tolerance_seconds: float = Field(default=300, gt=0)
    fields: FieldPaths = FieldPaths()
    #: The sender's status values mapped to new/open/pending/solved/closed/spam.
    status_map: dict[str, Status] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _key_readable(self) -> GenericSettings:
        if self.signing == "standard_webhooks":
            standard_webhooks_key(self.secret.get_secret_value())
        return self


def parse_time(value: Any) -> datetime | None:
    """Unix seconds (number or digits) or ISO-8601; naive times are taken as UTC."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        try:
            when = datetime.fromtimestamp(float(value), tz=UTC)
        except (ValueError, OverflowError, OSError):
            return None  # out of any calendar: treat as "no time given"
        # Far-off years break arithmetic on the time later (dedup keys, SLA due times).
        return when if 1970 <= when.year <= 9000 else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        return parsed if 1970 <= parsed.year <= 9000 else None
    return None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text or None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [v for v in (part.strip() for part in value.replace(",", " ").split()) if v]
    return [value]


class GenericSource(WebhookSource):
    kind = "generic"
    settings_model = GenericSettings
    settings: GenericSettings

    def authenticate(self, request: RawRequest) -> None:
        secret = self.settings.secret.get_secret_value()
        if self.settings.signing == "standard_webhooks":
            verify_standard_webhook(
                standard_webhooks_key(secret),
                request.headers,
                request.body,
                now=request.received_at,
                tolerance=self.settings.tolerance_seconds,
            )
            return
        given = request.headers.get(self.settings.secret_header.lower(), "")
        check_shared_secret(given, secret, f"{self.settings.secret_header} header")

    def parse(self, request: RawRequest) -> list[TicketEvent]:
        data = json_object(request.body)
        f = self.settings.fields
        ticket_id = dig(data, f.ticket_id)
        if (
            isinstance(ticket_id, bool)
            or not isinstance(ticket_id, str | int)
            or as_id(ticket_id) is None
        ):
            raise InvalidPayload(
                f"field {f.ticket_id!r} must hold the ticket id (a string or number)"
            )
        source_status = _text(dig(data, f.status))
        delivery_id = _text(dig(data, f.event_id)) if f.event_id else None
        if self.settings.signing == "standard_webhooks":
            delivery_id = request.headers.get("webhook-id") or delivery_id
        custom = dig(data, f.custom_fields)
        return [
            TicketEvent(
                source=self.name,
                ticket_id=str(as_id(ticket_id)),
                kind=self._kind(dig(data, f.kind)),
                subject=_text(dig(data, f.subject)),
                status=self._status(source_status),
                source_status=source_status,
                channel=_text(dig(data, f.channel)),
                priority=_text(dig(data, f.priority)),
                tags=tuple(str(t) for t in _as_list(dig(data, f.tags)) if _text(t)),
                assignee_id=as_id(dig(data, f.assignee_id)),
                group_id=as_id(dig(data, f.group_id)),
                custom_fields=custom if isinstance(custom, dict) else {},
                comment=self._comment(dig(data, f.comment)),
                client=self._client(dig(data, f.client)),
                occurred_at=parse_time(dig(data, f.occurred_at)),
                delivery_id=delivery_id,
            )
        ]

    def _kind(self, value: Any) -> EventKind:
        try:
            return EventKind(str(value))
        except ValueError:
            return EventKind.TICKET_UPDATED

    def _status(self, value: str | None) -> Status | None:
        if value is None:
            return None
        if value in self.settings.status_map:
            return self.settings.status_map[value]
        return _STATUS_WORDS.get(value.strip().lower())

    def _comment(self, value: Any) -> Comment | None:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return Comment(text=str(value)) if str(value).strip() else None
        if not isinstance(value, dict):
            return None
        text = _text(value.get("text") or value.get("message") or value.get("body"))
        if text is None:
            return None
        author = str(value.get("author") or value.get("from") or "client").lower()
        return Comment(
            id=as_id(value.get("id")),
            text=text,
            author=AuthorKind(author)
            if author in {a.value for a in AuthorKind}
            else AuthorKind.CLIENT,
            author_id=as_id(value.get("author_id")),
            public=value.get("public") is not False,
        )

    def _client(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return None
        emails = _as_list(value.get("emails")) + _as_list(value.get("email"))
        listed = value.get("phones")
        phones: list[Any] = list(listed) if isinstance(listed, list) else []
        if value.get("phone"):
            phones.append(value["phone"])
        return make_client(
            source_id=value.get("id"),
            name=value.get("name"),
            emails=emails,
            phones=[p.get("phone") if isinstance(p, dict) else p for p in phones],
            default_region=self.default_region,
        )
