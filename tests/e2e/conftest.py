from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import SinkState

from .harness import CRM_TOKEN, Daemon


@pytest.fixture
def authed_sink() -> Iterator[tuple[ServerThread, SinkState]]:
    from syncd.emulators.sink import create_sink

    app, state = create_sink(token=CRM_TOKEN)
    server = ServerThread(app).start()
    yield server, state
    server.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path, authed_sink: tuple[ServerThread, SinkState]) -> Iterator[object]:
    started: list[Daemon] = []

    def make(**kwargs: object) -> Daemon:
        d = Daemon(tmp_path, authed_sink[0].url, **kwargs)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()
