"""An in-process syncd app on a real migrated store, for intake tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from syncd.config import Config, parse_config
from syncd.daemon import build_app, build_intake
from syncd.intake.service import Intake
from syncd.store import Store


class App:
    """A config, the store it uses, and a client talking to the HTTP app."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.intake: Intake = build_intake(store, config, None)
        self.client = TestClient(build_app(store, config, self.intake))

    def rows(self, table: Any) -> list[Any]:
        with self.store.read_engine.connect() as conn:
            return list(
                conn.execute(table.select().order_by(table.c[table.primary_key.columns.keys()[0]]))
            )


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Any]:
    stores: list[Store] = []

    def make(toml: str, store: Store | None = None) -> App:
        config = parse_config(toml, "test.toml")
        if store is None:
            store = Store(f"sqlite:///{tmp_path}/syncd.db")
            store.migrate()
            store.start()
            stores.append(store)
        return App(config, store)

    yield make
    for s in stores:
        s.close()
