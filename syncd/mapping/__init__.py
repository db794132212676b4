"""Mapping: a ticket event in, a plan of CRM operations out. Pure: no I/O.

The rules live in the config (``[mapping]``); :func:`plan` applies them and
:func:`check_mapping` finds rules that can never work before they run.
"""

from __future__ import annotations

from syncd.mapping.checks import check_mapping
from syncd.mapping.engine import contact_keys, plan
from syncd.mapping.plan import AddNote, Operation, Plan, Upsert, UpsertContact, UpsertDeal
from syncd.mapping.rules import MappingConfig, Pipeline, Rule, Then, When

__all__ = [
    "AddNote",
    "MappingConfig",
    "Operation",
    "Pipeline",
    "Plan",
    "Rule",
    "Then",
    "Upsert",
    "UpsertContact",
    "UpsertDeal",
    "When",
    "check_mapping",
    "contact_keys",
    "plan",
]
