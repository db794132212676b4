"""INSERT ... ON CONFLICT, which SQLite and PostgreSQL both speak but SQLAlchemy builds per dialect.

One helper per statement shape keeps the rest of the store dialect-free and
saves the SAVEPOINT (two extra round trips) that catching IntegrityError costs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def _insert(conn: Connection, table: Table) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"no ON CONFLICT support for {conn.dialect.name}")


def insert_ignore(
    conn: Connection, table: Table, values: Mapping[str, Any], conflict: Sequence[str]
) -> bool:
    """Insert a row unless one with the same ``conflict`` columns exists; True if inserted."""
    # Ask for the key back: a skipped row returns none. (rowcount cannot be trusted here:
    # SQLAlchemy adds RETURNING on PostgreSQL by itself, and the driver then reports -1.)
    key = next(iter(table.primary_key.columns))
    stmt = (
        _insert(conn, table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=list(conflict))
        .returning(key)
    )
    return conn.execute(stmt).first() is not None


def insert_ignore_id(
    conn: Connection, table: Table, values: Mapping[str, Any], conflict: Sequence[str]
) -> int | None:
    """Like :func:`insert_ignore`, but returns the new row's id (None when skipped)."""
    key = next(iter(table.primary_key.columns))
    stmt = (
        _insert(conn, table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=list(conflict))
        .returning(key)
    )
    row = conn.execute(stmt).first()
    return None if row is None else int(row[0])


def upsert(
    conn: Connection,
    table: Table,
    values: Mapping[str, Any],
    conflict: Sequence[str],
    update: Sequence[str],
) -> None:
    """Insert a row, or update ``update`` columns of the one with the same ``conflict`` columns."""
    stmt = _insert(conn, table).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(conflict), set_={name: stmt.excluded[name] for name in update}
    )
    conn.execute(stmt)
