"""Mapping: a ticket event in, a plan of CRM operations out. Pure: no I/O."""

from __future__ import annotations

from typing import Any

from syncd.mapping.plan import Plan, Upsert
from syncd.ticket import TicketEvent

__all__ = ["Plan", "Upsert", "plan_event"]


def _deal_fields(event: TicketEvent) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ticket_id": event.ticket_id,
        "source": event.source,
        "last_event": event.kind.value,
    }
    if event.subject is not None:
        fields["subject"] = event.subject
    if event.status is not None:
        fields["status"] = event.status.value
    for name in ("channel", "priority", "assignee_id", "group_id"):
        value = getattr(event, name)
        if value is not None:
            fields[name] = value
    if event.tags:
        fields["tags"] = list(event.tags)
    if event.client is not None:
        fields["client"] = {
            "name": event.client.name,
            "emails": list(event.client.emails),
            "phones": list(event.client.phones),
        }
    return fields


def plan_event(event: TicketEvent, event_id: int) -> Plan:
    """The minimal mapping: one deal per ticket, one timeline note per public comment."""
    deal_key = f"{event.source}:ticket:{event.ticket_id}"
    ops = [Upsert(entity="deal", external_key=deal_key, fields=_deal_fields(event))]
    if event.comment is not None and event.comment.text and event.comment.public:
        ops.append(
            Upsert(
                entity="note",
                external_key=f"{event.source}:event:{event_id}",
                fields={"text": event.comment.text, "author": event.comment.author.value},
                create_only=True,
                parent=deal_key,
            )
        )
    return Plan(operations=tuple(ops))
