"""The links table seen through the connector's LinkBook protocol."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from sqlalchemy import Connection

from syncd.connectors.base import LinkRef
from syncd.mapping import Upsert
from syncd.store import Store
from syncd.store.dialect import fetch, in_list, run_many

_SELECT = (
    "SELECT entity, external_key, crm_id, url, delivery_id FROM links"
    # entity too, so the look-up uses the whole (destination, entity, external_key)
    # index instead of reading every link of the destination.
    " WHERE destination = ? AND entity IN {entities} AND external_key IN {keys}"
)
_OWNER_STATES = "SELECT id, state FROM deliveries WHERE id IN {ids}"
_INTEND = (
    "INSERT INTO links (destination, entity, external_key, crm_id, url, delivery_id,"
    " created_at, updated_at) VALUES (?, ?, ?, NULL, NULL, ?, ?, ?)"
    " ON CONFLICT (destination, entity, external_key) DO NOTHING RETURNING id"
)
_OWNER = (
    "SELECT delivery_id, crm_id FROM links"
    " WHERE destination = ? AND entity = ? AND external_key = ?"
)
#: Columns: destination, entity, external_key, crm_id, url, delivery_id, created_at, updated_at.
_RECORD = (
    "INSERT INTO links (destination, entity, external_key, crm_id, url, delivery_id,"
    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (destination, entity, external_key) DO UPDATE SET crm_id = excluded.crm_id,"
    " url = excluded.url, delivery_id = excluded.delivery_id, updated_at = excluded.updated_at"
)

#: Only an intent still empty and still this delivery's.
_DROP = (
    "DELETE FROM links WHERE destination = ? AND entity = ? AND external_key = ?"
    " AND delivery_id = ? AND crm_id IS NULL"
)

LinkRow = tuple[str, str, str, str, str | None, int, float, float]


def get_links(
    conn: Connection,
    destination: str,
    keys: Iterable[tuple[str, str]],
    asking: int | None = None,
) -> dict[tuple[str, str], LinkRef | None]:
    """Many links of one destination in one query; None where there is none."""
    wanted = list(dict.fromkeys(keys))
    out: dict[tuple[str, str], LinkRef | None] = dict.fromkeys(wanted)
    stored = _stored_links(conn, destination, set(wanted))
    # An intent of another delivery is busy only while that delivery is in the air.
    in_flight = _in_flight(
        conn,
        {
            owner
            for crm_id, _, owner in stored.values()
            if crm_id is None and owner is not None and owner != asking
        },
    )
    for item, (crm_id, url, owner) in stored.items():
        busy = crm_id is None and owner is not None and owner != asking and owner in in_flight
        out[item] = LinkRef(crm_id=crm_id, url=url, owner_busy=busy)
    return out


def get_link(
    conn: Connection, destination: str, entity: str, external_key: str, asking: int | None = None
) -> LinkRef | None:
    return get_links(conn, destination, [(entity, external_key)], asking)[(entity, external_key)]


def intend(
    conn: Connection, destination: str, entity: str, external_key: str, delivery_id: int
) -> bool:
    """Claim the create of a record; False when a link or another delivery's intent exists."""
    now = time.time()
    if fetch(conn, _INTEND, (destination, entity, external_key, delivery_id, now, now)):
        return True
    owner = fetch(conn, _OWNER, (destination, entity, external_key))
    return bool(owner) and owner[0][1] is None and owner[0][0] == delivery_id


def record_many(conn: Connection, rows: Sequence[LinkRow]) -> None:
    """Insert links, or point existing ones (intents too) at their CRM record."""
    run_many(conn, _RECORD, rows)


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
    record_many(conn, [(destination, entity, external_key, crm_id, url, delivery_id, now, now)])


class StoreLinkBook:
    """Links for one destination and one delivery, read and written through the store.

    Reads are answered from one prefetch where possible, and records are held
    back and written in the same transaction as the delivery's outcome
    (:meth:`flush`): a crash before that leaves the intent behind, which makes
    the next attempt look the record up, so nothing is lost by waiting. Intents
    are the exception: each is committed before its create is sent.
    """

    def __init__(
        self,
        store: Store,
        destination: str,
        delivery_id: int,
        *,
        cache: dict[tuple[str, str], LinkRef | None] | None = None,
        claimed: set[tuple[str, str]] | None = None,
    ) -> None:
        self._store = store
        self._destination = destination
        self._delivery_id = delivery_id
        self._cache: dict[tuple[str, str], LinkRef | None] = cache or {}
        #: Intents already committed for this attempt (see :func:`claim_links`).
        self._claimed = claimed or set()
        self._rows: list[LinkRow] = []
        self._pending: list[Callable[[Connection], None]] = []

    async def prefetch(self, keys: list[tuple[str, str]]) -> None:
        """Read many links in one round trip; later :meth:`get` calls use the answers."""
        wanted = [k for k in keys if k not in self._cache]
        if not wanted:
            return
        self._cache.update(
            await self._store.writer.run(
                lambda conn: get_links(conn, self._destination, wanted, self._delivery_id)
            )
        )

    async def get(self, entity: str, external_key: str) -> LinkRef | None:
        if (entity, external_key) in self._cache:
            return self._cache[(entity, external_key)]
        return await self._store.writer.run(
            lambda conn: get_link(
                conn, self._destination, entity, external_key, asking=self._delivery_id
            )
        )

    async def intend(self, entity: str, external_key: str) -> bool:
        if (entity, external_key) in self._claimed:
            self._claimed.discard((entity, external_key))
            self._cache.pop((entity, external_key), None)
            return True
        claimed = await self._store.writer.run(
            lambda conn: intend(conn, self._destination, entity, external_key, self._delivery_id)
        )
        self._cache.pop((entity, external_key), None)
        return claimed

    async def record(self, entity: str, external_key: str, crm_id: str, url: str | None) -> None:
        self._cache[(entity, external_key)] = LinkRef(crm_id=crm_id, url=url)
        now = time.time()
        self._rows.append(
            (self._destination, entity, external_key, crm_id, url, self._delivery_id, now, now)
        )

    async def record_identities(self, entity: str, keys: tuple[str, ...], crm_id: str) -> None:
        def _all(conn: Connection) -> None:
            found = get_links(conn, self._destination, [(entity, key) for key in keys])
            now = time.time()
            record_many(
                conn,
                [
                    (self._destination, entity, key, crm_id, None, self._delivery_id, now, now)
                    for key in keys
                    if (ref := found[(entity, key)]) is None or ref.crm_id is None
                ],
            )

        for key in keys:
            self._cache.setdefault((entity, key), LinkRef(crm_id=crm_id))
        self._pending.append(_all)

    def flush(self, conn: Connection) -> None:
        """Write the held-back records (called inside the outcome's transaction)."""
        flush_all(conn, [self])

    def unused_claims(self) -> list[tuple[str, str, str, int]]:
        """Intents claimed at lease time that the connector never took: no create was
        sent under them, so they can go (see :func:`drop_unused`)."""
        return [(self._destination, e, k, self._delivery_id) for e, k in sorted(self._claimed)]

    def _take(self) -> tuple[list[LinkRow], list[Callable[[Connection], None]]]:
        rows, pending = self._rows, self._pending
        self._rows, self._pending = [], []
        return rows, pending


def drop_unused(conn: Connection, books: Iterable[StoreLinkBook]) -> None:
    """Delete the intents these books claimed but never used.

    Left in place they would be harmless but costly: the next attempt would look
    each record up before creating it, and other deliveries would wait on them.
    """
    unused = [claim for book in books for claim in book.unused_claims()]
    run_many(conn, _DROP, unused)
    for book in books:
        book._claimed.clear()


def flush_all(conn: Connection, books: Iterable[StoreLinkBook]) -> None:
    """The held-back records of many deliveries in one statement, in the order they came."""
    books = list(books)
    drop_unused(conn, books)
    rows: list[LinkRow] = []
    later: list[Callable[[Connection], None]] = []
    for book in books:
        book_rows, pending = book._take()
        rows.extend(book_rows)
        later.extend(pending)
    record_many(conn, rows)
    for write in later:
        write(conn)


def claim_links(
    conn: Connection, store: Store, wanted: Sequence[tuple[int, str, Sequence[Upsert]]]
) -> dict[int, StoreLinkBook]:
    """Link books for a leased batch, read and claimed inside the lease's transaction.

    ``wanted`` holds, per delivery, its destination and the records its plan
    will write. Every link those records may read is fetched at once, and an
    intent is written for each record that has no link yet (nor a known CRM id
    under one of its other keys), so each create's intent is durable before the
    delivery even starts and :meth:`StoreLinkBook.intend` needs no round trip.
    An intent claimed here but never used (an earlier record failed) is deleted
    with the attempt's outcome (:func:`drop_unused`); if the daemon dies first, it
    only makes the next attempt look that record up before creating it.
    """
    books: dict[int, StoreLinkBook] = {}
    by_destination: dict[str, list[tuple[int, Sequence[Upsert]]]] = {}
    for delivery_id, destination, records in wanted:
        by_destination.setdefault(destination, []).append((delivery_id, records))
    now = time.time()
    for destination, items in by_destination.items():
        keys = {delivery_id: _plan_keys(records) for delivery_id, records in items}
        stored = _stored_links(conn, destination, {k for ks in keys.values() for k in ks})
        busy_owners = _in_flight(
            conn, {owner for crm_id, _, owner in stored.values() if crm_id is None and owner}
        )
        claimed_by: dict[tuple[str, str], int] = {}
        for delivery_id, records in items:
            view: dict[tuple[str, str], LinkRef | None] = {}
            for key in keys[delivery_id]:
                found = stored.get(key)
                if key in claimed_by:  # an earlier delivery of this batch creates it
                    view[key] = LinkRef(crm_id=None, owner_busy=True)
                elif found is None:
                    view[key] = None
                else:
                    crm_id, url, owner = found
                    busy = (
                        crm_id is None
                        and owner is not None
                        and owner != delivery_id
                        and owner in busy_owners
                    )
                    view[key] = LinkRef(crm_id=crm_id, url=url, owner_busy=busy)
            claimed: set[tuple[str, str]] = set()
            for record in records:
                key = (record.entity, record.external_key)
                if view.get(key) is not None or key in claimed:
                    continue
                if any(
                    (ref := view.get((record.entity, other))) is not None and ref.crm_id is not None
                    for other in record.identities
                ):
                    continue  # the same record under another key: linked, not created
                if fetch(
                    conn,
                    _INTEND,
                    (destination, record.entity, record.external_key, delivery_id, now, now),
                ):
                    claimed.add(key)
                    claimed_by[key] = delivery_id
            books[delivery_id] = StoreLinkBook(
                store, destination, delivery_id, cache=view, claimed=claimed
            )
    return books


def _plan_keys(records: Sequence[Upsert]) -> list[tuple[str, str]]:
    """Every link a record connector may read for these records (see RecordConnector)."""
    keys = [(r.entity, k) for r in records for k in (r.external_key, *r.identities)]
    keys += [(e, r.parent) for r in records if r.parent for e in ("deal", "contact", "lead")]
    return list(dict.fromkeys(keys))


def _stored_links(
    conn: Connection, destination: str, keys: set[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str | None, str | None, int | None]]:
    if not keys:
        return {}
    entity_marks, entities = in_list(sorted({entity for entity, _ in keys}))
    key_marks, key_values = in_list(sorted({key for _, key in keys}))
    sql = _SELECT.format(entities=entity_marks, keys=key_marks)
    return {
        (entity, key): (crm_id, url, owner)
        for entity, key, crm_id, url, owner in fetch(
            conn, sql, (destination, *entities, *key_values)
        )
        if (entity, key) in keys
    }


def _in_flight(conn: Connection, delivery_ids: set[int]) -> set[int]:
    if not delivery_ids:
        return set()
    marks, params = in_list(sorted(delivery_ids))
    return {
        int(i)
        for i, state in fetch(conn, _OWNER_STATES.format(ids=marks), params)
        if state == "in_flight"
    }
