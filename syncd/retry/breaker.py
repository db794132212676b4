"""A circuit breaker per destination: stop hammering a CRM that is down or refuses us.

Two things open it:
- Refused credentials or a blocked account (HTTP 401/402/403). Every delivery would fail
  the same way, so the destination pauses at once instead of burning through its backlog.
  Its deliveries wait, and each pause ends with one probe.
- A run of retriable failures (timeouts, 5xx, 429) with no success in between. The pause
  doubles with each trip, up to a ceiling.

Any success closes it again. Data errors (a rejected field, a missing record) and
contention say nothing about the CRM's health, so they do not count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from syncd.errors import AccessDenied, Contended, DeliveryError


@dataclass
class _State:
    failures: int = 0
    trips: int = 0
    paused_until: float = 0.0
    problem: str | None = None


@dataclass(frozen=True)
class Trip:
    """The breaker just opened: until when, and why."""

    destination: str
    paused_until: float
    problem: str


class Breaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 10,
        base_pause: float = 30.0,
        max_pause: float = 600.0,
        auth_pause: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_pause = base_pause
        self.max_pause = max_pause
        self.auth_pause = auth_pause
        self.clock = clock
        self._states: dict[str, _State] = {}

    def paused(self) -> set[str]:
        now = self.clock()
        return {name for name, s in self._states.items() if s.paused_until > now}

    def paused_until(self, destination: str) -> float | None:
        state = self._states.get(destination)
        return state.paused_until if state and state.paused_until > self.clock() else None

    def record(self, destination: str, error: DeliveryError | None) -> Trip | None:
        """Note one attempt's result; returns a Trip when this result opened the breaker."""
        state = self._states.setdefault(destination, _State())
        if error is None:
            state.failures = state.trips = 0
            state.paused_until = 0.0
            state.problem = None
            return None
        if isinstance(error, AccessDenied):
            return self._open(destination, state, self.auth_pause, f"the CRM refused us: {error}")
        if not error.retriable or isinstance(error, Contended) or error.echo:
            return None
        state.failures += 1
        if state.failures < self.failure_threshold or state.paused_until > self.clock():
            return None
        pause = min(self.base_pause * 2**state.trips, self.max_pause)
        state.trips += 1
        state.failures = 0
        return self._open(
            destination, state, pause, f"{self.failure_threshold} failures in a row, last: {error}"
        )

    def _open(self, destination: str, state: _State, pause: float, problem: str) -> Trip:
        state.paused_until = self.clock() + pause
        state.problem = problem
        return Trip(destination, state.paused_until, problem)
