"""Durable credentials for connectors that rotate tokens.

amoCRM refresh tokens are single-use and Bitrix24's rotate on refresh: the
new pair must be on disk *before* the old one is spent, or a crash between
the two strands the integration. ``save`` returns only after the commit.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from sqlalchemy import Connection, select, update

from syncd.logs import redactor
from syncd.store import Store
from syncd.store.models import credentials

_SECRET = re.compile(r"token|secret|password", re.IGNORECASE)


def _mask_later(data: dict[str, Any]) -> None:
    redactor.add([str(v) for k, v in data.items() if _SECRET.search(k) and isinstance(v, str)])


class StoreCredentials:
    """The :class:`~syncd.connectors.base.CredentialStore` of one destination."""

    def __init__(self, store: Store, destination: str) -> None:
        self._store = store
        self._destination = destination

    async def load(self) -> dict[str, Any] | None:
        def _read(conn: Connection) -> str | None:
            return conn.execute(
                select(credentials.c.data).where(credentials.c.destination == self._destination)
            ).scalar()

        raw = await self._store.writer.run(_read)
        if raw is None:
            return None
        data: dict[str, Any] = json.loads(raw)
        _mask_later(data)
        return data

    async def save(self, data: dict[str, Any]) -> None:
        _mask_later(data)
        text = json.dumps(data, sort_keys=True)

        def _write(conn: Connection) -> None:
            now = time.time()
            done = conn.execute(
                update(credentials)
                .where(credentials.c.destination == self._destination)
                .values(data=text, updated_at=now)
            )
            if not done.rowcount:
                conn.execute(
                    credentials.insert().values(
                        destination=self._destination, data=text, updated_at=now
                    )
                )

        await self._store.writer.run(_write)
