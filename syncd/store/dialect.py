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


# --- prebuilt SQL on the driver's own cursor ---------------------------------------------
#
# The hot paths (intake's insert, lease, outcomes, links) run a handful of fixed
# statements thousands of times a second. Built and compiled through SQLAlchemy on
# every call they cost far more CPU than the database spends running them, so they
# are written once as plain SQL that SQLite and PostgreSQL both accept, with ``?``
# placeholders, and run on the DBAPI connection inside SQLAlchemy's transaction.
# Only the placeholder style differs (psycopg wants ``%s``); anything else that
# differs between the two comes from a helper here.

_PG_TEXT: dict[str, str] = {}


def _text(conn: Connection, sql: str) -> str:
    if conn.dialect.name == "sqlite":
        return sql
    found = _PG_TEXT.get(sql)
    if found is None:
        found = _PG_TEXT[sql] = sql.replace("?", "%s")
    return found


def _driver(conn: Connection) -> Any:
    return conn.connection.driver_connection


def fetch(conn: Connection, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a prebuilt statement, run in ``conn``'s transaction."""
    return list(_driver(conn).execute(_text(conn, sql), params).fetchall())


def run(conn: Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Run a prebuilt statement in ``conn``'s transaction; returns the rows it changed."""
    return int(_driver(conn).execute(_text(conn, sql), params).rowcount)


def run_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """One prebuilt statement for many rows; returns the rows changed in all."""
    if not rows:
        return 0
    cursor = _driver(conn).cursor()
    try:
        cursor.executemany(_text(conn, sql), rows)
        return int(cursor.rowcount)
    finally:
        cursor.close()


def in_list(values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``(?, ?, ?, ?)`` and its parameters, for ``IN`` with ``values`` (not empty).

    The list is padded to a power of two by repeating its last value, which does
    not change what ``IN`` matches but keeps the number of distinct statements
    small, so the driver's statement cache holds them all.
    """
    size = 1
    while size < len(values):
        size *= 2
    params = [*values, *([values[-1]] * (size - len(values)))]
    return "(" + ", ".join("?" * size) + ")", params


def skip_locked(conn: Connection, table: str) -> str:
    """Suffix that makes a claiming SELECT skip rows another worker holds (PostgreSQL).

    SQLite has one writer at a time, so there is nothing to skip.
    """
    return f" FOR UPDATE OF {table} SKIP LOCKED" if conn.dialect.name == "postgresql" else ""


def ids_in_values_order(conn: Connection) -> bool:
    """True where a multi-row INSERT gives its rows consecutive ids in VALUES order,
    following the largest id so far, with no one else inserting meanwhile: SQLite,
    whose writer holds the database's only write lock (BEGIN IMMEDIATE) and hands out
    ``max(id) + 1`` for an INTEGER PRIMARY KEY. On PostgreSQL other replicas draw
    from the same sequence at the same time."""
    return bool(conn.dialect.name == "sqlite")
