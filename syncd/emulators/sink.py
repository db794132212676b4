"""A generic REST receiver: what the ``rest`` connector talks to by default.

It stores records, answers look-ups by external key, and can be told to
misbehave (fail the next N requests, or commit a create and then hang past
the client's timeout, so the outcome is unknown to the sender). Its state
is inspectable so tests can assert "exactly one record per key".
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


@dataclass
class Faults:
    fail_count: int = 0
    fail_status: int = 503
    fail_body: str = '{"error": "injected failure"}'
    retry_after: float | None = None
    hang_count: int = 0
    hang_seconds: float = 30.0
    #: Added to every request, to widen the window in which a crash can catch one.
    latency_seconds: float = 0.0


@dataclass
class SinkState:
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[tuple[str, str], str] = field(default_factory=dict)
    #: Every create request seen per (entity, external_key): must never exceed 1.
    creates_per_key: Counter[tuple[str, str]] = field(default_factory=Counter)
    idempotency_keys: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    updates: int = 0
    lookups: int = 0
    faults: Faults = field(default_factory=Faults)
    next_id: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def duplicate_creates(self) -> dict[str, int]:
        return {f"{e}:{k}": n for (e, k), n in self.creates_per_key.items() if n > 1}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "records": len(self.records),
                "by_entity": dict(Counter(r["entity"] for r in self.records.values())),
                "creates": sum(self.creates_per_key.values()),
                "duplicate_creates": self.duplicate_creates(),
                "updates": self.updates,
                "lookups": self.lookups,
                "requests": self.requests,
            }


def create_sink(token: str | None = None) -> tuple[FastAPI, SinkState]:
    state = SinkState()
    app = FastAPI(title="syncd sink", docs_url=None, redoc_url=None)

    def _injected() -> Response | None:
        f = state.faults
        if f.fail_count > 0:
            f.fail_count -= 1
            headers = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
            return Response(
                f.fail_body,
                status_code=f.fail_status,
                media_type="application/json",
                headers=headers,
            )
        return None

    def _authorized(request: Request) -> bool:
        return token is None or request.headers.get("authorization") == f"Bearer {token}"

    @app.middleware("http")
    async def _latency(request: Request, call_next: Any) -> Response:
        if state.faults.latency_seconds:
            await asyncio.sleep(state.faults.latency_seconds)
        response: Response = await call_next(request)
        return response

    @app.post("/records", status_code=201)
    async def create(request: Request) -> Response:
        body = await request.json()
        with state.lock:
            state.requests += 1
            if not _authorized(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            injected = _injected()
            if injected is not None:
                return injected
            key = (str(body.get("entity")), str(body.get("external_key")))
            state.creates_per_key[key] += 1
            idem = request.headers.get("idempotency-key")
            if idem:
                state.idempotency_keys[idem] += 1
            record_id = str(state.next_id)
            state.next_id += 1
            state.records[record_id] = {
                "id": record_id,
                "entity": key[0],
                "external_key": key[1],
                "parent_id": body.get("parent_id"),
                "fields": body.get("fields") or {},
            }
            state.by_key[key] = record_id
            hang = state.faults.hang_count > 0
            if hang:
                state.faults.hang_count -= 1
        if hang:
            # Committed, but the client gives up before hearing so: outcome unknown.
            await asyncio.sleep(state.faults.hang_seconds)
        return JSONResponse({"id": record_id}, status_code=201)

    @app.patch("/records/{record_id}")
    async def update(record_id: str, request: Request) -> Response:
        body = await request.json()
        with state.lock:
            state.requests += 1
            if not _authorized(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            injected = _injected()
            if injected is not None:
                return injected
            record = state.records.get(record_id)
            if record is None:
                return JSONResponse({"error": "not found"}, status_code=404)
            record["fields"].update(body.get("fields") or {})
            state.updates += 1
        return JSONResponse({"id": record_id})

    @app.get("/records")
    async def lookup(entity: str, external_key: str, request: Request) -> Response:
        with state.lock:
            state.requests += 1
            if not _authorized(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            injected = _injected()
            if injected is not None:
                return injected
            state.lookups += 1
            record_id = state.by_key.get((entity, external_key))
            found = [state.records[record_id]] if record_id is not None else []
        return JSONResponse(found)

    @app.get("/_sink/state")
    async def get_state() -> dict[str, Any]:
        return state.snapshot()

    @app.post("/_sink/faults")
    async def set_faults(request: Request) -> dict[str, Any]:
        body = await request.json()
        with state.lock:
            state.faults = Faults(**body)
        return {"ok": True}

    return app, state
