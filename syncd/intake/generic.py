"""The generic JSON webhook source: a shared secret in a header, a ticket id in the body."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

from syncd.config import SourceConfig
from syncd.errors import AuthenticationFailed, InvalidPayload
from syncd.events import IncomingEvent


def _dig(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


class GenericSource:
    def __init__(self, name: str, config: SourceConfig, destinations: list[str]) -> None:
        self.name = name
        self.config = config
        self.destinations = tuple(destinations)
        self._secret = config.secret.get_secret_value().encode()

    def authenticate(self, headers: Mapping[str, str], body: bytes) -> None:
        given = headers.get(self.config.secret_header.lower(), "")
        # Constant-time: the comparison must not reveal how much of the secret matched.
        if not hmac.compare_digest(given.encode(), self._secret):
            raise AuthenticationFailed(f"missing or wrong {self.config.secret_header} header")

    def parse(self, body: bytes) -> IncomingEvent:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidPayload(f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidPayload(f"body must be a JSON object, got {type(data).__name__}")
        ticket_id = _dig(data, self.config.ticket_id_field)
        if isinstance(ticket_id, bool) or not isinstance(ticket_id, str | int) or ticket_id == "":
            raise InvalidPayload(
                f"field {self.config.ticket_id_field!r} must hold the ticket id "
                "(a string or number)"
            )
        kind = _dig(data, self.config.kind_field)
        dedup = _dig(data, self.config.dedup_field) if self.config.dedup_field else None
        return IncomingEvent(
            source=self.name,
            ticket_id=str(ticket_id),
            kind=str(kind) if isinstance(kind, str | int) and kind != "" else "ticket_updated",
            payload=data,
            dedup_key=str(dedup) if isinstance(dedup, str | int) and dedup != "" else None,
            destinations=self.destinations,
        )
