"""The Bitrix24 connector against the Bitrix24 emulator, in OAuth mode so tokens can expire."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from syncd.connectors.base import Connector, CredentialStore
from syncd.connectors.bitrix24 import Bitrix24Connector, Bitrix24Settings
from syncd.emulators.bitrix24 import Bitrix24State, create_bitrix24_emulator
from syncd.emulators.serving import ServerThread
from syncd.ticket import Status

#: Funnel 2 of the emulator; every status gets its own stage.
STAGES = {
    Status.NEW: "C2:NEW",
    Status.OPEN: "C2:PREPARATION",
    Status.PENDING: "C2:EXECUTING",
    Status.SOLVED: "C2:FINAL_INVOICE",
    Status.CLOSED: "C2:WON",
    Status.SPAM: "C2:LOSE",
}
TIMEOUT = 0.5
#: Longer than TIMEOUT: the client gives up before the committed write is answered.
DROP_SECONDS = 1.5


class Bitrix24Harness:
    name = "bitrix24"

    def __init__(self, server: ServerThread, state: Bitrix24State) -> None:
        self.server = server
        self.state = state

    def connector(self, credentials: CredentialStore | None = None) -> Connector:
        access, refresh = self.state.issue_tokens()
        settings = Bitrix24Settings.model_validate(
            {
                "portal_url": self.server.url,
                "client_id": self.state.client_id,
                "client_secret": self.state.client_secret,
                "access_token": access,
                "refresh_token": refresh,
                "token_url": f"{self.server.url}/oauth/token/",
            }
        )
        return Bitrix24Connector("crm", settings, timeout=TIMEOUT, credentials=credentials)

    def pipeline(self) -> tuple[str | None, dict[Status, str]]:
        return "2", dict(STAGES)

    def contacts(self) -> list[dict[str, Any]]:
        with self.state.lock:
            rows = [dict(c) for c in self.state.contacts.values()]
        return [
            {
                "id": c["ID"],
                "name": " ".join(p for p in (c.get("NAME"), c.get("LAST_NAME")) if p),
                "emails": [v["VALUE"] for v in c.get("EMAIL") or []],
                "phones": [v["VALUE"] for v in c.get("PHONE") or []],
            }
            for c in rows
        ]

    def deals(self) -> list[dict[str, Any]]:
        with self.state.lock:
            rows = [dict(d) for d in self.state.deals.values()]
        return [
            {
                "id": d["ID"],
                "title": d.get("TITLE"),
                "stage_id": d.get("STAGE_ID"),
                "pipeline_id": d.get("CATEGORY_ID"),
                "contact_ids": list(d.get("CONTACT_IDS") or []),
            }
            for d in rows
        ]

    def notes(self) -> list[dict[str, Any]]:
        with self.state.lock:
            rows = [dict(c) for c in self.state.comments.values()]
        return [{"id": c["ID"], "parent_id": c["ENTITY_ID"], "text": c["COMMENT"]} for c in rows]

    def fail_next(self, count: int, status: int) -> None:
        self.state.fail_next(count, status)

    def drop_after_commit(self, count: int) -> None:
        self.state.drop_after_commit(count, seconds=DROP_SECONDS)

    def expire_token(self) -> bool:
        self.state.expire_tokens()
        return True


@contextmanager
def running() -> Iterator[Bitrix24Harness]:
    app, state = create_bitrix24_emulator()
    server = ServerThread(app).start()
    try:
        yield Bitrix24Harness(server, state)
    finally:
        server.stop()
