"""An in-process syncd app on a real migrated store, for intake tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from syncd.config import Config, MonitorToken, parse_config
from syncd.daemon import build_app, build_intake
from syncd.intake.service import Intake
from syncd.store import Store


class App:
    """A config, the store it uses, and a client talking to the HTTP app."""

    #: An admin API token added to configs that bring none, for calls to /api/v1.
    TOKEN = "integration-api-token-0123"

    def __init__(self, config: Config, store: Store) -> None:
        if not config.monitor.tokens:
            monitor = config.monitor.model_copy(
                update={
                    "tokens": [
                        MonitorToken(name="tests", role="admin", token=SecretStr(self.TOKEN))
                    ]
                }
            )
            config = config.model_copy(update={"monitor": monitor})
        self.api_headers = {
            "Authorization": f"Bearer {config.monitor.tokens[0].token.get_secret_value()}"
        }
        self.config = config
        self.store = store
        self.intake: Intake = build_intake(store, config, None)
        self.http_app = build_app(store, config, self.intake)
        self.client = TestClient(self.http_app)
        #: The same app, calling as the admin token (for /api/v1).
        self.api = TestClient(self.http_app, headers=self.api_headers)

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
