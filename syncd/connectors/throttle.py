"""A client-side token bucket, so a connector paces itself below a CRM's own rate limit.

CRMs that meter requests with a leaky bucket (Bitrix24: 2 requests/s with a
burst of 50; amoCRM: 7 requests/s) refuse the request that overflows it.
Waiting a few hundred milliseconds here is cheaper than a refused request,
which costs a retry an outbox step later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """``burst`` requests at once, then ``rate`` per second on average.

    Each :meth:`acquire` reserves a token immediately (the balance may go
    negative) and then sleeps until that token would have existed, so
    concurrent callers are served in the order they asked, without a lock.
    ``clock`` and ``sleep`` are injectable so tests can drive time by hand.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now

    @property
    def available(self) -> float:
        """Tokens that could be taken right now without waiting (negative: already owed)."""
        self._refill()
        return self._tokens

    def reserve(self) -> float:
        """Take one token now; return how many seconds the caller must wait before using it."""
        self._refill()
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate

    async def acquire(self) -> float:
        """Wait for one token; returns the seconds waited (0.0 when one was free)."""
        delay = self.reserve()
        if delay > 0:
            try:
                await self._sleep(delay)
            except asyncio.CancelledError:
                # The request will not be sent: give the slot back to whoever is next.
                self._tokens = min(float(self.burst), self._tokens + 1.0)
                raise
        return delay

    def exhaust(self) -> None:
        """Empty the bucket: the server said it is full, whatever our own count says.

        Others (another app, another syncd) may share the server's bucket, so
        after a refusal the next requests are spaced at ``rate`` from now.
        """
        self._refill()
        self._tokens = min(self._tokens, 0.0)
