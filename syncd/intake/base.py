"""What a helpdesk source implements: check a webhook, turn it into ticket events, and poll.

A source never touches the store. The intake route authenticates, parses,
and hands the events to the outbox; a poller returns what it saw and the
reconciler decides what is missing.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel

from syncd.errors import InvalidPayload
from syncd.ticket import TicketEvent


@dataclass(frozen=True)
class RawRequest:
    """A webhook as it arrived. Header names are lower-case."""

    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    #: Epoch seconds when syncd received it (for timestamp tolerance checks).
    received_at: float = 0.0


class WebhookSource(ABC):
    """One configured helpdesk. Subclasses set :attr:`kind` and :attr:`settings_model`."""

    kind: ClassVar[str]
    settings_model: ClassVar[type[BaseModel]]

    def __init__(self, name: str, settings: BaseModel, *, default_region: str = "RU") -> None:
        self.name = name
        self.settings = settings
        self.default_region = default_region

    @abstractmethod
    def authenticate(self, request: RawRequest) -> None:
        """Raise AuthenticationFailed unless the request provably comes from the helpdesk."""

    @abstractmethod
    def parse(self, request: RawRequest) -> list[TicketEvent]:
        """The events in an authenticated request; raise InvalidPayload if it cannot be read."""

    def poller(self, transport: httpx.AsyncBaseTransport | None = None) -> Poller | None:
        """A poller for this source, or None when the source cannot be polled."""
        return None


@dataclass(frozen=True)
class PolledTicket:
    """One ticket the helpdesk reports as changed since the cursor."""

    ticket_id: str
    updated_at: datetime
    #: Events describing the ticket's current state and any comments, oldest first.
    events: list[TicketEvent]


@dataclass(frozen=True)
class PollPage:
    tickets: list[PolledTicket]
    #: Opaque cursor to store once this page is handled; None keeps the old one.
    cursor: str | None
    #: True when the helpdesk has nothing more right now.
    done: bool


class Poller(ABC):
    """Asks the helpdesk what changed, page by page, from a stored cursor."""

    #: How often to poll, in seconds (from the source's settings).
    interval: float = 300.0

    @abstractmethod
    async def fetch(self, cursor: str | None) -> PollPage:
        """One page of changed tickets after ``cursor`` (None: from the configured look-back)."""

    async def check(self) -> list[str]:
        """Verify the credentials with one light request; raise a DeliveryError if broken.

        Returns what was verified, one line each, for ``check-config --ping``
        (empty: this poller has no check).
        """
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections."""


def text_value(value: object) -> str | None:
    """A scalar as stripped text; None for nothing, an empty string, an object, a list or a bool."""
    if value is None or isinstance(value, dict | list | bool):
        return None
    text = str(value).strip()
    return text or None


def json_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body or raise InvalidPayload with a readable reason."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise InvalidPayload("body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidPayload(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidPayload(f"body must be a JSON object, got {type(data).__name__}")
    return data
