"""The mapping engine: event + mapping config (+ whether the client is known) -> plan."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

from syncd.errors import MappingError
from syncd.mapping.plan import AddNote, Operation, Plan, UpsertContact, UpsertDeal
from syncd.mapping.rules import MappingConfig, Rule, When
from syncd.mapping.templates import context, render
from syncd.ticket import AuthorKind, EventKind, TicketEvent


def match(when: When, event: TicketEvent, client_exists: bool | None) -> tuple[bool, list[str]]:
    """Whether ``when`` holds for the event, and one line per condition saying why."""
    reasons: list[str] = []

    def check(name: str, ok: bool, detail: str) -> bool:
        reasons.append(f"{name}: {detail} -> {'yes' if ok else 'no'}")
        return ok

    ok = True
    tags = set(event.tags)
    if when.source is not None:
        ok &= check("source", event.source in when.source, f"{event.source!r} in {when.source}")
    if when.kind is not None:
        ok &= check(
            "kind",
            event.kind in when.kind,
            f"{event.kind.value!r} in {[k.value for k in when.kind]}",
        )
    if when.channel is not None:
        ok &= check(
            "channel", event.channel in when.channel, f"{event.channel!r} in {when.channel}"
        )
    if when.priority is not None:
        ok &= check(
            "priority", event.priority in when.priority, f"{event.priority!r} in {when.priority}"
        )
    if when.status is not None:
        value = event.status.value if event.status else None
        ok &= check(
            "status", event.status in when.status, f"{value!r} in {[s.value for s in when.status]}"
        )
    if when.tags_any is not None:
        ok &= check(
            "tags_any",
            bool(tags & set(when.tags_any)),
            f"{sorted(tags)} has any of {when.tags_any}",
        )
    if when.tags_all is not None:
        ok &= check(
            "tags_all", set(when.tags_all) <= tags, f"{sorted(tags)} has all of {when.tags_all}"
        )
    if when.tags_none is not None:
        ok &= check(
            "tags_none",
            not tags & set(when.tags_none),
            f"{sorted(tags)} has none of {when.tags_none}",
        )
    if when.client != "any":
        state = "unknown" if client_exists is None else ("existing" if client_exists else "new")
        ok &= check("client", state == when.client, f"client is {state}, rule wants {when.client}")
    for name, accepted in (when.custom_fields or {}).items():
        value = event.custom_fields.get(name)
        shown = None if value is None else str(value)
        ok &= check(f"custom_fields.{name}", shown in accepted, f"{shown!r} in {accepted}")
    if not reasons:
        reasons.append("no conditions: matches every ticket")
    return ok, reasons


def choose_rule(
    config: MappingConfig, event: TicketEvent, client_exists: bool | None
) -> tuple[Rule | None, list[str]]:
    explanation: list[str] = []
    for rule in config.rules:
        ok, reasons = match(rule.when, event, client_exists)
        if ok:
            return rule, [f"rule {rule.name!r} matched:", *(f"  {r}" for r in reasons)]
        failed = [r for r in reasons if r.endswith("-> no")]
        explanation.append(f"rule {rule.name!r} did not match: {'; '.join(failed)}")
    return None, explanation


def _rendered(templates: dict[str, str], variables: dict[str, object]) -> dict[str, str]:
    """Render field templates; a field that renders empty is left out, so an event that
    knows nothing about it does not blank what the CRM holds."""
    out = {}
    for name, source in templates.items():
        value = render(source, variables)
        if value:
            out[name] = value
    return out


def responsible(config: MappingConfig, rule: Rule, event: TicketEvent) -> str | None:
    if rule.then.responsible is not None:
        return rule.then.responsible
    if event.assignee_id is not None and event.assignee_id in config.agents:
        return config.agents[event.assignee_id]
    if event.group_id is not None and event.group_id in config.groups:
        return config.groups[event.group_id]
    return config.default_responsible


def contact_keys(event: TicketEvent) -> tuple[str | None, tuple[str, ...]]:
    """The client's primary key (its helpdesk id) and the identities that also name it."""
    client = event.client
    if client is None:
        return None, ()
    identities = tuple(f"email:{e}" for e in client.emails) + tuple(
        f"phone:{p}" for p in client.phones
    )
    if client.source_id is not None:
        return f"{event.source}:client:{client.source_id}", identities
    if identities:
        return identities[0], identities[1:]
    return None, ()


def plan(
    event: TicketEvent,
    config: MappingConfig,
    *,
    event_id: int,
    client_exists: bool | None = None,
) -> Plan:
    """Pure: the same event, config and client state always give the same plan."""
    rule, reasons = choose_rule(config, event, client_exists)
    if rule is None:
        return Plan(operations=(), rule="", reasons=tuple(reasons), matched=False)
    then = rule.then
    variables = context(event, event_id)
    ops: list[Operation] = []
    owner = responsible(config, rule, event)

    contact_key, identities = contact_keys(event)
    if contact_key is not None and event.client is not None:
        ops.append(
            UpsertContact(
                key=contact_key,
                identities=identities,
                name=event.client.name,
                emails=event.client.emails,
                phones=event.client.phones,
                fields=_rendered(then.contact_fields, variables),
                responsible_id=owner,
            )
        )

    deal_key: str | None = None
    if then.create_deal:
        deal_key = f"{event.source}:ticket:{event.ticket_id}"
        pipeline = config.pipelines.get(then.pipeline) if then.pipeline else None
        if then.pipeline and pipeline is None:
            raise MappingError(f"rule {rule.name!r} names unknown pipeline {then.pipeline!r}")
        stage = None
        move = False
        if pipeline is not None:
            by_status = pipeline.stages.get(event.status) if event.status else None
            if event.kind == EventKind.TICKET_CREATED:
                stage = pipeline.initial_stage or by_status
            else:
                # The deal follows the ticket: a known status moves it, otherwise it stays.
                stage = by_status
                move = by_status is not None
        fields = _rendered(then.deal_fields, variables)
        if (
            then.first_response_minutes
            and then.first_response_field
            and event.kind == EventKind.TICKET_CREATED
        ):
            start = event.occurred_at
            if start is not None:
                due = (start + timedelta(minutes=then.first_response_minutes)).astimezone(
                    ZoneInfo(config.timezone)
                )
                fields[then.first_response_field] = due.isoformat(timespec="seconds")
        # A title is (re)written only by events that carry a subject, or create the ticket.
        title = None
        if event.subject is not None or event.kind == EventKind.TICKET_CREATED:
            title = render(then.title, variables) or f"Ticket {event.ticket_id}"
        ops.append(
            UpsertDeal(
                key=deal_key,
                title=title,
                fallback_title=f"Ticket {event.ticket_id}",
                pipeline=then.pipeline,
                pipeline_id=pipeline.id if pipeline else None,
                stage_id=stage,
                move_stage=move,
                responsible_id=owner,
                fields=fields,
                contact_key=contact_key,
            )
        )

    comment = event.comment
    wanted = then.timeline == "all" or (
        then.timeline == "public" and comment is not None and comment.public
    )
    if comment is not None and comment.text and wanted:
        parent_key, parent_entity = (deal_key, "deal") if deal_key else (contact_key, "contact")
        if parent_key is not None:
            text = comment.text
            if then.note_author:
                who = {
                    AuthorKind.CLIENT: "Client",
                    AuthorKind.AGENT: "Agent",
                    AuthorKind.SYSTEM: "System",
                }[comment.author]
                if comment.author_id and comment.author != AuthorKind.CLIENT:
                    who += f" {comment.author_id}"
                if not comment.public:
                    who += " (private)"
                text = f"{who}: {text}"
            ops.append(
                AddNote(
                    key=f"{event.source}:event:{event_id}",
                    parent_key=parent_key,
                    parent_entity=parent_entity,  # type: ignore[arg-type]
                    text=text,
                )
            )
    return Plan(operations=tuple(ops), rule=rule.name, reasons=tuple(reasons), matched=True)
