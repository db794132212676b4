"""The aiohttp-backed httpx transport: same answers and same exceptions as httpx's own."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request, Response

from syncd.connectors.http import classified
from syncd.connectors.transport import AiohttpTransport
from syncd.emulators.serving import ServerThread, free_port
from syncd.errors import TransportError


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(
            body,
            status_code=201,
            headers={
                "X-Seen-Auth": request.headers.get("authorization", ""),
                "X-Seen-Key": request.headers.get("idempotency-key", ""),
            },
            media_type="application/json",
        )

    @app.get("/gzip")
    async def gz() -> Response:
        return Response(
            gzip.compress(b'{"ok": true}'),
            headers={"Content-Encoding": "gzip"},
            media_type="application/json",
        )

    @app.get("/slow")
    async def slow() -> Response:
        import asyncio

        await asyncio.sleep(2)
        return Response(b"late")

    thread = ServerThread(app).start()
    yield thread.url
    thread.stop()


async def test_round_trip_keeps_headers_body_and_status(server: str) -> None:
    async with httpx.AsyncClient(
        base_url=server, transport=AiohttpTransport(), headers={"Authorization": "Bearer t"}
    ) as client:
        r = await client.post("/echo", json={"a": [1, 2]}, headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 201 and r.json() == {"a": [1, 2]}
        assert r.headers["x-seen-auth"] == "Bearer t" and r.headers["x-seen-key"] == "k-1"
        gz = await client.get("/gzip")
        assert gz.json() == {"ok": True}  # httpx decodes Content-Encoding, once


async def test_read_timeout_is_httpx_read_timeout(server: str) -> None:
    async with httpx.AsyncClient(
        base_url=server, transport=AiohttpTransport(), timeout=0.3
    ) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/slow")
        with pytest.raises(TransportError) as info:
            async with classified():
                await client.get("/slow")
        assert info.value.outcome_unknown  # the request may have been acted on


async def test_refused_connection_is_connect_error() -> None:
    port = free_port()
    with socket.socket() as s:  # nothing listens on `port`
        assert s.connect_ex(("127.0.0.1", port)) != 0
    async with httpx.AsyncClient(transport=AiohttpTransport(), timeout=1) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")
        with pytest.raises(TransportError) as info:
            async with classified():
                await client.get(f"http://127.0.0.1:{port}/")
        assert not info.value.outcome_unknown  # never sent: safe to send again
