"""Shared ``batch`` requests: the commands of concurrent deliveries travel together.

Bitrix24 limits requests (2 a second after a burst of 50), not commands, and one
``batch`` request carries up to 50 commands. So while deliveries wait for the
rate limit, their commands queue here, and the next request that the limit
allows carries as many of them as fit. A lone delivery sees no difference: its
commands go out exactly as they would on their own.

Each delivery's commands form a *group*: in order, contiguous, never split, with
their names prefixed so ``$result[...]`` references stay inside the group. The
request is sent with ``halt=1``: when a command fails, Bitrix24 runs nothing after
it, so a group whose earlier command failed never runs a later one that refers
to it. Groups after the failing one did not run at all; they are carried to the
next request instead of being failed.

Written here rather than taken from a library because it is the portal's own
batch protocol (string command keys, ``$result`` chaining, ``halt``) that is shared.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from syncd.connectors.shared import fail_shared
from syncd.errors import DeliveryError

Calls = Mapping[str, tuple[str, Mapping[str, Any]]]
Results = tuple[dict[str, Any], dict[str, DeliveryError]]

_REF = re.compile(r"\$result\[([^\]]+)\]")
#: How often a group may be carried over because an earlier group in its request failed.
MAX_CARRIES = 5


@dataclass
class _Group:
    calls: dict[str, tuple[str, Mapping[str, Any]]]
    future: asyncio.Future[Results]
    carried: int = 0
    prefix: str = field(default="")


def _renamed(value: Any, names: Mapping[str, str]) -> Any:
    """``$result[name]`` references rewritten to the group's prefixed names."""
    if isinstance(value, str):
        match = _REF.fullmatch(value)
        if match and match.group(1) in names:
            return f"$result[{names[match.group(1)]}]"
        return value
    if isinstance(value, dict):
        return {k: _renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return value


class SharedBatches:
    def __init__(
        self,
        *,
        acquire: Callable[[], Awaitable[object]],
        call: Callable[[str, Mapping[str, Any]], Awaitable[dict[str, Any]]],
        batch: Callable[[Calls], Awaitable[Results]],
        limit: int = 50,
    ) -> None:
        #: Waits for the rate limit; the request is built only after it, with all that queued.
        self._acquire = acquire
        #: One method, unpaced (the caller already waited).
        self._call = call
        #: One ``batch`` request (halt=1), unpaced: results and per-command errors by name.
        self._batch = batch
        self.limit = limit
        self._queue: deque[_Group] = deque()
        self._pump: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._seq = 0
        #: Requests sent, and how many carried more than one group (for tests and metrics).
        self.requests = 0
        self.shared_requests = 0

    async def run(self, calls: Calls) -> Results:
        """Run ``calls`` in order in one request (maybe shared); per-command errors returned.

        Raises what makes the whole request fail (network, rate limit, credentials).
        """
        if len(calls) > self.limit:
            raise ValueError(f"a group holds at most {self.limit} commands")
        future: asyncio.Future[Results] = asyncio.get_running_loop().create_future()
        self._queue.append(_Group(dict(calls), future))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            # Let deliveries that are about to queue do so before the request is built.
            await asyncio.sleep(0)
            try:
                await self._acquire()
            except BaseException as exc:
                self._fail(list(self._queue), exc)
                self._queue.clear()
                raise
            taken: list[_Group] = []
            size = 0
            while self._queue and size + len(self._queue[0].calls) <= self.limit:
                group = self._queue.popleft()
                size += len(group.calls)
                taken.append(group)
            if not taken:  # cannot happen: a group never exceeds the limit
                break
            task = asyncio.create_task(self._send(taken))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, groups: list[_Group]) -> None:
        self.requests += 1
        try:
            if len(groups) == 1:
                await self._send_alone(groups[0])
            else:
                self.shared_requests += 1
                await self._send_shared(groups)
        except BaseException as exc:
            self._fail([g for g in groups if not g.future.done()], exc)
            if not isinstance(exc, Exception):
                raise

    async def _send_alone(self, group: _Group) -> None:
        """Exactly the request the delivery would have made without company."""
        if len(group.calls) == 1:
            [(name, (method, params))] = group.calls.items()
            data = await self._call(method, params)
            group.future.set_result(({name: data.get("result")}, {}))
            return
        group.future.set_result(await self._batch(group.calls))

    async def _send_shared(self, groups: list[_Group]) -> None:
        merged: dict[str, tuple[str, Mapping[str, Any]]] = {}
        names: list[dict[str, str]] = []
        for group in groups:
            self._seq += 1
            own = {name: f"g{self._seq}_{name}" for name in group.calls}
            names.append(own)
            for name, (method, params) in group.calls.items():
                merged[own[name]] = (method, _renamed(params, own))
        results, errors = await self._batch(merged)
        failed = False
        carried: list[_Group] = []
        for group, own in zip(groups, names, strict=True):
            got = {name: results[p] for name, p in own.items() if p in results}
            refused = {name: errors[p] for name, p in own.items() if p in errors}
            ran = bool(got or refused)
            if refused:
                failed = True
            if ran or not failed or group.carried >= MAX_CARRIES:
                # Ran (fully or up to its own failure), or nothing failed before it and the
                # caller will see which commands are missing.
                group.future.set_result((got, refused))
                continue
            # An earlier group's failure halted the request before this one: send it again.
            group.carried += 1
            carried.append(group)
        self._queue.extendleft(reversed(carried))
        if self._queue and (self._pump is None or self._pump.done()):
            self._pump = asyncio.create_task(self._drain())

    @staticmethod
    def _fail(groups: list[_Group], exc: BaseException) -> None:
        fail_shared((item.future for item in groups), exc)

    async def aclose(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        for task in list(self._sending):
            task.cancel()
