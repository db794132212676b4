"""``POST /hooks/{source}``: authenticate, parse, store durably, answer 202."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from syncd.errors import IntakeError, PayloadTooLarge, UnknownSource
from syncd.intake.generic import GenericSource
from syncd.retry import outbox
from syncd.store import Store


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def intake_router(
    store: Store,
    sources: dict[str, GenericSource],
    *,
    max_body_bytes: int,
    on_stored: Callable[[], None] = lambda: None,
) -> APIRouter:
    router = APIRouter()

    @router.post("/hooks/{source_name}", status_code=202, tags=["intake"])
    async def receive(source_name: str, request: Request) -> JSONResponse:
        try:
            source = sources.get(source_name)
            if source is None:
                raise UnknownSource(f"no source named {source_name!r} is configured")
            body = await _read_limited(request, max_body_bytes)
            source.authenticate(request.headers, body)
            event = source.parse(body)
        except IntakeError as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status_code)
        stored = await store.writer.run(lambda conn: outbox.enqueue(conn, event, time.time()))
        on_stored()
        return JSONResponse(
            {
                "event_id": stored.event_id,
                "deliveries": stored.deliveries,
                "duplicate": stored.duplicate,
            },
            status_code=202,
        )

    return router
