"""``syncd preview``: what a payload would do in the CRM, without contacting it.

Parses the payload as its source would, then runs the mapping for each of
the source's destinations and describes the plan: which rule matched and
why, and every operation. Nothing is stored and no CRM is called; whether
the client already exists is given by the caller (new, existing, unknown).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from syncd.config import Config
from syncd.errors import IntakeError, MappingError
from syncd.intake import registry as source_registry
from syncd.intake.base import RawRequest
from syncd.mapping import plan

ClientState = Literal["new", "existing", "unknown"]


def preview(
    config: Config,
    source: str,
    body: bytes,
    *,
    destination: str | None = None,
    client: ClientState = "unknown",
) -> dict[str, Any]:
    if source not in config.sources:
        return {
            "error": f"no source named {source!r} (known: {', '.join(config.sources) or 'none'})"
        }
    src = source_registry.build(
        source, config.sources[source], default_region=config.intake.default_country
    )
    try:
        events = src.parse(RawRequest(body=body))
    except IntakeError as exc:
        return {"source": source, "error": f"the payload cannot be read: {exc.reason}"}
    destinations = [destination] if destination else config.destinations_for(source)
    client_exists = {"new": False, "existing": True, "unknown": None}[client]
    out: list[dict[str, Any]] = []
    for index, event in enumerate(events, start=1):
        for dest in destinations:
            entry: dict[str, Any] = {
                "event": event.model_dump(mode="json", exclude_defaults=True),
                "destination": dest,
            }
            try:
                result = plan(
                    event, config.mapping_for(dest), event_id=index, client_exists=client_exists
                )
            except MappingError as exc:
                entry["error"] = str(exc)
            else:
                entry.update(
                    matched=result.matched,
                    rule=result.rule or None,
                    reasons=list(result.reasons),
                    operations=[
                        {"op": type(op).__name__, **dataclasses.asdict(op)}
                        for op in result.operations
                    ],
                )
            out.append(entry)
    return {"source": source, "plans": out}


def render_text(result: dict[str, Any]) -> str:
    """The preview as an operator reads it in a terminal."""
    if "plans" not in result:
        return str(result.get("error"))
    lines: list[str] = []
    for entry in result["plans"]:
        ev = entry["event"]
        lines.append(
            f"event: {ev['kind']} of ticket {ev['ticket_id']} -> destination {entry['destination']}"
        )
        if "error" in entry:
            lines.append(f"  mapping error: {entry['error']}")
            continue
        if not entry["matched"]:
            lines.append(
                "  NO RULE MATCHED: the delivery would fail (or be skipped, per mapping.unmatched)"
            )
        lines.extend(f"  {reason}" for reason in entry["reasons"])
        for number, op in enumerate(entry["operations"], start=1):
            details = ", ".join(
                f"{k}={v!r}" for k, v in op.items() if k != "op" and v not in (None, (), [], {}, "")
            )
            lines.append(f"  {number}. {op['op']}: {details}")
        lines.append("")
    return "\n".join(lines).rstrip()
