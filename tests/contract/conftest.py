"""One fixture, ``crm``, parametrized over every connector and its emulator."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import create_sink

from .harness import CrmHarness
from .rest_harness import API_KEY, RestHarness, TemplatedRestHarness

#: Harness factories provided by each CRM's module: "module:function" returning
#: a context manager that yields a CrmHarness. Listed by name so a CRM whose
#: module is not there yet is skipped, not an import error for the whole suite.
EXTRA = {
    "bitrix24": "tests.contract.bitrix24_harness:running",
    "amocrm": "tests.contract.amocrm_harness:running",
}


@pytest.fixture(params=["rest", "rest_templated", *EXTRA])
def crm(request: pytest.FixtureRequest) -> Iterator[CrmHarness]:
    if request.param in ("rest", "rest_templated"):
        templated = request.param == "rest_templated"
        app, state = create_sink(api_key=API_KEY if templated else None)
        server = ServerThread(app).start()
        try:
            yield (TemplatedRestHarness if templated else RestHarness)(server, state)
        finally:
            server.stop()
        return
    module_name, _, func = EXTRA[request.param].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        pytest.skip(f"no harness for {request.param} yet")
    with getattr(module, func)() as harness:
        yield harness
