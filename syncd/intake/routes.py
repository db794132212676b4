"""``POST /hooks/{source}``: authenticate, parse, store durably, answer 202.

Nothing is stored for a request that fails authentication (401). A request
that authenticates but cannot be read gets 422 with the reason, and its raw
body goes to quarantine. While the store cannot be written (a database
outage), the answer is 503 with ``Retry-After``: nothing was stored, and the
sender (or the poller) brings the change again.
"""

from __future__ import annotations

import time

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from syncd.errors import IntakeError, PayloadTooLarge, StoreError
from syncd.intake.base import RawRequest
from syncd.intake.service import Accepted, Intake
from syncd.logs import redactor

log = structlog.get_logger("syncd.intake")

#: Seconds a sender is asked to wait after a 503 for a store it could not write to.
STORE_RETRY_AFTER = 5


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
        scope = request.scope
        try:
            intake.source(source_name)
            body = await _read_limited(request, max_body_bytes)
            raw = RawRequest(
                body=body,
                # ASGI header names are lower-case already.
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
                query=dict(request.query_params) if scope["query_string"] else {},
                received_at=time.time(),
            )
            outcome = await intake.receive(source_name, raw)
        except IntakeError as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status_code)
        except StoreError as exc:
            log.warning("webhook_not_stored", source=source_name, error=redactor.clean(str(exc)))
            return JSONResponse(
                {
                    "error": "the store cannot be written just now; nothing was stored, "
                    "send the webhook again"
                },
                status_code=503,
                headers={"Retry-After": str(STORE_RETRY_AFTER)},
            )
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


def hooks_app(router: APIRouter) -> FastAPI:
    """The webhook route in a FastAPI app of its own, with FastAPI's default stack only.

    Why: every webhook used to pass the monitor's middleware (sessions, its exception
    handlers) and be matched against all of its routes first. Served from here it
    costs what any one-route FastAPI app costs, plus intake's own work. The route is
    added as it is, not through ``include_router``, whose wrapper re-checks every
    request on its way in.
    """
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.router.routes.extend(router.routes)
    return app


class FrontDoor:
    """Plain ASGI: ``/hooks/...`` to the webhook app, everything else to the web app.

    The web app lists the webhook route too, so its OpenAPI document describes it.
    """

    def __init__(self, hooks: ASGIApp, web: FastAPI) -> None:
        self.hooks = hooks
        self.web = web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/hooks/"):
            await self.hooks(scope, receive, send)
        else:
            await self.web(scope, receive, send)
