"""Static checks of a mapping config, for ``syncd check-config``: each names the rule."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from syncd.errors import MappingError
from syncd.mapping.rules import MappingConfig, Rule, When
from syncd.mapping.templates import context, render
from syncd.ticket import Client, Comment, EventKind, Status, TicketEvent

#: A ticket with every field filled, to render templates against.
_SAMPLE = TicketEvent(
    source="sample",
    ticket_id="1",
    kind=EventKind.TICKET_CREATED,
    subject="Sample subject",
    status=Status.OPEN,
    source_status="open",
    channel="email",
    priority="normal",
    tags=("sample",),
    assignee_id="1",
    group_id="1",
    custom_fields={},
    comment=Comment(id="1", text="Sample message"),
    client=Client(
        source_id="1",
        name="Sample Client",
        emails=("client@example.com",),
        phones=("+70000000000",),
    ),
    occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
)


def _covers(a: list[object] | None, b: list[object] | None) -> bool:
    """Condition ``a`` accepts everything condition ``b`` accepts."""
    return a is None or (b is not None and set(b) <= set(a))


def shadows(earlier: When, later: When) -> bool:
    """True when every ticket matching ``later`` already matches ``earlier``."""
    if not all(
        _covers(getattr(earlier, name), getattr(later, name))
        for name in ("source", "kind", "channel", "priority", "status")
    ):
        return False
    if earlier.tags_all is not None and not (
        later.tags_all and set(earlier.tags_all) <= set(later.tags_all)
    ):
        return False
    if earlier.tags_none is not None and not (
        later.tags_none and set(earlier.tags_none) <= set(later.tags_none)
    ):
        return False
    if earlier.tags_any is not None:
        later_any = set(later.tags_any) if later.tags_any is not None else None
        later_all = set(later.tags_all or [])
        if not (
            (later_any is not None and later_any <= set(earlier.tags_any))
            or later_all & set(earlier.tags_any)
        ):
            return False
    if earlier.client != "any" and earlier.client != later.client:
        return False
    for name, accepted in (earlier.custom_fields or {}).items():
        theirs = (later.custom_fields or {}).get(name)
        if theirs is None or not set(theirs) <= set(accepted):
            return False
    return True


def impossible(when: When) -> str | None:
    """Why a rule's conditions contradict each other, if they do."""
    for name in ("source", "kind", "channel", "priority", "status", "tags_any"):
        if getattr(when, name) == []:
            return f"when.{name} is an empty list, which nothing matches"
    clash = set(when.tags_all or []) & set(when.tags_none or [])
    if clash:
        return f"when.tags_all and when.tags_none both name {sorted(clash)}"
    if when.tags_any is not None and set(when.tags_any) <= set(when.tags_none or []):
        return "every tag of when.tags_any is also in when.tags_none"
    return None


def check_mapping(config: MappingConfig, prefix: str = "mapping") -> list[tuple[str, str]]:
    """(key path, problem) pairs; an empty list means the mapping is usable."""
    problems: list[tuple[str, str]] = []
    try:
        ZoneInfo(config.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append((f"{prefix}.timezone", f"unknown time zone {config.timezone!r}"))
    for name, pipeline in config.pipelines.items():
        if (
            pipeline.initial_stage is not None
            and pipeline.stages
            and pipeline.initial_stage not in pipeline.stages.values()
        ):
            problems.append(
                (
                    f"{prefix}.pipelines.{name}.initial_stage",
                    f"stage {pipeline.initial_stage!r} is not one of this pipeline's stages "
                    f"({', '.join(sorted(set(pipeline.stages.values())))})",
                )
            )
    variables = context(_SAMPLE, 1)
    seen: list[Rule] = []
    names: set[str] = set()
    for i, rule in enumerate(config.rules):
        where = f"{prefix}.rules.{i}"
        label = f"rule {rule.name!r}"
        if rule.name in names:
            problems.append((f"{where}.name", f"{label}: another rule has the same name"))
        names.add(rule.name)
        if rule.then.pipeline is not None and rule.then.pipeline not in config.pipelines:
            known = ", ".join(config.pipelines) or "none defined"
            problems.append(
                (
                    f"{where}.then.pipeline",
                    f"{label}: unknown pipeline {rule.then.pipeline!r} (known: {known})",
                )
            )
        templates = {"then.title": rule.then.title}
        templates.update({f"then.deal_fields.{k}": v for k, v in rule.then.deal_fields.items()})
        templates.update(
            {f"then.contact_fields.{k}": v for k, v in rule.then.contact_fields.items()}
        )
        for key, source in templates.items():
            try:
                render(source, variables)
            except MappingError as exc:
                problems.append((f"{where}.{key}", f"{label}: {exc}"))
        reason = impossible(rule.when)
        if reason:
            problems.append((f"{where}.when", f"{label} can never match: {reason}"))
            continue  # it matches nothing, so it hides nothing either
        for earlier in seen:
            if shadows(earlier.when, rule.when):
                problems.append(
                    (
                        f"{where}.when",
                        f"{label} can never match: rule {earlier.name!r} above it "
                        "matches every ticket it would",
                    )
                )
                break
        seen.append(rule)
    return problems
