"""The amoCRM connector against its emulator (syncd.emulators.amocrm), in OAuth mode.

OAuth, so ``expire_token`` has something to expire; the external key as a
tag, so finding a lead after a lost answer goes through the contact's leads
(the emulator's ``query`` does not search tags, as amoCRM's may not).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from syncd.connectors.amocrm import AmoCrmConnector, AmoCrmSettings
from syncd.connectors.base import Connector, CredentialStore
from syncd.emulators.amocrm import PIPELINE_ID, STAGES, AmoState, create_amocrm_emulator
from syncd.emulators.serving import ServerThread
from syncd.ticket import Status, normalize_email, normalize_phone

#: The connector gives up after this long; a dropped answer comes well after it.
TIMEOUT = 0.5
DROP_SECONDS = 2.0

_STAGE_FOR = {
    Status.NEW: STAGES["new"],
    Status.OPEN: STAGES["open"],
    Status.PENDING: STAGES["waiting"],
    Status.SOLVED: STAGES["won"],
    Status.CLOSED: STAGES["won"],
    Status.SPAM: STAGES["lost"],
}


def _values(record: dict[str, Any], code: str) -> list[str]:
    for f in record.get("custom_fields_values") or []:
        if f.get("field_code") == code:
            return [str(v["value"]) for v in f["values"]]
    return []


class AmoCrmHarness:
    name = "amocrm"

    def __init__(self, server: ServerThread, state: AmoState) -> None:
        self.server = server
        self.state = state

    def connector(self, credentials: CredentialStore | None = None) -> Connector:
        # Each connector gets a pair of its own: a refresh token is spent by the first to use it.
        access, refresh = self.state.issue_tokens()
        settings = AmoCrmSettings.model_validate(
            {
                "base_url": self.server.url,
                "client_id": self.state.client_id,
                "client_secret": self.state.client_secret,
                "redirect_uri": self.state.redirect_uri,
                "access_token": access,
                "refresh_token": refresh,
                # The suite is about correctness; pacing has its own test.
                "rate_per_second": 100,
                "burst": 20,
            }
        )
        return AmoCrmConnector("crm", settings, timeout=TIMEOUT, credentials=credentials)

    def pipeline(self) -> tuple[str | None, dict[Status, str]]:
        return str(PIPELINE_ID), {s: str(stage) for s, stage in _STAGE_FOR.items()}

    def contacts(self) -> list[dict[str, Any]]:
        with self.state.lock:
            rows = [dict(c) for c in self.state.contacts.values()]
        return [
            {
                "id": str(c["id"]),
                "name": c["name"],
                "emails": [e for e in map(normalize_email, _values(c, "EMAIL")) if e],
                "phones": [p for p in (normalize_phone(v) for v in _values(c, "PHONE")) if p],
            }
            for c in rows
        ]

    def deals(self) -> list[dict[str, Any]]:
        with self.state.lock:
            rows = [dict(lead) for lead in self.state.leads.values()]
        return [
            {
                "id": str(lead["id"]),
                "title": lead["name"],
                "stage_id": str(lead["status_id"]),
                "pipeline_id": str(lead["pipeline_id"]),
                "contact_ids": [str(c) for c in lead["contact_ids"]],
            }
            for lead in rows
        ]

    def notes(self) -> list[dict[str, Any]]:
        with self.state.lock:
            rows = [dict(n) for n in self.state.notes.values()]
        return [
            {"id": str(n["id"]), "parent_id": str(n["entity_id"]), "text": n["params"]["text"]}
            for n in rows
        ]

    def fail_next(self, count: int, status: int) -> None:
        self.state.fail_next(count, status, retry_after=3 if status == 429 else None)

    def drop_after_commit(self, count: int) -> None:
        self.state.drop_after_commit(count, seconds=DROP_SECONDS)

    def expire_token(self) -> bool:
        self.state.expire_tokens()
        return True


@contextmanager
def running() -> Iterator[AmoCrmHarness]:
    # The limit is raised with the connector's pace: pacing under amoCRM's real
    # 7 requests/s is tested on its own (tests/unit/test_amocrm.py).
    app, state = create_amocrm_emulator(rate_limit=1000)
    server = ServerThread(app).start()
    try:
        yield AmoCrmHarness(server, state)
    finally:
        server.stop()
