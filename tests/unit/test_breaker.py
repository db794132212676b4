"""The per-destination circuit breaker, with a hand-driven clock."""

from __future__ import annotations

from syncd.errors import AccessDenied, Contended, Rejected, ServerError, TransportError
from syncd.retry.breaker import Breaker


def make() -> tuple[Breaker, list[float]]:
    now = [1000.0]
    return Breaker(
        failure_threshold=3, base_pause=30, max_pause=100, auth_pause=300, clock=lambda: now[0]
    ), now


def test_a_run_of_failures_opens_it_with_a_growing_pause() -> None:
    breaker, now = make()
    assert breaker.record("crm", ServerError("HTTP 503")) is None
    assert breaker.record("crm", TransportError("timed out")) is None
    trip = breaker.record("crm", ServerError("HTTP 502"))
    assert trip is not None and trip.paused_until == 1030 and "3 failures in a row" in trip.problem
    assert breaker.paused() == {"crm"}
    now[0] = 1031
    assert breaker.paused() == set()
    for _ in range(2):
        assert breaker.record("crm", ServerError("HTTP 503")) is None
    second = breaker.record("crm", ServerError("HTTP 503"))
    assert second is not None and second.paused_until == 1031 + 60
    now[0] = 2000
    for _ in range(3):
        third = breaker.record("crm", ServerError("HTTP 503"))
    assert third is not None and third.paused_until == 2000 + 100  # capped


def test_success_closes_it_and_resets_the_count() -> None:
    breaker, _ = make()
    breaker.record("crm", ServerError("x"))
    breaker.record("crm", ServerError("x"))
    breaker.record("crm", None)
    assert breaker.record("crm", ServerError("x")) is None
    assert breaker.record("crm", ServerError("x")) is None
    assert breaker.paused() == set()


def test_refused_credentials_pause_at_once() -> None:
    breaker, _ = make()
    trip = breaker.record("amo", AccessDenied("HTTP 403: account blocked", status_code=403))
    assert trip is not None and trip.paused_until == 1300 and "account blocked" in trip.problem
    assert breaker.paused() == {"amo"} and breaker.paused_until("other") is None


def test_data_errors_and_contention_do_not_count() -> None:
    breaker, _ = make()
    for _ in range(10):
        assert breaker.record("crm", Rejected("HTTP 422: bad phone")) is None
        assert breaker.record("crm", Contended("busy")) is None
    assert breaker.paused() == set()


def test_destinations_are_independent() -> None:
    breaker, _ = make()
    for _ in range(3):
        breaker.record("a", ServerError("x"))
    assert breaker.paused() == {"a"}


def test_one_shared_request_counts_once_however_many_deliveries_it_carried() -> None:
    breaker, _ = make()
    assert breaker.record("crm", ServerError("HTTP 503")) is None
    for _ in range(5):  # the other deliveries of that same failed request
        echo = ServerError("HTTP 503")
        echo.echo = True
        assert breaker.record("crm", echo) is None
    assert breaker.paused() == set()
    assert breaker.record("crm", ServerError("HTTP 503")) is None
    assert breaker.record("crm", ServerError("HTTP 503")) is not None
