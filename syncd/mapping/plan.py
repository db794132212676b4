"""A plan: the ordered CRM operations one event needs. Built by mapping, run by a connector.

Every operation names the records it touches by *keys* that are stable
across retries (``hd:ticket:42``, ``hd:client:7``, ``email:a@b.ru``); the
connector resolves keys to CRM ids through the links table, so the plan
itself never depends on what the CRM already holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class UpsertContact:
    """Find the client's contact (by key, then by e-mail or phone) or create it."""

    key: str
    #: Extra keys that identify the same person ("email:...", "phone:...").
    identities: tuple[str, ...] = ()
    name: str | None = None
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)
    responsible_id: str | None = None


@dataclass(frozen=True)
class UpsertDeal:
    """Create the ticket's deal (or lead) or update it; move its stage when the status moved."""

    key: str
    #: None when this event says nothing about the title (an update without a subject).
    title: str | None = None
    #: What to call a deal that must be created without a title.
    fallback_title: str = ""
    pipeline: str | None = None
    pipeline_id: str | None = None
    #: The stage for the ticket's current status; set on create, and on update when ``move_stage``.
    stage_id: str | None = None
    move_stage: bool = False
    responsible_id: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    contact_key: str | None = None


@dataclass(frozen=True)
class AddNote:
    """Write one message to a timeline, once: ``key`` marks it so a retry can find it."""

    key: str
    parent_key: str
    parent_entity: Literal["deal", "contact"]
    text: str


Operation = UpsertContact | UpsertDeal | AddNote


@dataclass(frozen=True)
class Upsert:
    """A plain record, for connectors that see every operation as one record (generic REST)."""

    entity: str
    external_key: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    create_only: bool = False
    parent: str | None = None
    #: Other keys naming the same record (a contact's e-mails and phones).
    identities: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    operations: tuple[Operation, ...]
    #: Which rule produced the plan ("" when none matched), for the monitor and `syncd preview`.
    rule: str = ""
    #: Why the rule matched (or why none did), one line per condition.
    reasons: tuple[str, ...] = ()
    matched: bool = True

    def records(self) -> tuple[Upsert, ...]:
        """The plan as plain records, in order (see :class:`Upsert`)."""
        out: list[Upsert] = []
        for op in self.operations:
            if isinstance(op, UpsertContact):
                # What this event does not know is left out, so an update never blanks it.
                fields: dict[str, Any] = {}
                if op.name:
                    fields["name"] = op.name
                if op.emails:
                    fields["emails"] = list(op.emails)
                if op.phones:
                    fields["phones"] = list(op.phones)
                if op.responsible_id is not None:
                    fields["responsible_id"] = op.responsible_id
                out.append(
                    Upsert(
                        "contact",
                        op.key,
                        {**fields, **op.fields},
                        identities=op.identities,
                    )
                )
            elif isinstance(op, UpsertDeal):
                fields = {}
                for name in ("title", "pipeline", "pipeline_id", "stage_id", "responsible_id"):
                    value = getattr(op, name)
                    if value is not None:
                        fields[name] = value
                out.append(Upsert("deal", op.key, {**fields, **op.fields}, parent=op.contact_key))
            else:
                out.append(
                    Upsert(
                        "note", op.key, {"text": op.text}, create_only=True, parent=op.parent_key
                    )
                )
        return tuple(out)
