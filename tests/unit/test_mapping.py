"""The mapping engine, table by table: routing, stages, timeline, users, templates."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.errors import MappingError
from syncd.mapping import AddNote, MappingConfig, UpsertContact, UpsertDeal, check_mapping, plan
from syncd.ticket import AuthorKind, Comment, EventKind, Status, TicketEvent, make_client

RULES = """
agents = { "545" = "12" }
groups = { "3" = "14" }
default_responsible = "1"
timezone = "Europe/Moscow"

[pipelines.sales]
id = "0"
initial_stage = "NEW"
stages = { new = "NEW", open = "PREPARATION", pending = "EXECUTING", solved = "WON", closed = "WON", spam = "LOSE" }

[pipelines.support]
id = "2"
stages = { new = "C2:NEW", open = "C2:WORK", pending = "C2:WAIT", solved = "C2:SOLVED", closed = "C2:CLOSED", spam = "C2:JUNK" }

[[rules]]
name = "spam is dropped to the contact"
when.status = ["spam"]
then.create_deal = false
then.timeline = "none"

[[rules]]
name = "phone and chat go to sales"
when.channel = ["phone", "chat", "telegram"]
then.pipeline = "sales"
then.title = "Sales: {{ ticket.subject }}"
then.first_response_minutes = 15
then.first_response_field = "UF_CRM_FIRST_REPLY_DUE"

[[rules]]
name = "new clients go to sales"
when.client = "new"
then.pipeline = "sales"
then.timeline = "all"

[[rules]]
name = "everything else is support"
then.pipeline = "support"
then.deal_fields = { UF_CRM_CHANNEL = "{{ ticket.channel }}", UF_CRM_TAGS = "{{ ticket.tags | join(', ') }}" }
then.first_response_minutes = 120
then.first_response_field = "UF_CRM_FIRST_REPLY_DUE"
"""
CONFIG = MappingConfig.model_validate(tomllib.loads(RULES))
T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def event(**kw: object) -> TicketEvent:
    base: dict[str, object] = {
        "source": "ud",
        "ticket_id": "42",
        "kind": EventKind.TICKET_CREATED,
        "subject": "Order is late",
        "status": Status.NEW,
        "channel": "email",
        "client": make_client(
            source_id="7", name="Anna", emails=["anna@example.com"], phones=["89991234567"]
        ),
        "occurred_at": T0,
    }
    base.update(kw)
    return TicketEvent.model_validate(base)


def deal_of(p: object) -> UpsertDeal:
    [deal] = [op for op in p.operations if isinstance(op, UpsertDeal)]  # type: ignore[attr-defined]
    return deal


@pytest.mark.parametrize(
    ("channel", "client_exists", "rule", "pipeline_id", "stage"),
    [
        ("phone", True, "phone and chat go to sales", "0", "NEW"),
        ("chat", False, "phone and chat go to sales", "0", "NEW"),
        ("email", True, "everything else is support", "2", "C2:NEW"),
        ("email", False, "new clients go to sales", "0", "NEW"),
        ("web", None, "everything else is support", "2", "C2:NEW"),  # unknown client: not "new"
    ],
)
def test_routing(
    channel: str, client_exists: bool | None, rule: str, pipeline_id: str, stage: str
) -> None:
    p = plan(event(channel=channel), CONFIG, event_id=1, client_exists=client_exists)
    assert p.matched and p.rule == rule
    deal = deal_of(p)
    assert (deal.pipeline_id, deal.stage_id) == (pipeline_id, stage)
    assert p.reasons[0] == f"rule {rule!r} matched:"


@pytest.mark.parametrize(
    ("channel", "status", "stage"),
    [
        ("phone", Status.SOLVED, "WON"),
        ("phone", Status.CLOSED, "WON"),
        ("phone", Status.PENDING, "EXECUTING"),
        ("email", Status.SOLVED, "C2:SOLVED"),
        ("email", Status.CLOSED, "C2:CLOSED"),
        ("email", Status.OPEN, "C2:WORK"),
    ],
)
def test_status_moves_the_stage_per_pipeline(channel: str, status: Status, stage: str) -> None:
    p = plan(
        event(kind=EventKind.STATUS_CHANGED, channel=channel, status=status, subject=None),
        CONFIG,
        event_id=2,
        client_exists=True,
    )
    deal = deal_of(p)
    assert deal.stage_id == stage and deal.move_stage
    assert deal.title is None  # an update without a subject leaves the title alone


def test_update_without_status_does_not_move_the_stage() -> None:
    p = plan(
        event(kind=EventKind.COMMENT_ADDED, status=None, comment=Comment(text="hi")),
        CONFIG,
        event_id=3,
        client_exists=True,
    )
    deal = deal_of(p)
    assert deal.stage_id is None and not deal.move_stage


@pytest.mark.parametrize(
    ("channel", "client_exists", "public", "author", "expected"),
    [
        ("email", True, True, AuthorKind.CLIENT, "Client: Where is it?"),
        ("email", True, False, AuthorKind.AGENT, None),  # support: public only
        (
            "email",
            False,
            False,
            AuthorKind.AGENT,
            "Agent 545 (private): Where is it?",
        ),  # new client rule: all
        ("phone", True, False, AuthorKind.AGENT, None),
    ],
)
def test_timeline_public_or_all(
    channel: str, client_exists: bool, public: bool, author: AuthorKind, expected: str | None
) -> None:
    comment = Comment(
        id="9",
        text="Where is it?",
        public=public,
        author=author,
        author_id="545" if author == AuthorKind.AGENT else None,
    )
    p = plan(
        event(kind=EventKind.COMMENT_ADDED, channel=channel, comment=comment),
        CONFIG,
        event_id=77,
        client_exists=client_exists,
    )
    notes = [op for op in p.operations if isinstance(op, AddNote)]
    if expected is None:
        assert notes == []
    else:
        assert [(n.key, n.parent_key, n.parent_entity, n.text) for n in notes] == [
            ("ud:event:77", "ud:ticket:42", "deal", expected)
        ]


def test_rule_without_deal_attaches_to_the_contact() -> None:
    p = plan(
        event(status=Status.SPAM, comment=Comment(text="buy pills")),
        CONFIG,
        event_id=5,
        client_exists=True,
    )
    assert p.rule == "spam is dropped to the contact"
    assert [type(op) for op in p.operations] == [UpsertContact]  # timeline "none"
    spam_rules = MappingConfig.model_validate(
        {"rules": [{"name": "x", "then": {"create_deal": False}}]}
    )
    p = plan(event(comment=Comment(text="hello")), spam_rules, event_id=6)
    assert [type(op) for op in p.operations] == [UpsertContact, AddNote]
    note = p.operations[1]
    assert isinstance(note, AddNote) and (note.parent_entity, note.parent_key) == (
        "contact",
        "ud:client:7",
    )


def test_contact_keys_and_identities() -> None:
    p = plan(event(), CONFIG, event_id=1, client_exists=True)
    contact = p.operations[0]
    assert isinstance(contact, UpsertContact)
    assert contact.key == "ud:client:7"
    assert contact.identities == ("email:anna@example.com", "phone:+79991234567")
    assert deal_of(p).contact_key == "ud:client:7"
    anonymous = plan(
        event(client=make_client(emails=["x@y.ru"])), CONFIG, event_id=1, client_exists=True
    )
    assert (
        isinstance(anonymous.operations[0], UpsertContact)
        and anonymous.operations[0].key == "email:x@y.ru"
    )


@pytest.mark.parametrize(
    ("assignee", "group", "expected"),
    [
        ("545", None, "12"),
        ("999", "3", "14"),
        (None, "3", "14"),
        (None, None, "1"),
        ("999", "999", "1"),
    ],
)
def test_responsible_user(assignee: str | None, group: str | None, expected: str) -> None:
    p = plan(event(assignee_id=assignee, group_id=group), CONFIG, event_id=1, client_exists=True)
    assert deal_of(p).responsible_id == expected


def test_templates_and_first_response_due() -> None:
    p = plan(event(tags=("vip", "b2b")), CONFIG, event_id=1, client_exists=True)
    deal = deal_of(p)
    assert deal.title == "Order is late"
    assert deal.fields == {
        "UF_CRM_CHANNEL": "email",
        "UF_CRM_TAGS": "vip, b2b",
        "UF_CRM_FIRST_REPLY_DUE": "2026-11-25T14:00:00+03:00",
    }
    sales = deal_of(plan(event(channel="phone"), CONFIG, event_id=1, client_exists=True))
    assert sales.title == "Sales: Order is late"
    assert sales.fields["UF_CRM_FIRST_REPLY_DUE"] == "2026-11-25T12:15:00+03:00"
    # no channel: the field renders empty and is left out rather than blanking the CRM
    assert (
        "UF_CRM_CHANNEL"
        not in deal_of(
            plan(
                event(channel=None, kind=EventKind.TICKET_UPDATED),
                CONFIG,
                event_id=1,
                client_exists=True,
            )
        ).fields
    )


def test_unmatched_is_reported_with_reasons() -> None:
    strict = MappingConfig.model_validate(
        {"rules": [{"name": "only chat", "when": {"channel": ["chat"]}}]}
    )
    p = plan(event(channel="email"), strict, event_id=1)
    assert not p.matched and p.operations == ()
    assert p.reasons == ("rule 'only chat' did not match: channel: 'email' in ['chat'] -> no",)


def test_bad_template_is_a_mapping_error() -> None:
    bad = MappingConfig.model_validate(
        {"rules": [{"name": "r", "then": {"title": "{{ ticket.nope }}"}}]}
    )
    with pytest.raises(MappingError, match="does not render"):
        plan(event(), bad, event_id=1)


def test_check_mapping_names_the_rule() -> None:
    config = MappingConfig.model_validate(
        tomllib.loads(
            """
timezone = "Mars/Olympus"
[pipelines.sales]
initial_stage = "NOPE"
stages = { new = "NEW" }
[[rules]]
name = "catch all"
[[rules]]
name = "never reached"
when.channel = ["phone"]
[[rules]]
name = "bad pipeline"
then.pipeline = "nowhere"
[[rules]]
name = "bad template"
then.title = "{{ ticket.subjekt }}"
then.deal_fields = { X = "{{ client.email | nosuchfilter }}" }
[[rules]]
name = "contradiction"
when.tags_all = ["vip"]
when.tags_none = ["vip"]
"""
        )
    )
    found = dict(check_mapping(config))
    assert "unknown time zone 'Mars/Olympus'" in found["mapping.timezone"]
    assert (
        "stage 'NOPE' is not one of this pipeline's stages"
        in found["mapping.pipelines.sales.initial_stage"]
    )
    assert (
        found["mapping.rules.1.when"]
        == "rule 'never reached' can never match: rule 'catch all' above it matches every ticket it would"
    )
    assert (
        "rule 'bad pipeline': unknown pipeline 'nowhere'" in found["mapping.rules.2.then.pipeline"]
    )
    assert (
        "rule 'bad template'" in found["mapping.rules.3.then.title"]
        and "subjekt" in found["mapping.rules.3.then.title"]
    )
    assert "nosuchfilter" in found["mapping.rules.3.then.deal_fields.X"]
    assert "both name ['vip']" in found["mapping.rules.4.when"]


def test_example_rules_are_clean() -> None:
    assert check_mapping(CONFIG) == []


def test_sandbox_blocks_python_internals() -> None:
    evil = MappingConfig.model_validate(
        {"rules": [{"name": "r", "then": {"title": "{{ ticket.__class__.__mro__ }}"}}]}
    )
    with pytest.raises(MappingError):
        plan(event(), evil, event_id=1)


# --- properties --------------------------------------------------------------------

events = st.builds(
    event,
    kind=st.sampled_from(list(EventKind)),
    status=st.none() | st.sampled_from(list(Status)),
    channel=st.none() | st.sampled_from(["email", "phone", "chat", "web"]),
    tags=st.lists(st.sampled_from(["vip", "b2b", "spam"]), max_size=3).map(tuple),
    comment=st.none()
    | st.builds(
        Comment,
        id=st.none() | st.just("1"),
        text=st.text(min_size=1, max_size=20),
        public=st.booleans(),
        author=st.sampled_from(list(AuthorKind)),
    ),
    subject=st.none() | st.text(max_size=20),
    assignee_id=st.none() | st.sampled_from(["545", "1"]),
)


@settings(max_examples=300, deadline=None)
@given(ev=events, client_exists=st.none() | st.booleans(), event_id=st.integers(1, 10**9))
def test_plans_are_deterministic_and_never_create_twice(
    ev: TicketEvent, client_exists: bool | None, event_id: int
) -> None:
    first = plan(ev, CONFIG, event_id=event_id, client_exists=client_exists)
    second = plan(
        TicketEvent.model_validate(ev.model_dump(mode="json")),
        CONFIG,
        event_id=event_id,
        client_exists=client_exists,
    )
    assert first == second
    keys = [op.key for op in first.operations]
    assert len(keys) == len(set(keys))
    kinds = [type(op).__name__ for op in first.operations]
    assert (
        kinds.count("UpsertContact") <= 1
        and kinds.count("UpsertDeal") <= 1
        and kinds.count("AddNote") <= 1
    )
    records = first.records()
    assert len({(r.entity, r.external_key) for r in records}) == len(records)
