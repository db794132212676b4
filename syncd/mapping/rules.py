"""The mapping config: pipelines, user maps and ordered rules, as pydantic models.

Rules are tried in order and the first whose ``when`` matches decides; a
rule with an empty ``when`` matches everything, so it belongs last.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from syncd.ticket import EventKind, Status


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pipeline(_Strict):
    """A CRM pipeline (Bitrix24 deal category, amoCRM pipeline) and how statuses map to stages."""

    #: The CRM's own id of the pipeline; leave out for the CRM's default one.
    id: str | None = None
    #: Ticket status -> stage id in this pipeline.
    stages: dict[Status, str] = Field(default_factory=dict)
    #: Stage of a new deal; the stage of the ticket's status when left out.
    initial_stage: str | None = None


class When(_Strict):
    """Conditions; all given ones must hold. Lists mean "any of"."""

    source: list[str] | None = None
    kind: list[EventKind] | None = None
    channel: list[str] | None = None
    priority: list[str] | None = None
    status: list[Status] | None = None
    #: At least one of these tags.
    tags_any: list[str] | None = None
    #: All of these tags.
    tags_all: list[str] | None = None
    #: None of these tags.
    tags_none: list[str] | None = None
    #: Is the client already a contact in the CRM?
    client: Literal["new", "existing", "any"] = "any"
    #: Custom field name -> accepted values.
    custom_fields: dict[str, list[str]] | None = None


class Then(_Strict):
    """What to do with a matching ticket."""

    #: Name of a pipeline from ``[mapping.pipelines]``.
    pipeline: str | None = None
    #: False: only find or create the contact and put the messages on its timeline.
    create_deal: bool = True
    #: Jinja2 templates (sandboxed). Variables: ticket, client, comment, event.
    title: str = "{{ ticket.subject or 'Ticket ' ~ ticket.id }}"
    deal_fields: dict[str, str] = Field(default_factory=dict)
    contact_fields: dict[str, str] = Field(default_factory=dict)
    #: Fixed CRM user id; otherwise taken from the agent and group maps.
    responsible: str | None = None
    #: Which messages go to the timeline: public ones, all (private too), or none.
    timeline: Literal["public", "all", "none"] = "public"
    #: Prefix timeline notes with who wrote them ("Client:", "Agent 545:").
    note_author: bool = True
    #: Minutes the team has for a first answer; written as a due time into ``first_response_field``.
    first_response_minutes: int | None = Field(default=None, gt=0)
    first_response_field: str | None = None

    @model_validator(mode="after")
    def _sla_needs_a_field(self) -> Then:
        if (self.first_response_minutes is None) != (self.first_response_field is None):
            raise ValueError("first_response_minutes and first_response_field go together")
        return self


class Rule(_Strict):
    name: str = Field(min_length=1)
    when: When = When()
    then: Then = Then()


class MappingConfig(_Strict):
    #: Helpdesk agent id -> CRM user id.
    agents: dict[str, str] = Field(default_factory=dict)
    #: Helpdesk group id -> CRM user id, used when the ticket's agent is not mapped.
    groups: dict[str, str] = Field(default_factory=dict)
    #: CRM user id when neither the agent nor the group is mapped.
    default_responsible: str | None = None
    pipelines: dict[str, Pipeline] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=lambda: [Rule(name="default")])
    #: A ticket no rule matches: "fail" (visible in the monitor; fix the rules and resend)
    #: or "skip" (delivered as nothing to do).
    unmatched: Literal["fail", "skip"] = "fail"
    #: Zone for times rendered into CRM fields (first-response due time).
    timezone: str = "UTC"
