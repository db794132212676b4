"""A generic REST receiver: what the ``rest`` connector talks to by default.

It stores records, answers look-ups by external key, and can be told to
misbehave (fail the next N requests, or commit a create and then hang past
the client's timeout, so the outcome is unknown to the sender). Its state
is inspectable so tests can assert "exactly one record per key".

Two API shapes share one store:

* ``/records``: the ``rest`` connector's generic form (one shape for every entity).
* ``/v2/...``: an API of the kind per-entity templates are for: its own path
  per entity, ids wrapped as ``{"data": {"id": 5}}`` (contacts, deals) or
  ``{"result": 9}`` (notes), a deal naming its contact by ``contact_id`` (an
  unknown one is refused with 422), notes under their deal
  (``/v2/deals/{id}/notes``), look-ups by ``external_id`` answering
  ``{"data": [...]}``, and its key in an ``X-Api-Key`` header.
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


def create_sink(token: str | None = None, api_key: str | None = None) -> tuple[FastAPI, SinkState]:
    """The sink's app and state. ``token``: bearer token for ``/records``;
    ``api_key``: the ``X-Api-Key`` the ``/v2`` API wants (None: any or none)."""
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

    # --- the /v2 shape ------------------------------------------------------------------

    def _v2_refusal(request: Request) -> Response | None:
        """Counting, auth and injected faults, in that order (the lock held)."""
        state.requests += 1
        if api_key is not None and request.headers.get("x-api-key") != api_key:
            return JSONResponse({"error": {"message": "bad API key"}}, status_code=401)
        return _injected()

    def _v2_create(
        entity: str, body: dict[str, Any], parent_id: str | None, request: Request
    ) -> tuple[str, bool]:
        """Store a record (the lock held); returns its id and whether to hang before answering."""
        external = str(body.get("external_id"))
        key = (entity, external)
        state.creates_per_key[key] += 1
        idem = request.headers.get("idempotency-key")
        if idem:
            state.idempotency_keys[idem] += 1
        record_id = str(state.next_id)
        state.next_id += 1
        fields = {k: v for k, v in body.items() if k not in ("external_id", "contact_id")}
        state.records[record_id] = {
            "id": record_id,
            "entity": entity,
            "external_key": external,
            "parent_id": parent_id,
            "fields": fields,
        }
        state.by_key[key] = record_id
        hang = state.faults.hang_count > 0
        if hang:
            state.faults.hang_count -= 1
        return record_id, hang

    async def _answer(payload: dict[str, Any], status: int, hang: bool) -> Response:
        if hang:
            # Committed, but the client gives up before hearing so: outcome unknown.
            await asyncio.sleep(state.faults.hang_seconds)
        return JSONResponse(payload, status_code=status)

    def _v2_found(entity: str, external_id: str, parent_id: str | None = None) -> list[Any]:
        record_id = state.by_key.get((entity, external_id))
        if record_id is None:
            return []
        record = state.records[record_id]
        if parent_id is not None and record["parent_id"] != parent_id:
            return []
        return [{"id": int(record_id), "external_id": external_id, **record["fields"]}]

    def _record_of(entity: str, record_id: str) -> dict[str, Any] | None:
        record = state.records.get(record_id)
        return record if record is not None and record["entity"] == entity else None

    @app.post("/v2/contacts", status_code=201)
    async def v2_contact_create(request: Request) -> Response:
        body = await request.json()
        with state.lock:
            refusal = _v2_refusal(request)
            if refusal is not None:
                return refusal
            if not isinstance(body, dict) or not body.get("external_id"):
                return JSONResponse({"error": {"message": "external_id is required"}}, 422)
            record_id, hang = _v2_create("contact", body, None, request)
        return await _answer({"data": {"id": int(record_id)}}, 201, hang)

    @app.post("/v2/deals", status_code=201)
    async def v2_deal_create(request: Request) -> Response:
        body = await request.json()
        with state.lock:
            refusal = _v2_refusal(request)
            if refusal is not None:
                return refusal
            if not isinstance(body, dict) or not body.get("external_id"):
                return JSONResponse({"error": {"message": "external_id is required"}}, 422)
            contact_id = body.get("contact_id")
            if contact_id is not None and _record_of("contact", str(contact_id)) is None:
                message = f"contact_id {contact_id!r} is not a contact"
                return JSONResponse({"error": {"message": message}}, 422)
            parent = str(contact_id) if contact_id is not None else None
            record_id, hang = _v2_create("deal", body, parent, request)
        return await _answer({"data": {"id": int(record_id)}}, 201, hang)

    @app.patch("/v2/{plural}/{record_id}")
    async def v2_update(plural: str, record_id: str, request: Request) -> Response:
        body = await request.json()
        entity = {"contacts": "contact", "deals": "deal"}.get(plural)
        with state.lock:
            refusal = _v2_refusal(request)
            if refusal is not None:
                return refusal
            record = _record_of(entity, record_id) if entity else None
            if record is None or not isinstance(body, dict):
                return JSONResponse({"error": {"message": "not found"}}, 404)
            record["fields"].update(
                {k: v for k, v in body.items() if k not in ("external_id", "contact_id")}
            )
            state.updates += 1
            shown = {"id": int(record_id), **record["fields"]}
        return JSONResponse({"data": shown})

    @app.get("/v2/{plural}")
    async def v2_lookup(plural: str, external_id: str, request: Request) -> Response:
        entity = {"contacts": "contact", "deals": "deal"}.get(plural)
        with state.lock:
            refusal = _v2_refusal(request)
            if refusal is not None:
                return refusal
            if entity is None:
                return JSONResponse({"error": {"message": "not found"}}, 404)
            state.lookups += 1
            found = _v2_found(entity, external_id)
        return JSONResponse({"data": found})

    @app.post("/v2/deals/{deal_id}/notes", status_code=201)
    async def v2_note_create(deal_id: str, request: Request) -> Response:
        body = await request.json()
        with state.lock:
            refusal = _v2_refusal(request)
            if refusal is not None:
                return refusal
            if _record_of("deal", deal_id) is None:
                return JSONResponse({"error": {"message": f"no deal {deal_id}"}}, 404)
            if not isinstance(body, dict) or not body.get("external_id"):
                return JSONResponse({"error": {"message": "external_id is required"}}, 422)
            record_id, hang = _v2_create("note", body, deal_id, request)
        return await _answer({"result": int(record_id)}, 201, hang)

    @app.get("/v2/deals/{deal_id}/notes")
    async def v2_note_lookup(deal_id: str, external_id: str, request: Request) -> Response:
        with state.lock:
            refusal = _v2_refusal(request)
            if refusal is not None:
                return refusal
            state.lookups += 1
            found = _v2_found("note", external_id, parent_id=deal_id)
        return JSONResponse({"data": found})

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
