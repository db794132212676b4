"""Fold the plans of several events of one ticket into one plan. Pure: no I/O.

When a burst of updates to one ticket is waiting, the dispatcher sends them
as one delivery (the *carrier*) instead of one by one. The folded plan must
leave the CRM exactly as the separate plans would have, in order, with fewer
requests:

- contacts and deals are upserted once each, with the state the sequence
  would have left behind: for every field the latest event that set it wins,
  and the deal ends at the stage of the latest status move;
- every note of every event is kept, in event order, each under its own
  event key, so no message is lost and a note already written is found again.

The order of operations stays the one a single plan has (contacts, deals,
notes), so a note's deal exists before the note is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from syncd.mapping import AddNote, Plan, UpsertContact, UpsertDeal


def _last(*values: str | None) -> str | None:
    for value in reversed(values):
        if value is not None:
            return value
    return None


def _merge_contact(a: UpsertContact, b: UpsertContact) -> UpsertContact:
    """``b`` happened after ``a``: what an update with ``a`` then one with ``b`` leaves."""
    identities = tuple(dict.fromkeys((*b.identities, *a.identities)))
    return replace(
        a,
        identities=identities,
        # An update writes only what its event knows: an empty value never blanks.
        name=b.name if b.name else a.name,
        emails=b.emails or a.emails,
        phones=b.phones or a.phones,
        fields={**a.fields, **b.fields},
        responsible_id=_last(a.responsible_id, b.responsible_id),
    )


def _merge_deal(a: UpsertDeal, b: UpsertDeal) -> UpsertDeal:
    # The deal ends where the latest status move put it; with no move, a new deal
    # starts at the stage the first event gave it.
    stage: str | None = a.stage_id
    move = a.move_stage
    if b.move_stage and b.stage_id is not None:
        stage, move = b.stage_id, True
    return replace(
        a,
        title=_last(a.title, b.title),
        fallback_title=b.fallback_title or a.fallback_title,
        pipeline=_last(a.pipeline, b.pipeline),
        pipeline_id=_last(a.pipeline_id, b.pipeline_id),
        stage_id=stage,
        move_stage=move,
        responsible_id=_last(a.responsible_id, b.responsible_id),
        fields={**a.fields, **b.fields},
        contact_key=_last(a.contact_key, b.contact_key),
    )


def merge_plans(plans: Sequence[Plan]) -> Plan:
    """One plan with the effect of ``plans`` run one after another (oldest first)."""
    if len(plans) == 1:
        return plans[0]
    contacts: dict[str, UpsertContact] = {}
    deals: dict[str, UpsertDeal] = {}
    notes: list[AddNote] = []
    seen_notes: set[str] = set()
    for p in plans:
        for op in p.operations:
            if isinstance(op, UpsertContact):
                old = contacts.get(op.key)
                contacts[op.key] = op if old is None else _merge_contact(old, op)
            elif isinstance(op, UpsertDeal):
                prev = deals.get(op.key)
                deals[op.key] = op if prev is None else _merge_deal(prev, op)
            elif op.key not in seen_notes:
                seen_notes.add(op.key)
                notes.append(op)
    matched = [p for p in plans if p.matched]
    latest = matched[-1] if matched else plans[-1]
    reasons = tuple(
        f"event {i + 1} of {len(plans)}: {line}" for i, p in enumerate(plans) for line in p.reasons
    )
    return Plan(
        operations=(*contacts.values(), *deals.values(), *notes),
        rule=latest.rule,
        reasons=reasons,
        matched=bool(matched),
    )
