"""Jinja2 templates for titles and field values, rendered in a sandbox.

The sandbox keeps a template from reaching Python internals; StrictUndefined
turns a misspelt variable into an error at ``check-config`` time instead of
an empty string in the CRM.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from syncd.errors import MappingError
from syncd.ticket import TicketEvent

_ENV = SandboxedEnvironment(
    undefined=StrictUndefined,
    autoescape=False,
    keep_trailing_newline=False,
    # A missing value renders as nothing, not as the word "None".
    finalize=lambda value: "" if value is None else value,
)


@lru_cache(maxsize=512)
def _compiled(source: str) -> Any:
    return _ENV.from_string(source)


def context(event: TicketEvent, event_id: int = 0) -> dict[str, Any]:
    """The variables a template sees. Missing values are None, never absent."""
    client = event.client
    comment = event.comment
    return {
        "ticket": {
            "id": event.ticket_id,
            "source": event.source,
            "subject": event.subject,
            "status": event.status.value if event.status else None,
            "source_status": event.source_status,
            "channel": event.channel,
            "priority": event.priority,
            "tags": list(event.tags),
            "assignee_id": event.assignee_id,
            "group_id": event.group_id,
            "custom_fields": dict(event.custom_fields),
        },
        "client": {
            "id": client.source_id if client else None,
            "name": client.name if client else None,
            "email": client.emails[0] if client and client.emails else None,
            "emails": list(client.emails) if client else [],
            "phone": client.phones[0] if client and client.phones else None,
            "phones": list(client.phones) if client else [],
        },
        "comment": {
            "text": comment.text if comment else None,
            "author": comment.author.value if comment else None,
            "public": comment.public if comment else None,
        },
        "event": {
            "id": event_id,
            "kind": event.kind.value,
            "occurred_at": event.occurred_at.isoformat() if event.occurred_at else None,
            "recovered_by_poll": event.recovered_by_poll,
        },
    }


def render(source: str, variables: dict[str, Any]) -> str:
    try:
        return str(_compiled(source).render(variables)).strip()
    except TemplateError as exc:
        raise MappingError(f"template {source!r} does not render: {exc}") from None
