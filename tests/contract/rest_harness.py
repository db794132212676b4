"""The generic REST connector against the bundled receiver (syncd.emulators.sink)."""

from __future__ import annotations

from typing import Any

from syncd.connectors.base import Connector, CredentialStore
from syncd.connectors.rest import RestConnector, RestSettings
from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import Faults, SinkState
from syncd.ticket import Status


class RestHarness:
    name = "rest"

    def __init__(self, server: ServerThread, state: SinkState) -> None:
        self.server = server
        self.state = state

    def connector(self, credentials: CredentialStore | None = None) -> Connector:
        settings = RestSettings.model_validate({"base_url": self.server.url})
        return RestConnector("crm", settings, timeout=0.5, credentials=credentials)

    def pipeline(self) -> tuple[str | None, dict[Status, str]]:
        return "sales", {s: f"STAGE_{s.value.upper()}" for s in Status}

    def _records(self, entity: str) -> list[dict[str, Any]]:
        return [r for r in self.state.records.values() if r["entity"] == entity]

    def contacts(self) -> list[dict[str, Any]]:
        return [
            {
                "id": r["id"],
                "name": r["fields"].get("name"),
                "emails": r["fields"].get("emails", []),
                "phones": r["fields"].get("phones", []),
            }
            for r in self._records("contact")
        ]

    def deals(self) -> list[dict[str, Any]]:
        return [
            {
                "id": r["id"],
                "title": r["fields"].get("title"),
                "stage_id": r["fields"].get("stage_id"),
                "pipeline_id": r["fields"].get("pipeline_id"),
                "contact_ids": [r["parent_id"]] if r["parent_id"] else [],
            }
            for r in self._records("deal")
        ]

    def notes(self) -> list[dict[str, Any]]:
        return [
            {"id": r["id"], "parent_id": r["parent_id"], "text": r["fields"].get("text")}
            for r in self._records("note")
        ]

    def fail_next(self, count: int, status: int) -> None:
        self.state.faults = Faults(
            fail_count=count, fail_status=status, retry_after=3 if status == 429 else None
        )

    def drop_after_commit(self, count: int) -> None:
        self.state.faults = Faults(hang_count=count, hang_seconds=1.5)

    def expire_token(self) -> bool:
        return False
