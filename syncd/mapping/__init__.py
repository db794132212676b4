"""Mapping: a ticket event in, a plan of CRM operations out. Pure: no I/O."""

from __future__ import annotations

from typing import Any

from syncd.mapping.plan import Plan, Upsert

__all__ = ["Plan", "Upsert", "plan_event"]

#: Payload keys that become deal fields as they are, in the walking-skeleton mapping.
_DEAL_FIELDS = ("subject", "status", "channel", "priority", "client", "assignee", "tags")


def plan_event(
    *, source: str, ticket_id: str, kind: str, event_id: int, payload: dict[str, Any]
) -> Plan:
    """The minimal mapping: one deal per ticket, one timeline note per comment."""
    deal_key = f"{source}:ticket:{ticket_id}"
    fields: dict[str, Any] = {"ticket_id": ticket_id, "source": source, "last_event": kind}
    for name in _DEAL_FIELDS:
        if name in payload:
            fields[name] = payload[name]
    ops = [Upsert(entity="deal", external_key=deal_key, fields=fields)]
    comment = payload.get("comment")
    if comment:
        ops.append(
            Upsert(
                entity="note",
                external_key=f"{source}:event:{event_id}",
                fields={"text": comment if isinstance(comment, str) else str(comment)},
                create_only=True,
                parent=deal_key,
            )
        )
    return Plan(operations=tuple(ops))
