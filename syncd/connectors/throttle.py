"""Client-side pacing, so a connector stays below a CRM's own rate limit.

CRMs that meter requests with a leaky bucket (Bitrix24: 2 requests/s with a
burst of 50; amoCRM: 7 requests/s) refuse the request that overflows it.
:class:`TokenBucket` models a bucket; :class:`SlidingWindow` a count per window.
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
        #: The whole limit, of which :meth:`share` sets this process's part.
        self.full = (self.rate, self.burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated = clock()

    def share(self, fraction: float) -> None:
        """Pace at ``fraction`` of the whole limit (other replicas use the rest).

        The burst shrinks with the rate, to at least one request: n replicas
        emptying their buckets at once must not add up to more than the CRM's.
        """
        self._refill()
        rate, burst = self.full
        self.rate = rate * fraction
        self.burst = max(1, int(burst * fraction))
        self._tokens = min(self._tokens, float(self.burst))

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


class Slot:
    """One request's place in a :class:`SlidingWindow`, open until its answer is in."""

    __slots__ = ("_clock", "at", "open")

    def __init__(self, at: float, clock: Callable[[], float]) -> None:
        #: When it may go; once ended, the latest moment the server can have counted it.
        self.at = at
        self.open = True
        self._clock = clock

    def end(self) -> None:
        """The answer is in (or the request failed): the server counted it by now, if at all."""
        if self.open:
            self.open = False
            self.at = max(self.at, self._clock())


class SlidingWindow:
    """At most ``limit`` requests in any ``window`` seconds, as the server sees them.

    For a CRM that counts requests per second rather than draining a bucket
    (amoCRM: 7 in any second), this spends the whole allowance: ``limit``
    requests may go at once, and the next one waits until the ``limit``-th
    last is ``window`` seconds old. A token bucket cannot do that without
    either idling (rate below ``limit``) or, with a burst, putting more than
    ``limit`` requests into some second.

    The server counts a request when it arrives, somewhere between when it was
    sent and when its answer came back. With :meth:`begin` the caller reports
    the answer (:meth:`Slot.end`), and the window is measured from there: a
    request sent late (a busy event loop, a slow connection) cannot bring the
    next ``limit`` closer together at the server than ``window``. Until its
    answer is in, a request counts as if it were arriving now. :meth:`acquire`
    is the same without that report (the slot ends at its planned time).

    Send times are handed out in the order asked, without a lock. ``clock``
    and ``sleep`` are injectable so tests can drive time by hand.
    """

    def __init__(
        self,
        limit: int,
        window: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if window <= 0:
            raise ValueError("window must be positive")
        self.limit = int(limit)
        self.window = float(window)
        #: The whole limit, of which :meth:`share` sets this process's part.
        self.full = self.limit
        self._clock = clock
        self._sleep = sleep
        #: Slots handed out that may still matter: open ones, and ended ones in the window.
        self._slots: list[Slot] = []
        #: Nothing is sent before this (set when the server says it is full).
        self._closed_until = float("-inf")
        #: Callers in :meth:`begin` that have not been given the go yet.
        self.waiting = 0
        self._quiet: asyncio.Event | None = None

    def share(self, fraction: float) -> None:
        """Allow ``fraction`` of the whole limit per window, at least one request.

        Rounded down: n replicas each sending their part in the same window
        must not add up to more than the CRM counts.
        """
        self.limit = max(1, int(self.full * fraction + 1e-9))

    @property
    def rate(self) -> float:
        """The average it allows: requests per second."""
        return self.limit / self.window

    async def quiet(self, at_most: float) -> bool:
        """Wait until no caller is waiting in :meth:`begin` (True), or ``at_most`` s (False).

        For a request that gains from waiting (one that more records can join):
        it steps aside while others queue for the window, and goes when the
        window would otherwise be left unused.
        """
        if self.waiting == 0:
            return True
        if self._quiet is None:
            self._quiet = asyncio.Event()
        try:
            await asyncio.wait_for(self._quiet.wait(), at_most)
        except TimeoutError:
            return False
        return True

    def _left(self) -> None:
        self.waiting -= 1
        if self.waiting == 0 and self._quiet is not None:
            self._quiet.set()
            self._quiet = None

    def _times(self, now: float) -> list[float]:
        self._slots = [s for s in self._slots if s.open or s.at > now - self.window]
        return sorted(max(s.at, now) if s.open else s.at for s in self._slots)

    @property
    def available(self) -> float:
        """Requests that could go right now without waiting (0 while the window is full)."""
        now = self._clock()
        if now < self._closed_until:
            return 0.0
        recent = sum(1 for t in self._times(now) if t > now - self.window)
        return float(max(0, self.limit - recent))

    def _reserve(self) -> Slot:
        now = self._clock()
        at = max(now, self._closed_until)
        times = self._times(now)
        if len(times) >= self.limit:
            at = max(at, times[-self.limit] + self.window)
        slot = Slot(at, self._clock)
        self._slots.append(slot)
        return slot

    def reserve(self) -> float:
        """Take the next send time (ended at once); how many seconds to wait for it."""
        slot = self._reserve()
        slot.open = False
        return slot.at - self._clock()

    async def begin(self) -> Slot:
        """Wait for a send time; the caller ends the slot when the answer is in."""
        slot = self._reserve()
        self.waiting += 1
        try:
            while True:
                delay = slot.at - self._clock()
                if delay > 0:
                    await self._sleep(delay)
                # Requests still in flight when this time was planned may have been answered
                # later than it assumed: check again against what is known now.
                later = self._recheck(slot)
                if later is None:
                    return slot
                slot.at = later
        except BaseException:
            # Not sent. The slot ends at its planned time: giving it back could let a
            # later caller go earlier than the ones already told their times.
            slot.open = False
            raise
        finally:
            self._left()

    def _recheck(self, slot: Slot) -> float | None:
        """None when ``slot`` may go now; else the earliest time worth checking again."""
        now = self._clock()
        if now < self._closed_until:
            return self._closed_until
        # Sent or in flight (an open slot whose time has come counts as arriving now).
        busy = sorted(
            t
            for t in (max(s.at, now) if s.open else s.at for s in self._slots if s is not slot)
            if now - self.window < t <= now
        )
        if len(busy) < self.limit:
            return None
        return busy[-self.limit] + self.window

    async def acquire(self) -> float:
        """Wait for a send time; returns the seconds waited (0.0 when one was free)."""
        delay = self.reserve()
        if delay > 0:
            await self._sleep(delay)
        return delay

    def exhaust(self) -> None:
        """The server said it is full, whatever our own count says: wait a whole window.

        Others (another app, another syncd) may share the server's count, so
        after a refusal nothing more is sent for ``window`` seconds.
        """
        self._closed_until = max(self._closed_until, self._clock() + self.window)
