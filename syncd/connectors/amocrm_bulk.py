"""Shared bulk writes: the records of concurrent amoCRM deliveries travel in one request.

amoCRM counts requests (7 in any second), not records, and its write endpoints
take arrays: ``POST /leads/complex``, ``PATCH /leads``, ``PATCH /contacts`` and
``POST /leads/notes`` (each note naming its lead in ``entity_id``). So while
deliveries wait for the limiter, their records queue here per endpoint, and the
request the limiter allows next carries all of them (up to ``limit``). A lone
record goes out exactly as it would on its own (see ``alone``).

amoCRM validates the whole array before it writes anything: a 400 with
``validation-errors`` names the records at fault by ``request_id``, and nothing
of the request was applied. The records it names fail for good; the others are
queued again at the front. A failure of the request itself (429, 5xx, a
timeout, credentials) is every record's failure; the breaker counts it once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from syncd.connectors.shared import fail_shared
from syncd.connectors.throttle import Slot
from syncd.errors import DeliveryError, RetriableError

Row = dict[str, Any]
#: What a shared request gave each record, by index: its row, or its own error.
Outcome = tuple[dict[int, Row], dict[int, DeliveryError]]

#: How often a record may be sent again because another record's error stopped its request.
MAX_CARRIES = 5


@dataclass
class _Entry:
    request_id: str
    item: dict[str, Any]
    future: asyncio.Future[Row]
    carried: int = 0


class SharedWrites:
    def __init__(
        self,
        *,
        acquire: Callable[[], Awaitable[Slot | None]],
        alone: Callable[[str, dict[str, Any]], Awaitable[Row]],
        shared: Callable[[str, Sequence[tuple[str, dict[str, Any]]]], Awaitable[Outcome]],
        limit: int = 50,
    ) -> None:
        #: Waits for the limiter; the request is built after it, with all that queued meanwhile.
        #: The slot it may return is ended when the answer is in.
        self._acquire = acquire
        #: One record in today's request (unpaced): its row, or raises.
        self._alone = alone
        #: Several records (request id, item) in one request (unpaced); raises when it failed.
        self._shared = shared
        self.limit = limit
        self._queues: dict[str, deque[_Entry]] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        #: Requests sent, and how many carried more than one record (tests and benchmarks).
        self.requests = 0
        self.shared_requests = 0

    def queued(self, endpoint: str) -> int:
        """Records waiting for a request to ``endpoint``."""
        return sum(1 for e in self._queues.get(endpoint, ()) if not e.future.done())

    async def submit(self, endpoint: str, request_id: str, item: dict[str, Any]) -> Row:
        """Send ``item`` to ``endpoint`` (maybe with others'); its row of the answer.

        Raises the record's own error, or the request's.
        """
        future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(endpoint, deque()).append(_Entry(request_id, item, future))
        self._wake(endpoint)
        return await future

    def _wake(self, endpoint: str) -> None:
        pump = self._pumps.get(endpoint)
        if pump is None or pump.done():
            self._pumps[endpoint] = asyncio.create_task(self._drain(endpoint))

    async def _drain(self, endpoint: str) -> None:
        queue = self._queues[endpoint]
        while queue:
            # Let deliveries that are about to queue do so before the slot is taken.
            await asyncio.sleep(0)
            try:
                slot = await self._acquire()
            except BaseException as exc:
                self._fail(list(queue), exc)
                queue.clear()
                raise
            taken: list[_Entry] = []
            while queue and len(taken) < self.limit:
                entry = queue.popleft()
                if not entry.future.done():  # a cancelled delivery sends nothing
                    taken.append(entry)
            if not taken:
                if slot is not None:
                    slot.end()
                continue
            task = asyncio.create_task(self._send(endpoint, taken, slot))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, endpoint: str, entries: list[_Entry], slot: Slot | None) -> None:
        try:
            await self._send_paced(endpoint, entries)
        finally:
            if slot is not None:
                slot.end()

    async def _send_paced(self, endpoint: str, entries: list[_Entry]) -> None:
        self.requests += 1
        try:
            if len(entries) == 1:
                [entry] = entries
                row = await self._alone(endpoint, entry.item)
                if not entry.future.done():
                    entry.future.set_result(row)
                return
            self.shared_requests += 1
            rows, refused = await self._shared(endpoint, [(e.request_id, e.item) for e in entries])
        except BaseException as exc:
            self._fail(entries, exc)
            if not isinstance(exc, Exception):
                raise
            return
        carried: list[_Entry] = []
        for index, entry in enumerate(entries):
            if entry.future.done():
                continue
            if index in refused:
                entry.future.set_exception(refused[index])
            elif not refused:
                entry.future.set_result(rows.get(index, {}))
            elif entry.carried >= MAX_CARRIES:
                entry.future.set_exception(
                    RetriableError(
                        f"amoCRM refused {MAX_CARRIES} shared requests for other records in "
                        "them; this record was never written"
                    )
                )
            else:
                # Another record's error stopped the request before anything was written.
                entry.carried += 1
                carried.append(entry)
        if carried:
            self._queues[endpoint].extendleft(reversed(carried))
            self._wake(endpoint)

    @staticmethod
    def _fail(entries: list[_Entry], exc: BaseException) -> None:
        fail_shared((item.future for item in entries), exc)

    async def aclose(self) -> None:
        for task in [*self._pumps.values(), *self._sending]:
            task.cancel()
