"""The links table seen through the connector's LinkBook protocol."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, select

from syncd.connectors.base import LinkRef
from syncd.store import Store
from syncd.store.dialect import insert_ignore, upsert
from syncd.store.models import DeliveryState, deliveries, links

_KEY = ("destination", "entity", "external_key")


def get_link(
    conn: Connection, destination: str, entity: str, external_key: str, asking: int | None = None
) -> LinkRef | None:
    row = conn.execute(
        select(links.c.crm_id, links.c.url, links.c.delivery_id).where(
            links.c.destination == destination,
            links.c.entity == entity,
            links.c.external_key == external_key,
        )
    ).first()
    if row is None:
        return None
    busy = False
    if row.crm_id is None and row.delivery_id is not None and row.delivery_id != asking:
        # An intent of another delivery: busy only while that delivery is in the air.
        owner_state = conn.execute(
            select(deliveries.c.state).where(deliveries.c.id == row.delivery_id)
        ).scalar()
        busy = owner_state == DeliveryState.IN_FLIGHT.value
    return LinkRef(crm_id=row.crm_id, url=row.url, owner_busy=busy)


def intend(
    conn: Connection, destination: str, entity: str, external_key: str, delivery_id: int
) -> bool:
    """Claim the create of a record; False when a link or another delivery's intent exists."""
    now = time.time()
    claimed = insert_ignore(
        conn,
        links,
        {
            "destination": destination,
            "entity": entity,
            "external_key": external_key,
            "crm_id": None,
            "delivery_id": delivery_id,
            "created_at": now,
            "updated_at": now,
        },
        _KEY,
    )
    if claimed:
        return True
    owner = conn.execute(
        select(links.c.delivery_id, links.c.crm_id).where(
            links.c.destination == destination,
            links.c.entity == entity,
            links.c.external_key == external_key,
        )
    ).first()
    return owner is not None and owner.crm_id is None and owner.delivery_id == delivery_id


def record(
    conn: Connection,
    destination: str,
    entity: str,
    external_key: str,
    crm_id: str,
    url: str | None,
    delivery_id: int,
) -> None:
    now = time.time()
    upsert(
        conn,
        links,
        {
            "destination": destination,
            "entity": entity,
            "external_key": external_key,
            "crm_id": crm_id,
            "url": url,
            "delivery_id": delivery_id,
            "created_at": now,
            "updated_at": now,
        },
        _KEY,
        ("crm_id", "url", "delivery_id", "updated_at"),
    )


class StoreLinkBook:
    """Links for one destination and one delivery, read and written through the store.

    Reads are answered from one prefetch where possible, and records are held
    back and written in the same transaction as the delivery's outcome
    (:meth:`flush`): a crash before that leaves the intent behind, which makes
    the next attempt look the record up, so nothing is lost by waiting. Intents
    are the exception: each is committed before its create is sent.
    """

    def __init__(self, store: Store, destination: str, delivery_id: int) -> None:
        self._store = store
        self._destination = destination
        self._delivery_id = delivery_id
        self._cache: dict[tuple[str, str], LinkRef | None] = {}
        self._pending: list[Callable[[Connection], None]] = []

    async def prefetch(self, keys: list[tuple[str, str]]) -> None:
        """Read many links in one round trip; later :meth:`get` calls use the answers."""
        wanted = [k for k in keys if k not in self._cache]
        if not wanted:
            return

        def _read(conn: Connection) -> dict[tuple[str, str], LinkRef | None]:
            return {
                (entity, key): get_link(
                    conn, self._destination, entity, key, asking=self._delivery_id
                )
                for entity, key in wanted
            }

        self._cache.update(await self._store.writer.run(_read))

    async def get(self, entity: str, external_key: str) -> LinkRef | None:
        if (entity, external_key) in self._cache:
            return self._cache[(entity, external_key)]
        return await self._store.writer.run(
            lambda conn: get_link(
                conn, self._destination, entity, external_key, asking=self._delivery_id
            )
        )

    async def intend(self, entity: str, external_key: str) -> bool:
        claimed = await self._store.writer.run(
            lambda conn: intend(conn, self._destination, entity, external_key, self._delivery_id)
        )
        self._cache.pop((entity, external_key), None)
        return claimed

    async def record(self, entity: str, external_key: str, crm_id: str, url: str | None) -> None:
        self._cache[(entity, external_key)] = LinkRef(crm_id=crm_id, url=url)
        self._pending.append(
            lambda conn: record(
                conn, self._destination, entity, external_key, crm_id, url, self._delivery_id
            )
        )

    async def record_identities(self, entity: str, keys: tuple[str, ...], crm_id: str) -> None:
        def _all(conn: Connection) -> None:
            for key in keys:
                existing = get_link(conn, self._destination, entity, key)
                if existing is None or existing.crm_id is None:
                    record(conn, self._destination, entity, key, crm_id, None, self._delivery_id)

        for key in keys:
            self._cache.setdefault((entity, key), LinkRef(crm_id=crm_id))
        self._pending.append(_all)

    def flush(self, conn: Connection) -> None:
        """Write the held-back records (called inside the outcome's transaction)."""
        for write in self._pending:
            write(conn)
        self._pending.clear()
