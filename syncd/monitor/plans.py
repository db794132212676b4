"""The mapping plan of a stored event, as the current config would make it.

The monitor shows this beside the attempts: it is what a resend would send now,
which is what an admin fixing a rule wants to see.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from syncd.config import Config
from syncd.errors import MappingError
from syncd.mapping import plan
from syncd.mapping.plan import Plan
from syncd.monitor.queries import EventDetail
from syncd.ticket import TicketEvent


def plan_of(config: Config, event: EventDetail, destination: str) -> dict[str, Any]:
    """A JSON-ready description of the plan, or the reason there is none."""
    if destination not in config.destinations:
        return {"error": f"destination {destination!r} is no longer in the config"}
    try:
        ticket = TicketEvent.model_validate(event.payload)
        result: Plan = plan(ticket, config.mapping_for(destination), event_id=event.id)
    except ValidationError as exc:
        return {"error": f"the stored event cannot be read: {exc.error_count()} problem(s)"}
    except MappingError as exc:
        return {"error": str(exc)}
    return {
        "matched": result.matched,
        "rule": result.rule or None,
        "reasons": list(result.reasons),
        "operations": [
            {"op": type(op).__name__, **dataclasses.asdict(op)} for op in result.operations
        ],
        "keys": [
            (r.entity, key)
            for r in result.records()
            if r.entity != "note"
            for key in (r.external_key, *r.identities)
        ],
    }


def keys_for_trace(config: Config, events: list[EventDetail]) -> dict[str, list[tuple[str, str]]]:
    """{destination: [(entity, key)]} of the ticket's contact and deal, from its latest event."""
    out: dict[str, list[tuple[str, str]]] = {}
    if not events:
        return out
    latest = events[-1]
    for dest in {d.destination for e in events for d in e.deliveries}:
        described = plan_of(config, latest, dest)
        out[dest] = [(str(k[0]), str(k[1])) for k in described.get("keys", [])]
    return out
