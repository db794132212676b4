"""Intake's writes in a child process, so the daemon's event loop only speaks HTTP.

Why a process: in one process the event loop and the writer thread share the GIL.
While a batch of webhooks was inserted and committed, the loop could not read the
next ones, and while the loop worked, the writer could not start. Under load the two
took turns, and intake ran at the sum of both (docs/benchmarks.md). The child has a
GIL of its own: it authenticates, parses and commits one batch of webhooks while the
daemon's loop reads and answers the next.

The daemon still answers 202 only after the child has committed the event. The
child's writes and the daemon's own share SQLite's write lock through a lock file
(store/sqlite.py, ``WriteGate``), so neither polls for it.

The two talk over the child's stdin and stdout in frames: a 4-byte length, then a
pickle. The first frame carries the config and the store URL, so secrets never show
in the process list. After that the daemon sends, once per turn of its event loop,
a list of requests ``(id, kind, body)``: a webhook to read and store
(``"webhook"``, with the source name and the raw request) or events already read
(``"events"``, from the poller and re-ingest). The child answers with a list of
``(id, outcome, error)``. It writes everything that has arrived as one batch with
:meth:`StoreWriter.write_now`, the writer thread's own batch path, so one bad request
fails alone. When its stdin closes (the daemon stopped or was killed), it finishes
what it has and exits.

A child that dies is started again; requests it held get 503, which webhook
senders retry, and requests made meanwhile wait for the new child. A commit the
dead child made before answering is harmless, as for a daemon killed after a commit:
the event's dedup key and the links table keep it from reaching the CRM twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from syncd.config import Config
from syncd.errors import IntakeError, InvalidPayload, StoreError, StoreUnavailable
from syncd.events import IncomingEvent
from syncd.intake import registry
from syncd.intake.base import RawRequest
from syncd.intake.service import (
    Accepted,
    Quarantined,
    hold_requests,
    read_webhook,
    store_requests,
)
from syncd.retry.outbox import Enqueued
from syncd.store import Store

log = structlog.get_logger("syncd.intake")

_HEADER = struct.Struct("!I")
#: One request: its id, its kind ("events" or "webhook"), and what it carries:
#: ``(events, received_at)`` or ``(source_name, raw_request)``.
Request = tuple[int, str, tuple[Any, Any]]
#: One answer: the request id, its outcome (stored events, Accepted, Quarantined or
#: the IntakeError that refused the webhook), and the text of an unexpected error.
Answer = tuple[int, Any, str | None]


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _take_frames(buffer: bytearray) -> list[Any]:
    """Every complete frame at the front of ``buffer``, removed from it."""
    frames, start = [], 0
    while len(buffer) - start >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer, start)
        end = start + _HEADER.size + size
        if end > len(buffer):
            break
        # Only ever the daemon and its own child on a private pipe: trusted data.
        frames.append(pickle.loads(buffer[start + _HEADER.size : end]))  # noqa: S301
        start = end
    del buffer[:start]
    return frames


@dataclass
class _Launched:
    """A child, and the daemon's ends of the pipes to and from it."""

    pid: int
    to_child: int
    from_child: int
    #: Waits for the child to exit; its exit code.
    wait: Callable[[], int]


def _fork() -> _Launched:
    """The child as a fork of this process, sharing the pages of everything imported.

    Only safe while this process has one thread: a lock another thread held at the
    fork would stay locked in the child for good.
    """
    to_read, to_write = os.pipe()
    from_read, from_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child, which never returns from here
        code = 1
        try:
            os.close(to_write)
            os.close(from_read)
            code = _serve_child(to_read, from_write)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(to_read)
    os.close(from_write)
    return _Launched(
        pid, to_write, from_read, lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    )


def _spawn() -> _Launched:
    """The child as a fresh interpreter (``python -m syncd.intake.writer_process``)."""
    to_read, to_write = os.pipe()
    from_read, from_write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncd.intake.writer_process"],
        stdin=to_read,
        stdout=from_write,
    )
    os.close(to_read)
    os.close(from_write)
    return _Launched(proc.pid, to_write, from_read, proc.wait)


class _Answers(asyncio.Protocol):
    """Frames from the child, as they arrive; no task or stream per frame."""

    def __init__(self, owner: WriterProcess, launched: _Launched) -> None:
        self.owner = owner
        self.launched = launched
        self.buffer = bytearray()
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[Any] = loop.create_future()
        self.gone: asyncio.Future[int] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for frame in _take_frames(self.buffer):
            if not self.hello.done():
                self.hello.set_result(frame)
            else:
                self.owner._answered(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        # The child closed its end: it is exiting, and nothing more comes.
        asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        code = await asyncio.to_thread(self.launched.wait)
        if not self.hello.done():
            self.hello.set_result({"error": f"it exited with code {code}"})
        self.gone.set_result(code)
        self.owner._gone(self, code)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.launched.pid, signal.SIGKILL)


class WriterProcess:
    """The daemon's side: sends events to the child and hands back what it stored."""

    def __init__(
        self,
        config: Config,
        url: str,
        *,
        start_timeout: float = 30.0,
        restart_delays: tuple[float, ...] = (0.2, 1.0, 5.0),
        wait_for_restart: float = 10.0,
        on_crash: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = {"config": config, "url": url}
        self._start_timeout = start_timeout
        #: How long a webhook waits for a child that is being started again.
        self._wait_for_restart = wait_for_restart
        #: Told each time a child exits on its own (the daemon counts it in /metrics).
        self._on_crash = on_crash
        self._restart_delays = restart_delays
        self._prepared: _Launched | None = None
        self._child: _Answers | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._outgoing: list[Request] = []
        self._next_id = 0
        self._closing = False
        self._up = asyncio.Event()
        #: How often a child that died was started again.
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._child.launched.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._stdin is not None

    def prefork(self) -> None:
        """Fork the child now, to be started later by :meth:`start`.

        Why: a fresh interpreter importing what the child needs holds about 80 MB of
        its own; a fork shares the daemon's pages instead. Call it while the daemon
        still has one thread (before the store's writer and the server start); the
        child waits for its settings until :meth:`start`. A child started again after
        a crash is spawned fresh, since the daemon has threads by then.
        """
        if self._prepared is None and self._child is None:
            self._prepared = _fork()

    async def start(self) -> None:
        """Start the child (or the one :meth:`prefork` made) and wait until it has
        opened the store."""
        launched, self._prepared = self._prepared or _spawn(), None
        loop = asyncio.get_running_loop()
        child = _Answers(self, launched)
        await loop.connect_read_pipe(lambda: child, os.fdopen(launched.from_child, "rb", 0))
        stdin, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(launched.to_child, "wb", 0)
        )
        stdin.write(_frame(self._settings))
        try:
            hello = await asyncio.wait_for(asyncio.shield(child.hello), self._start_timeout)
        except TimeoutError:
            hello = {"error": f"no answer within {self._start_timeout:g} s"}
        if not isinstance(hello, dict) or "ready" not in hello:
            child.kill()
            stdin.close()
            await child.gone
            reason = hello.get("error") if isinstance(hello, dict) else "it sent nonsense"
            raise StoreError(f"the intake writer process did not start: {reason}")
        self._child, self._stdin = child, stdin
        self._up.set()

    async def store(self, events: list[IncomingEvent], now: float) -> list[Enqueued]:
        """Store ``events`` received at ``now``; returns once the child committed them."""
        stored: list[Enqueued] = await self._ask("events", (events, now))
        return stored

    async def receive(self, source_name: str, request: RawRequest) -> Accepted | Quarantined:
        """The child authenticates and parses the webhook, then stores its events or
        quarantines its body; an IntakeError it raised is raised here."""
        outcome: Accepted | Quarantined | IntakeError = await self._ask(
            "webhook", (source_name, request)
        )
        if isinstance(outcome, IntakeError):
            raise outcome
        return outcome

    async def _ask(self, kind: str, body: tuple[Any, Any]) -> Any:
        if self._stdin is None and not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), self._wait_for_restart)
        if self._stdin is None:
            raise StoreUnavailable("the intake writer is not running; send the webhook again")
        loop = asyncio.get_running_loop()
        self._next_id += 1
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[self._next_id] = future
        if not self._outgoing:
            # Everything asked for during this turn of the loop goes in one frame.
            loop.call_soon(self._flush)
        self._outgoing.append((self._next_id, kind, body))
        return await future

    def _flush(self) -> None:
        requests, self._outgoing = self._outgoing, []
        if self._stdin is None or self._stdin.is_closing():
            self._fail([r[0] for r in requests])
            return
        self._stdin.write(_frame(requests))

    def _answered(self, answers: list[Answer]) -> None:
        for request_id, result, error in answers:
            future = self._pending.pop(request_id, None)
            if future is None or future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(StoreError(f"storing the webhook failed: {error}"))

    def _gone(self, child: _Answers, code: int) -> None:
        if child is not self._child:
            return  # a child that never started
        if self._stdin is not None:
            self._stdin.close()
        self._child = self._stdin = None
        self._up.clear()
        self._fail(list(self._pending))
        if not self._closing:
            log.error("intake_writer_exited", exit_code=code, note="starting it again")
            self._on_crash()
            self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    def _fail(self, request_ids: list[int]) -> None:
        for request_id in request_ids:
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(
                    StoreUnavailable("the intake writer stopped; send the webhook again")
                )

    async def _restart(self) -> None:
        attempt = 0
        while not self._closing:
            delay = self._restart_delays[min(attempt, len(self._restart_delays) - 1)]
            await asyncio.sleep(delay)
            try:
                await self.start()
            except StoreError as exc:
                log.error("intake_writer_restart_failed", error=str(exc))
                attempt += 1
                continue
            self.restarts += 1
            log.info("intake_writer_restarted", pid=self.pid)
            return

    async def close(self, grace: float = 30.0) -> None:
        """Let the child finish what it was sent, then wait for it to exit."""
        self._closing = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart_task
        if self._prepared is not None:
            # Forked but never started: closing its input ends it.
            os.close(self._prepared.to_child)
            os.close(self._prepared.from_child)
            await asyncio.to_thread(self._prepared.wait)
            self._prepared = None
        child, stdin = self._child, self._stdin
        if child is None or stdin is None:
            return
        if self._outgoing:
            self._flush()
        stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(child.gone), grace)
        except TimeoutError:
            child.kill()
            await child.gone


# --- the child ---------------------------------------------------------------


class _FrameReader:
    """Blocking reads of whole frames from a file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def frames(self) -> list[Any] | None:
        """Every frame that has arrived, waiting for at least one; None at end of input."""
        while True:
            frames = _take_frames(self.buffer)
            if frames:
                return frames
            data = os.read(self.fd, 1 << 20)
            if not data:
                return None
            self.buffer += data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Child:
    """The child's side: reads webhooks, writes batches, answers."""

    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.sources = {
            name: registry.build(name, src, default_region=config.intake.default_country)
            for name, src in config.sources.items()
        }
        self.destinations = {name: tuple(config.destinations_for(name)) for name in config.sources}

    def handle(self, requests: list[Request]) -> list[Answer]:
        answers: list[Answer] = []
        to_store: list[tuple[int, bool, list[IncomingEvent], float]] = []
        to_hold: list[tuple[int, tuple[str, RawRequest, str]]] = []
        for request_id, kind, (first, second) in requests:
            if kind == "events":
                to_store.append((request_id, False, first, second))
                continue
            source_name, raw = first, second
            try:
                source = self.sources[source_name]
                dests = self.destinations[source_name]
                to_store.append(
                    (request_id, True, read_webhook(source, raw, dests), raw.received_at)
                )
            except InvalidPayload as exc:
                to_hold.append((request_id, (source_name, raw, exc.reason)))
            except IntakeError as exc:
                answers.append((request_id, exc, None))
            except Exception as exc:  # a source's bug: this request fails, not the batch
                answers.append((request_id, None, _error_text(exc)))
        if to_store:
            outcomes = self.store.writer.write_now(
                store_requests, [(events, now) for _, _, events, now in to_store]
            )
            for (request_id, webhook, _, _), (stored, error) in zip(
                to_store, outcomes, strict=True
            ):
                if stored is None:
                    answers.append((request_id, None, _error_text(error)))
                else:
                    answers.append((request_id, Accepted.of(stored) if webhook else stored, None))
        if to_hold:
            held = self.store.writer.write_now(hold_requests, [item for _, item in to_hold])
            for (request_id, (_, _, reason)), (item_id, error) in zip(to_hold, held, strict=True):
                if item_id is None:
                    answers.append((request_id, None, _error_text(error)))
                else:
                    answers.append((request_id, Quarantined(item_id, reason), None))
        return answers


def _error_text(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}"


def _serve_child(in_fd: int, out: int) -> int:
    from sqlalchemy.engine import make_url

    from syncd import logs

    # The daemon says when to stop, by closing our input; a Ctrl-C or a SIGTERM sent
    # to the whole group must not cut a batch short while the daemon drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    reader = _FrameReader(in_fd)

    def send(obj: Any) -> None:
        _write_all(out, _frame(obj))

    frames = reader.frames()
    if not frames or not isinstance(frames[0], dict):
        return 2
    settings = frames.pop(0)
    config: Config = settings["config"]
    logs.configure(config.logging.level, config.logging.format, stream=sys.stderr)
    logs.redactor.add(config.secret_values())
    password = make_url(settings["url"]).password
    if password:
        logs.redactor.add([str(password)])
    try:
        store = Store(settings["url"], busy_timeout_ms=config.store.busy_timeout_ms)
        store.check_schema()
        child = _Child(config, store)
    except (StoreError, ImportError, ValueError) as exc:
        send({"error": str(exc)})
        return 1
    send({"ready": os.getpid()})
    try:
        while frames is not None:
            requests: list[Request] = [r for frame in frames for r in frame]
            if requests:
                send(child.handle(requests))
            frames = reader.frames()
    except BrokenPipeError:
        pass  # the daemon is gone; what was committed stays, and it has nobody to tell
    finally:
        store.close()
    return 0


def main() -> None:
    # Frames get stdout's pipe to themselves; anything else printed goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    sys.exit(_serve_child(0, out))


if __name__ == "__main__":
    main()
