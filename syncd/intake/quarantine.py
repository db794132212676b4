"""Quarantine: authenticated webhooks syncd could not read, kept for a human.

Nothing a helpdesk sent with a valid secret is dropped. A payload that does
not parse is stored here with the reason; after fixing the config an admin
re-ingests it, which parses it again with the current settings.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, update

from syncd.intake.base import RawRequest
from syncd.logs import redactor
from syncd.store.models import QuarantineState, quarantine

_CREDENTIAL = re.compile(r"secret|token|signature|auth|cookie|key|password", re.IGNORECASE)


def _without_credentials(values: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if _CREDENTIAL.search(k) else redactor.clean(v)) for k, v in values.items()}


def _mask_body(body: bytes) -> bytes:
    """Mask configured secrets inside the body (Usedesk puts its secret there)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return body
    cleaned = redactor.clean(text)
    return body if cleaned == text else cleaned.encode("utf-8")


@dataclass(frozen=True)
class Held:
    id: int
    source: str
    received_at: float
    reason: str
    body: bytes
    headers: dict[str, str]
    query: dict[str, str]
    state: str
    event_ids: list[int]

    def as_request(self) -> RawRequest:
        return RawRequest(
            body=self.body, headers=self.headers, query=self.query, received_at=self.received_at
        )


def hold(conn: Connection, source: str, request: RawRequest, reason: str) -> int:
    now = time.time()
    result = conn.execute(
        quarantine.insert().values(
            source=source,
            received_at=request.received_at or now,
            reason=reason,
            body=_mask_body(request.body),
            headers=json.dumps(_without_credentials(dict(request.headers))),
            query=json.dumps(_without_credentials(dict(request.query))),
            state=QuarantineState.HELD.value,
            updated_at=now,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _row(r: Any) -> Held:
    return Held(
        id=int(r.id),
        source=r.source,
        received_at=float(r.received_at),
        reason=r.reason,
        body=bytes(r.body),
        headers=json.loads(r.headers),
        query=json.loads(r.query),
        state=r.state,
        event_ids=[int(x) for x in (r.event_ids or "").split(",") if x],
    )


def get(conn: Connection, item_id: int) -> Held | None:
    row = conn.execute(select(quarantine).where(quarantine.c.id == item_id)).first()
    return None if row is None else _row(row)


def list_held(
    conn: Connection,
    *,
    state: str | None = "held",
    source: str | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[Held]:
    query = select(quarantine).order_by(quarantine.c.id.desc()).limit(limit)
    if state:
        query = query.where(quarantine.c.state == state)
    if source:
        query = query.where(quarantine.c.source == source)
    if before_id is not None:
        query = query.where(quarantine.c.id < before_id)
    return [_row(r) for r in conn.execute(query)]


def count_by_source(conn: Connection) -> dict[str, int]:
    rows = conn.execute(
        select(quarantine.c.source, func.count())
        .where(quarantine.c.state == QuarantineState.HELD.value)
        .group_by(quarantine.c.source)
    )
    return {source: int(n) for source, n in rows}


def mark(
    conn: Connection,
    item_id: int,
    *,
    state: QuarantineState,
    reason: str | None = None,
    event_ids: list[int] | None = None,
) -> None:
    values: dict[str, Any] = {"state": state.value, "updated_at": time.time()}
    if reason is not None:
        values["reason"] = reason
    if event_ids is not None:
        values["event_ids"] = ",".join(str(i) for i in event_ids)[:500]
    conn.execute(update(quarantine).where(quarantine.c.id == item_id).values(**values))
