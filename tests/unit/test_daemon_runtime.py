"""What the overview shows of each destination's pacing, whatever limiter its connector uses."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from syncd.connectors.throttle import SlidingWindow, TokenBucket
from syncd.daemon import DaemonRuntime
from syncd.retry.breaker import Breaker


def test_both_kinds_of_limiter_are_shown() -> None:
    dispatcher: Any = SimpleNamespace(breaker=Breaker())
    connectors: Any = {
        "bitrix24": SimpleNamespace(throttle=TokenBucket(2.0, 40)),
        "amocrm": SimpleNamespace(throttle=SlidingWindow(7, 1.0)),
        "rest": SimpleNamespace(),
    }
    shown = DaemonRuntime(dispatcher, connectors).destinations()
    assert shown["bitrix24"]["throttle_rate"] == 2.0
    assert shown["bitrix24"]["throttle_available"] == 40
    assert shown["amocrm"]["throttle_rate"] == 7.0
    assert shown["amocrm"]["throttle_available"] == 7
    assert "throttle_rate" not in shown["rest"] and shown["rest"]["paused_until"] is None


def test_garbage_collector_leaves_start_up_objects_alone() -> None:
    """After start-up the objects alive are frozen and young collections are rarer;
    a cycle made later is still collected."""
    import gc

    from syncd.daemon import GC_YOUNG_THRESHOLD, settle_garbage_collector

    before = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold()[0] == max(before[0], GC_YOUNG_THRESHOLD)

        class Node:
            other: object = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
