"""SlidingWindow: at most N requests in any window, all N used, driven by a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from syncd.connectors.throttle import SlidingWindow


class FakeTime:
    def __init__(self) -> None:
        self.now = 500.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def max_in_any_window(times: list[float], window: float) -> int:
    """The most send times that fall in one half-open window [t, t + window)."""
    return max(sum(1 for u in times if t <= u < t + window - 1e-9) for t in times)


async def test_the_whole_allowance_goes_at_once_then_waits_for_the_oldest() -> None:
    t = FakeTime()
    w = SlidingWindow(7, 1.05, clock=t, sleep=t.sleep)
    sent = []
    for _ in range(15):
        await w.acquire()
        sent.append(t.now)
    assert sent[:7] == [500.0] * 7
    assert sent[7:14] == pytest.approx([501.05] * 7)
    assert sent[14] == pytest.approx(502.10)
    assert max_in_any_window(sent, 1.05) == 7


async def test_spread_out_requests_never_wait() -> None:
    t = FakeTime()
    w = SlidingWindow(3, 1.0, clock=t, sleep=t.sleep)
    for _ in range(10):
        assert await w.acquire() == 0.0
        t.now += 0.34  # 3 per 1.02 s: under the limit
    assert t.slept == []


async def test_concurrent_callers_get_distinct_slots_in_order() -> None:
    t = FakeTime()
    w = SlidingWindow(2, 1.0, clock=t, sleep=t.sleep)
    delays = [w.reserve() for _ in range(5)]
    assert delays == pytest.approx([0.0, 0.0, 1.0, 1.0, 2.0])


async def test_any_window_holds_at_most_the_limit_under_irregular_arrivals() -> None:
    t = FakeTime()
    w = SlidingWindow(7, 1.0, clock=t, sleep=t.sleep)
    gaps = [0.0, 0.01, 0.1, 0.0, 0.3, 0.02, 0.0, 0.0, 0.15, 0.07, 0.6, 0.0] * 4
    sent = []
    for gap in gaps:
        t.now += gap
        await w.acquire()
        sent.append(t.now)
    assert max_in_any_window(sent, 1.0) == 7 and t.slept  # full, and some had to wait


async def test_a_refusal_closes_the_window_from_now() -> None:
    t = FakeTime()
    w = SlidingWindow(7, 1.0, clock=t, sleep=t.sleep)
    await w.acquire()
    assert w.available == 6.0
    w.exhaust()
    assert w.available == 0.0
    assert await w.acquire() == pytest.approx(1.0)
    t.now += 0.5
    w.exhaust()  # a second refusal pushes it further, never back
    assert w.reserve() == pytest.approx(1.0)


async def test_a_cancelled_wait_keeps_its_slot_taken() -> None:
    w = SlidingWindow(1, 0.2)
    await w.acquire()
    waiter = asyncio.create_task(w.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # the slot handed to the cancelled caller (0.2 s on) is not handed out again
    assert w.reserve() > 0.2


def test_limit_and_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0, 1.0)
    with pytest.raises(ValueError):
        SlidingWindow(1, 0.0)
    assert SlidingWindow(7, 1.05).rate == pytest.approx(6.667, abs=1e-3)


async def test_the_window_counts_from_the_answer_of_a_late_request() -> None:
    t = FakeTime()
    w = SlidingWindow(2, 1.0, clock=t, sleep=t.sleep)
    first = await w.begin()
    second = await w.begin()
    t.now += 0.1
    first.end()  # answered quickly: the server counted it by 500.1
    t.now += 0.3
    # two in the window: the older counts from its answer (500.1), not its start (500.0)
    assert w.reserve() == pytest.approx(0.7)
    second.end()
    assert second.at == pytest.approx(500.4)


async def test_slots_that_never_end_hold_the_window_and_a_cancelled_wait_ends_its_own() -> None:
    t = FakeTime()
    w = SlidingWindow(1, 1.0, clock=t, sleep=t.sleep)
    await w.begin()  # never answered (yet)
    t.now += 5.0
    assert w.available == 0.0
    assert w.reserve() == pytest.approx(1.0)


async def test_a_slot_cancelled_while_waiting_is_closed_at_its_planned_time() -> None:
    w = SlidingWindow(1, 0.2)
    (await w.begin()).end()
    waiter = asyncio.create_task(w.begin())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert 0.2 < w.reserve() <= 0.45


async def test_a_late_answer_while_waiting_pushes_the_waiter_back() -> None:
    t = FakeTime()
    w = SlidingWindow(2, 1.0, clock=t)
    a, b = await w.begin(), await w.begin()

    async def sleep(seconds: float) -> None:
        # while the third waits, the first two are answered: at 500.1 and (late) 500.3
        if not a.open:
            t.now += seconds
            return
        t.now = 500.1
        b.end()
        t.now = 500.3
        a.end()
        t.now = 500.0 + seconds

    w._sleep = sleep
    c = await w.begin()
    # planned for 501.0 (both counted as arriving at 500.0); the answers say 501.1
    assert c.at == pytest.approx(501.1) and t.now == pytest.approx(501.1)


async def test_quiet_returns_once_nobody_waits_for_the_window() -> None:
    t = FakeTime()
    go = asyncio.Event()

    async def held(seconds: float) -> None:
        await go.wait()
        t.now += seconds

    w = SlidingWindow(1, 1.0, clock=t, sleep=held)
    assert await w.quiet(0.0) is True  # nobody waits: at once
    (await w.begin()).end()
    waiter = asyncio.create_task(w.begin())
    await asyncio.sleep(0)
    assert w.waiting == 1
    quiet = asyncio.create_task(w.quiet(60))
    await asyncio.sleep(0)
    assert not quiet.done()
    go.set()
    (await waiter).end()
    assert await quiet is True and w.waiting == 0
    go.clear()
    blocked = asyncio.create_task(w.begin())
    await asyncio.sleep(0)
    assert await w.quiet(0.01) is False  # gave up waiting
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert w.waiting == 0
