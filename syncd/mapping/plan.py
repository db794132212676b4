"""A plan: the ordered CRM operations one event needs. Built by mapping, run by a connector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Upsert:
    """Make sure a CRM record keyed by ``external_key`` exists and carries ``fields``.

    ``create_only`` records (timeline notes) are written once and never updated.
    ``parent`` names the external key of the record this one hangs off, if any.
    """

    entity: str
    external_key: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    create_only: bool = False
    parent: str | None = None


@dataclass(frozen=True)
class Plan:
    operations: tuple[Upsert, ...]
    #: Which rule produced the plan, for the monitor and `syncd preview`.
    rule: str = "default"
