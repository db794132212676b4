"""What the connector contract suite needs from each CRM: a connector and its emulator.

Each CRM module provides one class following :class:`CrmHarness`; the suite in
``test_contract.py`` runs every test against every harness, over real HTTP.
"""

from __future__ import annotations

from typing import Any, Protocol

from syncd.connectors.base import Connector, CredentialStore
from syncd.ticket import Status


class CrmHarness(Protocol):
    name: str

    def connector(self, credentials: CredentialStore | None = None) -> Connector:
        """A connector pointed at the running emulator (short request timeout)."""

    def pipeline(self) -> tuple[str | None, dict[Status, str]]:
        """A pipeline id and a status -> stage map that are valid in the emulator."""

    def contacts(self) -> list[dict[str, Any]]:
        """Contacts: {"id", "name", "emails": [...], "phones": [...]} (normalized)."""

    def deals(self) -> list[dict[str, Any]]:
        """Deals: {"id", "title", "stage_id", "pipeline_id", "contact_ids": [...]}."""

    def notes(self) -> list[dict[str, Any]]:
        """Timeline notes: {"id", "parent_id" (a deal or contact id), "text"}."""

    def fail_next(self, count: int, status: int) -> None:
        """The next ``count`` API requests fail with the CRM's own error for ``status``."""

    def drop_after_commit(self, count: int) -> None:
        """The next ``count`` writes are committed but the client never hears back."""

    def expire_token(self) -> bool:
        """Expire the access token now; False if this auth mode has no expiry."""
