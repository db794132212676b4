"""The normalized ticket event: what every helpdesk source produces and mapping consumes.

Sources differ in everything (Usedesk sends numbers as strings and status
ids, Zendesk sends words, a generic sender whatever it likes); after this
model they do not. Phones are E.164 and e-mails lower-case, so
``8 (999) 123-45-67`` and ``+79991234567`` are the same person.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field


class EventKind(StrEnum):
    TICKET_CREATED = "ticket_created"
    TICKET_UPDATED = "ticket_updated"
    STATUS_CHANGED = "status_changed"
    COMMENT_ADDED = "comment_added"
    RATING = "rating"


class Status(StrEnum):
    NEW = "new"
    OPEN = "open"
    PENDING = "pending"
    SOLVED = "solved"
    CLOSED = "closed"
    SPAM = "spam"


class AuthorKind(StrEnum):
    CLIENT = "client"
    AGENT = "agent"
    SYSTEM = "system"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Client(_Model):
    source_id: str | None = None
    name: str | None = None
    emails: tuple[str, ...] = ()
    #: E.164 numbers; values that could not be read as a phone number are in ``unparsed_phones``.
    phones: tuple[str, ...] = ()
    unparsed_phones: tuple[str, ...] = ()


class Comment(_Model):
    id: str | None = None
    text: str = ""
    author: AuthorKind = AuthorKind.CLIENT
    author_id: str | None = None
    public: bool = True


class Rating(_Model):
    value: str
    comment: str | None = None


class TicketEvent(_Model):
    source: str
    ticket_id: str
    kind: EventKind
    subject: str | None = None
    #: Normalized status; ``source_status`` keeps the helpdesk's own value.
    status: Status | None = None
    source_status: str | None = None
    previous_status: Status | None = None
    channel: str | None = None
    priority: str | None = None
    tags: tuple[str, ...] = ()
    assignee_id: str | None = None
    group_id: str | None = None
    custom_fields: dict[str, Any] = Field(default_factory=dict)
    comment: Comment | None = None
    rating: Rating | None = None
    client: Client | None = None
    occurred_at: datetime | None = None
    #: The helpdesk's own id for this delivery (Zendesk invocation id, webhook-id), if any.
    delivery_id: str | None = None
    #: True when the poller found this change because its webhook never arrived.
    recovered_by_poll: bool = False

    def dedup_key(self) -> str | None:
        """Stable per change: the source's delivery id, else a hash of what changed and when.

        None when the event carries neither a change time nor a comment id: two
        such events may be genuinely different (the same "ok" written twice), so
        they are never merged.
        """
        if self.delivery_id:
            return f"id:{self.delivery_id}"
        if self.occurred_at is None and (self.comment is None or self.comment.id is None):
            return None
        parts = [
            self.ticket_id,
            self.kind.value,
            self.occurred_at.astimezone(UTC).isoformat() if self.occurred_at else "",
            self.comment.id if self.comment and self.comment.id else "",
            self.status.value if self.status else "",
            self.rating.value if self.rating else "",
        ]
        digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
        return f"h:{digest}"

    def occurred_ts(self) -> float | None:
        return self.occurred_at.timestamp() if self.occurred_at else None


# --- normalizers -----------------------------------------------------------------


def normalize_phone(raw: str, default_region: str = "RU") -> str | None:
    """E.164 for anything that reads as a possible phone number, else None.

    Extensions ("доб. 12", "ext. 3") are dropped: the CRM matches on the line itself.
    """
    text = raw.strip()
    if not text:
        return None
    try:
        number = phonenumbers.parse(text, default_region.upper())
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_email(raw: str) -> str | None:
    text = raw.strip().strip("<>").strip().lower()
    if "@" not in text or " " in text or text.startswith("@") or text.endswith("@"):
        return None
    return text


def make_client(
    *,
    source_id: object = None,
    name: object = None,
    emails: list[object] | tuple[object, ...] = (),
    phones: list[object] | tuple[object, ...] = (),
    default_region: str = "RU",
) -> Client:
    """Build a Client from loosely-typed source values, normalizing and de-duplicating."""
    clean_emails: list[str] = []
    for value in emails:
        email = normalize_email(str(value)) if value not in (None, "") else None
        if email and email not in clean_emails:
            clean_emails.append(email)
    clean_phones: list[str] = []
    unparsed: list[str] = []
    for value in phones:
        if value in (None, ""):
            continue
        phone = normalize_phone(str(value), default_region)
        if phone is None:
            unparsed.append(str(value).strip())
        elif phone not in clean_phones:
            clean_phones.append(phone)
    return Client(
        source_id=as_id(source_id),
        name=str(name).strip() or None if name not in (None, "") else None,
        emails=tuple(clean_emails),
        phones=tuple(clean_phones),
        unparsed_phones=tuple(unparsed),
    )


def as_id(value: object) -> str | None:
    """Ids arrive as numbers or as strings of digits (Usedesk); keep them as strings."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None if text not in ("0", "null") else None
