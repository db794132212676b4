"""When to try a failed delivery again, or when to stop. Pure: no clock, no I/O.

The schedule follows the shape that works for Svix and Stripe (quick first
retries, then hours apart), compressed so the last scheduled retry falls
inside the window, plus one final attempt exactly when the window closes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from syncd.errors import Contended, DeliveryError, RateLimited, TransportError


@dataclass(frozen=True)
class Retry:
    """Try again at ``at`` (epoch seconds)."""

    at: float
    final: bool = False


@dataclass(frozen=True)
class Fail:
    """Stop: the CRM refused this for good. A human has to look."""

    reason: str


@dataclass(frozen=True)
class Expire:
    """Stop: still failing when the retry window closed. The monitor shows it as missing."""

    reason: str


Decision = Retry | Fail | Expire


@dataclass(frozen=True)
class RetryPolicy:
    schedule: Sequence[float] = field(default=(10, 60, 300, 1800, 3600, 7200, 14400, 28800))
    window: float = 24 * 3600
    jitter: float = 0.2
    max_step: float = 8 * 3600
    #: A rate-limited or timed-out CRM is struggling: wait at least this long.
    overload_floor: float = 30.0

    def base_delay(self, failures: int) -> float:
        """The un-jittered wait after the ``failures``-th failure (1-based)."""
        index = min(max(failures, 1), len(self.schedule)) - 1
        return float(self.schedule[index])

    def decide(
        self,
        error: DeliveryError,
        *,
        failures: int,
        first_failed_at: float,
        now: float,
        rng: random.Random | None = None,
    ) -> Decision:
        """Decide after the ``failures``-th failed attempt (this one included)."""
        if not error.retriable:
            return Fail(str(error))
        deadline = first_failed_at + self.window
        if now >= deadline:
            return Expire(f"still failing after the {_human(self.window)} retry window: {error}")
        if isinstance(error, Contended):
            # Not a failure of the CRM: just let the other delivery finish first.
            return Retry(at=min(now + (error.retry_after or 1.0), deadline))

        delay = self.base_delay(failures)
        if self.jitter:
            spread = (rng or random).uniform(-self.jitter, self.jitter)
            delay *= 1 + spread
        if isinstance(error, RateLimited | TransportError):
            delay = max(delay, self.overload_floor)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        delay = min(delay, self.max_step)

        at = now + delay
        if at >= deadline:
            return Retry(at=deadline, final=True)
        return Retry(at=at)


def _human(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"
