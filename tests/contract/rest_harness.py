"""The generic REST connector against the bundled receiver (syncd.emulators.sink).

Two forms: ``RestHarness`` uses the generic ``/records`` shape (no templates);
``TemplatedRestHarness`` uses per-entity templates against the sink's ``/v2``
API, whose deals name their contact by id and whose notes live under their
deal, so every id one record's answer gives must reach the next one's request.

Both send through ``AiohttpTransport``, as the daemon does, so these tests exercise
the connector's direct aiohttp path (the respx unit tests cover the httpx one).
"""

from __future__ import annotations

from typing import Any

from syncd.connectors.base import Connector, CredentialStore
from syncd.connectors.rest import RestConnector, RestSettings
from syncd.connectors.transport import AiohttpTransport
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
        return RestConnector(
            "crm", settings, timeout=0.5, transport=AiohttpTransport(), credentials=credentials
        )

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


API_KEY = "contract-api-key"

#: The per-entity templates, as they would be written in the TOML file.
TEMPLATES: dict[str, Any] = {
    "contact": {
        "create": {
            "path": "/v2/contacts",
            "body": {
                "external_id": "{{ external_key }}",
                "full_name": "{{ fields.name }}",
                "emails": "{{ fields.emails }}",
                "phones": "{{ fields.phones }}",
            },
        },
        "update": {
            "method": "PATCH",
            "path": "/v2/contacts/{{ crm_id }}",
            "body": {"full_name": "{{ fields.name }}"},
        },
        "lookup": {
            "method": "GET",
            "path": "/v2/contacts",
            "params": {"external_id": "{{ external_key }}"},
            "id": "data.0.id",
        },
        "id": "data.id",
    },
    "deal": {
        "create": {
            "path": "/v2/deals",
            "body": {
                "external_id": "{{ external_key }}",
                "name": "{{ fields.title }}",
                "stage": "{{ fields.stage_id }}",
                "pipeline": "{{ fields.pipeline_id }}",
                "contact_id": "{{ contact.crm_id }}",
                "label": "Ticket {{ external_key.split(':')[-1] }}",
            },
        },
        "update": {
            "method": "PATCH",
            "path": "/v2/deals/{{ crm_id }}",
            "body": {"name": "{{ fields.title }}", "stage": "{{ fields.stage_id }}"},
        },
        "lookup": {
            "method": "GET",
            "path": "/v2/deals",
            "params": {"external_id": "{{ external_key }}"},
            "id": "data.0.id",
        },
        "id": "data.id",
    },
    "note": {
        "create": {
            "path": "/v2/deals/{{ deal.crm_id }}/notes",
            "body": {"external_id": "{{ external_key }}", "body": "{{ fields.text }}"},
        },
        "lookup": {
            "method": "GET",
            "path": "/v2/deals/{{ deal.crm_id }}/notes",
            "params": {"external_id": "{{ external_key }}"},
            "id": "data.0.id",
        },
        "id": "result",
    },
}


class TemplatedRestHarness(RestHarness):
    name = "rest_templated"

    def connector(self, credentials: CredentialStore | None = None) -> Connector:
        settings = RestSettings.model_validate(
            {
                "base_url": self.server.url,
                "auth": {"type": "header", "header": "X-Api-Key", "token": API_KEY},
                "entities": TEMPLATES,
            }
        )
        return RestConnector(
            "crm", settings, timeout=0.5, transport=AiohttpTransport(), credentials=credentials
        )

    def contacts(self) -> list[dict[str, Any]]:
        return [
            {
                "id": r["id"],
                "name": r["fields"].get("full_name"),
                "emails": r["fields"].get("emails", []),
                "phones": r["fields"].get("phones", []),
            }
            for r in self._records("contact")
        ]

    def deals(self) -> list[dict[str, Any]]:
        return [
            {
                "id": r["id"],
                "title": r["fields"].get("name"),
                "stage_id": r["fields"].get("stage"),
                "pipeline_id": r["fields"].get("pipeline"),
                "contact_ids": [r["parent_id"]] if r["parent_id"] else [],
            }
            for r in self._records("deal")
        ]

    def notes(self) -> list[dict[str, Any]]:
        return [
            {"id": r["id"], "parent_id": r["parent_id"], "text": r["fields"].get("body")}
            for r in self._records("note")
        ]
