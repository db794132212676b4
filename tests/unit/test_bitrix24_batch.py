"""Shared batch requests: concurrent deliveries' commands travel together, safely."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from syncd.connectors.bitrix24_batch import SharedBatches
from syncd.errors import DeliveryError, Rejected, ServerError


class FakePortal:
    """Runs batches the way Bitrix24 does with halt=1: in order, nothing after a failure."""

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.refuse = refuse or set()
        self.batches: list[dict[str, tuple[str, Mapping[str, Any]]]] = []
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_request: DeliveryError | None = None

    async def acquire(self) -> None:
        await self.gate.wait()

    async def call(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(method)
        return {"result": f"{method}-done"}

    async def batch(
        self, calls: Mapping[str, tuple[str, Mapping[str, Any]]]
    ) -> tuple[dict[str, Any], dict[str, DeliveryError]]:
        self.batches.append(dict(calls))
        if self.fail_request is not None:
            raise self.fail_request
        results: dict[str, Any] = {}
        for name, (method, params) in calls.items():
            if method in self.refuse:
                return results, {name: Rejected(f"{method} refused")}
            # resolve chaining the way the portal does
            resolved = {
                k: results[v[8:-1]] if isinstance(v, str) and v.startswith("$result[") else v
                for k, v in params.items()
            }
            results[name] = f"{method}:{resolved}"
        return results, {}

    def shared(self, limit: int = 50) -> SharedBatches:
        return SharedBatches(acquire=self.acquire, call=self.call, batch=self.batch, limit=limit)


def group(n: int, tag: str) -> dict[str, tuple[str, Mapping[str, Any]]]:
    return {
        "contact0": (f"{tag}.contact.add", {"n": n}),
        "deal1": (f"{tag}.deal.add", {"CONTACT_ID": "$result[contact0]"}),
    }


async def test_a_lone_delivery_sends_what_it_would_alone() -> None:
    portal = FakePortal()
    shared = portal.shared()
    results, errors = await shared.run({"one": ("crm.deal.update", {"id": 1})})
    assert results == {"one": "crm.deal.update-done"} and not errors
    assert portal.calls == ["crm.deal.update"] and portal.batches == []
    results, _ = await shared.run(group(1, "a"))
    assert list(portal.batches[0]) == ["contact0", "deal1"]  # no prefixes when alone
    assert results["deal1"] == "a.deal.add:{'CONTACT_ID': \"a.contact.add:{'n': 1}\"}"


async def test_waiting_deliveries_share_one_request_and_keep_their_chains() -> None:
    portal = FakePortal()
    portal.gate.clear()  # the rate limit is spent: everyone queues
    shared = portal.shared()
    runs = [asyncio.create_task(shared.run(group(i, t))) for i, t in enumerate("abc")]
    await asyncio.sleep(0.01)
    assert portal.batches == []
    portal.gate.set()
    outcomes = await asyncio.gather(*runs)
    assert len(portal.batches) == 1 and len(portal.batches[0]) == 6
    assert shared.shared_requests == 1
    for i, (t, (results, errors)) in enumerate(zip("abc", outcomes, strict=True)):
        assert not errors
        # each group's deal refers to its own contact, not another group's
        assert (
            results["deal1"] == f"{t}.deal.add:{{'CONTACT_ID': \"{t}.contact.add:{{'n': {i}}}\"}}"
        )


async def test_a_failure_never_runs_its_chain_and_later_groups_are_carried_over() -> None:
    portal = FakePortal(refuse={"b.contact.add"})
    portal.gate.clear()
    shared = portal.shared()
    runs = [asyncio.create_task(shared.run(group(i, t))) for i, t in enumerate("abc")]
    await asyncio.sleep(0)
    portal.gate.set()
    (ra, ea), (rb, eb), (rc, ec) = await asyncio.gather(*runs)
    assert set(ra) == {"contact0", "deal1"} and not ea
    # b's contact was refused, so its deal (which needs the contact) never ran
    assert rb == {} and isinstance(eb["contact0"], Rejected) and "deal1" not in rb
    # c did not run in the halted request; it went out in the next one and succeeded
    assert set(rc) == {"contact0", "deal1"} and not ec
    assert len(portal.batches) == 2
    assert [m for m, _ in portal.batches[1].values()] == ["c.contact.add", "c.deal.add"]


async def test_a_request_failure_reaches_every_delivery_in_it() -> None:
    portal = FakePortal()
    portal.gate.clear()
    boom = ServerError("Bitrix24 batch: HTTP 502")
    boom.outcome_unknown = True
    portal.fail_request = boom
    shared = portal.shared()
    runs = [asyncio.create_task(shared.run(group(i, t))) for i, t in enumerate("ab")]
    await asyncio.sleep(0)
    portal.gate.set()
    got = await asyncio.gather(*runs, return_exceptions=True)
    assert all(isinstance(e, ServerError) and e.outcome_unknown for e in got)
    assert got[0] is not got[1]  # each delivery owns its copy
    # the circuit breaker is to count this one request once
    assert [getattr(e, "echo", None) for e in got] == [False, True]


async def test_groups_are_never_split_across_requests() -> None:
    portal = FakePortal()
    portal.gate.clear()
    shared = portal.shared(limit=5)
    runs = [asyncio.create_task(shared.run(group(i, t))) for i, t in enumerate("abcd")]
    await asyncio.sleep(0)
    portal.gate.set()
    await asyncio.gather(*runs)
    assert [len(b) for b in portal.batches] == [4, 4]
    with pytest.raises(ValueError):
        await shared.run({f"c{i}": ("x", {}) for i in range(6)})
