"""``POST /hooks/{source}``: authenticate, parse, store durably, answer 202.

Nothing is stored for a request that fails authentication (401). A request
that authenticates but cannot be read gets 422 with the reason, and its raw
body goes to quarantine.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from syncd.errors import IntakeError, PayloadTooLarge
from syncd.intake.base import RawRequest
from syncd.intake.service import Accepted, Intake


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


def intake_router(intake: Intake, *, max_body_bytes: int) -> APIRouter:
    router = APIRouter()

    @router.post("/hooks/{source_name}", status_code=202, tags=["intake"])
    async def receive(source_name: str, request: Request) -> JSONResponse:
        try:
            intake.source(source_name)
            body = await _read_limited(request, max_body_bytes)
            raw = RawRequest(
                body=body,
                headers={k.lower(): v for k, v in request.headers.items()},
                query=dict(request.query_params),
                received_at=time.time(),
            )
            outcome = await intake.receive(source_name, raw)
        except IntakeError as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status_code)
        if isinstance(outcome, Accepted):
            return JSONResponse(
                {
                    "event_ids": outcome.event_ids,
                    "event_id": outcome.event_ids[0] if outcome.event_ids else None,
                    "duplicates": outcome.duplicates,
                    "deliveries": outcome.deliveries,
                },
                status_code=202,
            )
        return JSONResponse(
            {"error": outcome.reason, "quarantine_id": outcome.quarantine_id}, status_code=422
        )

    return router
