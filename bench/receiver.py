"""A minimal, fast, counting HTTP/1.1 receiver standing in for a CRM.

Raw asyncio (no framework) so that it is never the bottleneck of a delivery
benchmark. It speaks just enough HTTP/1.1 for keep-alive clients that send
``Content-Length`` bodies (httpx does):

* ``POST /records``   -> 201 ``{"id": "<n>"}``, counted, first/last arrival time kept
* ``PATCH /records/x`` and ``GET /records?...`` -> answered and counted as ``other``
* ``GET /_stats``     -> ``{"count", "other", "first", "last", "bytes"}``; times are
  ``time.monotonic()`` (CLOCK_MONOTONIC, comparable across processes on one host)
* ``POST /_reset``    -> zero the counters

Run: ``python bench/receiver.py --port 8799``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found"}


class Counters:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.other = 0
        self.body_bytes = 0
        self.first: float | None = None
        self.last: float | None = None

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "count": self.count,
                "other": self.other,
                "bytes": self.body_bytes,
                "first": self.first,
                "last": self.last,
            }
        ).encode()


def _response(status: int, body: bytes, close: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


class _Http(asyncio.Protocol):
    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            method, _, rest = head[0].partition(" ")
            target = rest.rsplit(" ", 1)[0]
            length = 0
            close = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
                elif name == "transfer-encoding":
                    self.transport.write(_response(400, b'{"error":"chunked"}', True))
                    self.transport.close()
                    return
            if len(self.buffer) < end + 4 + length:
                return
            self.counters.body_bytes += length
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(self._handle(method, target, close))
            if close:
                self.transport.close()
                self.transport = None

    def _handle(self, method: str, target: str, close: bool) -> bytes:
        c = self.counters
        path = target.split("?", 1)[0]
        if method == "POST" and path == "/records":
            now = time.monotonic()
            if c.first is None:
                c.first = now
            c.last = now
            c.count += 1
            return _response(201, b'{"id":"%d"}' % c.count, close)
        if path == "/_stats":
            return _response(200, c.as_json(), close)
        if method == "POST" and path == "/_reset":
            c.reset()
            return _response(200, b'{"ok":true}', close)
        if path.startswith("/records"):
            c.other += 1
            body = b"[]" if method == "GET" else b'{"id":"0"}'
            return _response(200, body, close)
        return _response(404, b'{"error":"not found"}', close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    counters = Counters()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Http(counters), host, port, backlog=1024)
    print(f"receiver listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
