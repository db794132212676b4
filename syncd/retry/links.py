"""The links table seen through the connector's LinkBook protocol."""

from __future__ import annotations

import time

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from syncd.connectors.base import LinkRef
from syncd.store import Store
from syncd.store.models import DeliveryState, deliveries, links


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
    try:
        with conn.begin_nested():
            conn.execute(
                links.insert().values(
                    destination=destination,
                    entity=entity,
                    external_key=external_key,
                    crm_id=None,
                    delivery_id=delivery_id,
                    created_at=now,
                    updated_at=now,
                )
            )
    except IntegrityError:
        owner = conn.execute(
            select(links.c.delivery_id, links.c.crm_id).where(
                links.c.destination == destination,
                links.c.entity == entity,
                links.c.external_key == external_key,
            )
        ).first()
        return owner is not None and owner.crm_id is None and owner.delivery_id == delivery_id
    return True


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
    updated = conn.execute(
        update(links)
        .where(
            links.c.destination == destination,
            links.c.entity == entity,
            links.c.external_key == external_key,
        )
        .values(crm_id=crm_id, url=url, delivery_id=delivery_id, updated_at=now)
    )
    if not updated.rowcount:
        conn.execute(
            links.insert().values(
                destination=destination,
                entity=entity,
                external_key=external_key,
                crm_id=crm_id,
                url=url,
                delivery_id=delivery_id,
                created_at=now,
                updated_at=now,
            )
        )


class StoreLinkBook:
    """Links for one destination and one delivery, read and written through the store."""

    def __init__(self, store: Store, destination: str, delivery_id: int) -> None:
        self._store = store
        self._destination = destination
        self._delivery_id = delivery_id

    async def get(self, entity: str, external_key: str) -> LinkRef | None:
        return await self._store.writer.run(
            lambda conn: get_link(
                conn, self._destination, entity, external_key, asking=self._delivery_id
            )
        )

    async def intend(self, entity: str, external_key: str) -> bool:
        return await self._store.writer.run(
            lambda conn: intend(conn, self._destination, entity, external_key, self._delivery_id)
        )

    async def record(self, entity: str, external_key: str, crm_id: str, url: str | None) -> None:
        await self._store.writer.run(
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

        await self._store.writer.run(_all)
