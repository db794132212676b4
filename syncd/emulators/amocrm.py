"""A stand-in for an amoCRM account (API v4) over real HTTP, for tests and the demo.

It answers the way the public documentation describes amoCRM: HAL envelopes
(``_embedded``, ``_links``, ``_page``), integer ids, 204 No Content for an
empty list or a missing record, ``validation-errors`` bodies for bad data,
problem+json for other errors and a bare HTML page for a blocked account,
``/oauth2/access_token`` with single-use refresh tokens, and a requests-per-
second limit that answers 429.

Where amoCRM's behaviour is not documented the emulator takes the cautious
reading, so connectors are tested against the harder case: ``query`` does
not search tags (unless ``query_searches_tags``), phone search compares
digits only, 429 carries ``retry_after`` in the body and no header (unless
``retry_after_header``), and a reused refresh token gets HTTP 400.

The write endpoints take arrays, as amoCRM's do (``POST /leads/complex``,
``PATCH /leads``, ``PATCH /contacts``, ``POST /leads/notes`` with an
``entity_id`` per note next to ``POST /leads/{id}/notes``): every record is
checked before any is written, and a bad one fails the whole request with
``validation-errors`` naming its ``request_id``. ``state.bulk_sizes`` keeps how
many records each such request carried.

Records live in plain dicts (``state.contacts``, ``state.leads``,
``state.notes``) so tests can assert "exactly one lead per ticket".
Misbehaviour is switched on from Python: :meth:`AmoState.fail_next`,
:meth:`AmoState.drop_after_commit`, ``state.latency``,
:meth:`AmoState.block_account`, :meth:`AmoState.expire_tokens`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

ACCOUNT_ID = 28805383
USER_ID = 504141
PIPELINE_ID = 3383152
#: Stages of the emulated pipeline; 142 and 143 are amoCRM's fixed won/lost statuses.
STAGES: dict[str, int] = {
    "unsorted": 33929749,
    "new": 33929752,
    "open": 33929755,
    "waiting": 33929758,
    "won": 142,
    "lost": 143,
}
#: A text field of leads meant for syncd's external key.
EXTERNAL_KEY_FIELD_ID = 700101
PHONE_FIELD_ID = 3
EMAIL_FIELD_ID = 5

_HAL = "application/hal+json"
_PROBLEM = "application/problem+json"
_PHONE_ENUMS = {"WORK": 1, "WORKDD": 2, "MOB": 3, "FAX": 4, "HOME": 5, "OTHER": 6}
_EMAIL_ENUMS = {"WORK": 7, "PRIV": 8, "OTHER": 9}
_NOTE_TYPES = {
    "common",
    "call_in",
    "call_out",
    "service_message",
    "extended_service_message",
    "sms_in",
    "sms_out",
    "geolocation",
    "attachment",
}
_MAX_LIMIT = 250

_HTML = {
    402: "402 Payment Required",
    403: "403 Forbidden",
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}


def _html_page(status: int) -> str:
    title = _HTML.get(status, f"{status} Error")
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    )


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"title": title, "type": f"https://httpstatus.es/{status}", "status": status}
    body.update(detail=detail, **extra)
    return JSONResponse(body, status_code=status, media_type=_PROBLEM)


@dataclass(frozen=True)
class FieldError:
    """One entry of a ``validation-errors`` body."""

    path: str
    code: str = "NotSupportedChoice"
    detail: str = "The value you selected is not a valid choice."


def validation_errors(errors: list[tuple[str, FieldError]]) -> JSONResponse:
    """400 with amoCRM's body: errors grouped by the ``request_id`` of the item at fault."""
    groups: dict[str, list[dict[str, str]]] = {}
    for request_id, err in errors:
        groups.setdefault(request_id, []).append(
            {"code": err.code, "path": err.path, "detail": err.detail}
        )
    body = {
        "validation-errors": [{"request_id": rid, "errors": errs} for rid, errs in groups.items()],
        "title": "Bad Request",
        "type": "https://httpstatus.es/400",
        "status": 400,
        "detail": "Request validation failed",
    }
    return JSONResponse(body, status_code=400, media_type=_PROBLEM)


def injected_response(status: int, *, html: bool, retry_after: float | None) -> Response:
    """What amoCRM sends for ``status``, for fault injection and the blocked account."""
    if html:
        return Response(_html_page(status), status_code=status, media_type="text/html")
    if status == 400:
        return validation_errors(
            [("0", FieldError("custom_fields_values.0.field_id"))],
        )
    if status == 401:
        return problem(401, "Unauthorized", "Invalid user name or password")
    if status == 402:
        return problem(402, "Payment Required", "Payment required")
    if status == 403:
        return problem(403, "Forbidden", "Account is blocked")
    if status == 404:
        return problem(404, "Not Found", "Cannot GET the requested resource")
    if status == 429:
        extra: dict[str, Any] = {"retry_after": retry_after if retry_after is not None else 1}
        return problem(
            429,
            "Too Many Requests",
            "You have sent too many requests in a given amount of time. Please try again later.",
            **extra,
        )
    if status in (502, 503, 504):
        return Response(_html_page(status), status_code=status, media_type="text/html")
    if status >= 500:
        return JSONResponse(
            {
                "title": "ErrInternalServer",
                "status": status,
                "detail": "Our team are probably already working on the elimination of the problem",
                "trace_id": uuid.uuid4().hex,
            },
            status_code=status,
            media_type=_PROBLEM,
        )
    return problem(status, "Error", f"HTTP {status}")


def _jwt(claims: dict[str, Any]) -> str:
    """A token shaped like amoCRM's (a JWT): the signature is random, nobody verifies it."""

    def part(data: dict[str, Any]) -> str:
        raw = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'typ': 'JWT', 'alg': 'RS256'})}.{part(claims)}.{secrets.token_urlsafe(32)}"


@dataclass
class Faults:
    fail_count: int = 0
    fail_status: int = 503
    #: Answer injected failures with an HTML page instead of problem+json.
    fail_html: bool = False
    retry_after: float | None = None
    #: Writes committed, then answered only after ``drop_seconds`` (past the client's timeout).
    drop_count: int = 0
    drop_seconds: float = 30.0


@dataclass
class AmoState:
    """Everything the emulated account holds, and the switches that make it misbehave."""

    subdomain: str = "example"
    client_id: str = "syncd-emulator-client"
    client_secret: str = "syncd-emulator-secret"  # noqa: S105 - a test double's fixed secret
    redirect_uri: str = "https://syncd.example/amocrm/oauth"
    access_token_ttl: float = 86400.0
    #: Requests per second before 429; None: unlimited.
    rate_limit: float | None = 7.0
    #: After this many 429s within a minute the account is blocked (HTTP 403); None: never.
    block_after_429s: int | None = None
    retry_after_header: bool = False
    query_searches_tags: bool = False
    #: HTTP status for a reused or unknown refresh token (amoCRM's is not documented).
    revoked_refresh_status: int = 400
    #: Seconds added to every request.
    latency: float = 0.0
    clock: Callable[[], float] = time.time

    contacts: dict[int, dict[str, Any]] = field(default_factory=dict)
    leads: dict[int, dict[str, Any]] = field(default_factory=dict)
    notes: dict[int, dict[str, Any]] = field(default_factory=dict)
    tags: dict[int, str] = field(default_factory=dict)
    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    pipelines: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: "contacts" / "leads" -> field id -> field definition.
    custom_fields: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    access_tokens: dict[str, float] = field(default_factory=dict)
    long_lived_tokens: set[str] = field(default_factory=set)
    refresh_tokens: set[str] = field(default_factory=set)
    spent_refresh_tokens: set[str] = field(default_factory=set)
    refreshes: int = 0
    #: (status, html) while the account is blocked.
    blocked: tuple[int, bool] | None = None
    faults: Faults = field(default_factory=Faults)
    #: Every request seen: (method, path), in order.
    requests: list[tuple[str, str]] = field(default_factory=list)
    rate_limited: int = 0
    #: Writes to endpoints that take arrays ("PATCH /api/v4/leads", ...): records per request.
    bulk_sizes: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _window: deque[float] = field(default_factory=deque)
    _recent_429s: deque[float] = field(default_factory=deque)
    _next_id: int = 10_000_001

    def __post_init__(self) -> None:
        self.users.setdefault(
            USER_ID,
            {
                "id": USER_ID,
                "name": "Admin",
                "email": "admin@example.com",
                "lang": "ru",
                "rights": _rights("A", is_admin=True),
            },
        )
        self.pipelines.setdefault(
            PIPELINE_ID,
            {
                "id": PIPELINE_ID,
                "name": "Helpdesk",
                "sort": 1,
                "is_main": True,
                "is_unsorted_on": True,
                "is_archive": False,
                "statuses": [
                    {"id": STAGES["unsorted"], "name": "Unsorted", "sort": 10, "type": 1},
                    {"id": STAGES["new"], "name": "New ticket", "sort": 20, "type": 0},
                    {"id": STAGES["open"], "name": "In progress", "sort": 30, "type": 0},
                    {"id": STAGES["waiting"], "name": "Waiting", "sort": 40, "type": 0},
                    {"id": 142, "name": "Closed - won", "sort": 10000, "type": 0},
                    {"id": 143, "name": "Closed - lost", "sort": 11000, "type": 0},
                ],
            },
        )
        self.custom_fields.setdefault(
            "contacts",
            {
                PHONE_FIELD_ID: _cf(PHONE_FIELD_ID, "Phone", "PHONE", "multitext", _PHONE_ENUMS),
                EMAIL_FIELD_ID: _cf(EMAIL_FIELD_ID, "Email", "EMAIL", "multitext", _EMAIL_ENUMS),
                701: _cf(701, "Position", "POSITION", "text"),
            },
        )
        self.custom_fields.setdefault(
            "leads",
            {
                EXTERNAL_KEY_FIELD_ID: _cf(EXTERNAL_KEY_FIELD_ID, "Helpdesk ticket", None, "text"),
                700103: _cf(700103, "Channel", None, "text"),
                700105: _cf(700105, "First response due", None, "text"),
            },
        )

    # --- switches ---------------------------------------------------------------------

    def fail_next(
        self,
        count: int,
        status: int,
        *,
        retry_after: float | None = None,
        html: bool | None = None,
    ) -> None:
        """The next ``count`` API requests fail with amoCRM's own answer for ``status``."""
        with self.lock:
            self.faults.fail_count = count
            self.faults.fail_status = status
            self.faults.retry_after = retry_after
            self.faults.fail_html = bool(html) if html is not None else status == 403

    def drop_after_commit(self, count: int, seconds: float = 30.0) -> None:
        """The next ``count`` writes are committed, then answered only after ``seconds``."""
        with self.lock:
            self.faults.drop_count = count
            self.faults.drop_seconds = seconds

    def block_account(self, status: int = 403, *, html: bool | None = None) -> None:
        """Every request gets ``status`` (403: blocked, an nginx page; 402: unpaid)."""
        with self.lock:
            self.blocked = (status, html if html is not None else status == 403)

    def unblock_account(self) -> None:
        with self.lock:
            self.blocked = None

    def expire_tokens(self, *, long_lived: bool = False) -> None:
        """Every OAuth access token stops working now (refresh tokens still do)."""
        with self.lock:
            now = self.clock()
            self.access_tokens = {t: min(exp, now - 1) for t, exp in self.access_tokens.items()}
            if long_lived:
                self.long_lived_tokens.clear()

    def issue_tokens(self) -> tuple[str, str]:
        """A fresh OAuth pair, as if the integration had just been authorized."""
        with self.lock:
            return self._issue_pair()

    def add_long_lived_token(self, token: str | None = None) -> str:
        with self.lock:
            value = token or _jwt({"jti": uuid.uuid4().hex, "account_id": ACCOUNT_ID})
            self.long_lived_tokens.add(value)
            return value

    def add_contact(
        self,
        name: str,
        *,
        emails: tuple[str, ...] = (),
        phones: tuple[str, ...] = (),
    ) -> int:
        """A contact typed in by a manager, values stored exactly as given."""
        with self.lock:
            values = []
            if phones:
                values.append(_stored_multitext(self, "PHONE", [{"value": p} for p in phones]))
            if emails:
                values.append(_stored_multitext(self, "EMAIL", [{"value": e} for e in emails]))
            return self._create_contact({"name": name, "custom_fields_values": values or None})

    def writes(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(m, p) for m, p in self.requests if m in ("POST", "PATCH")]

    # --- internals (call with the lock held) ------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 2
        return self._next_id

    def _issue_pair(self) -> tuple[str, str]:
        now = self.clock()
        exp = now + self.access_token_ttl
        access = _jwt(
            {
                "jti": uuid.uuid4().hex,
                "iat": int(now),
                "exp": int(exp),
                "account_id": ACCOUNT_ID,
                "sub": str(USER_ID),
            }
        )
        refresh = "def50200" + secrets.token_hex(48)
        self.access_tokens[access] = exp
        self.refresh_tokens.add(refresh)
        return access, refresh

    def _authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        token = header[len("Bearer ") :]
        if token in self.long_lived_tokens:
            return True
        expires = self.access_tokens.get(token)
        return expires is not None and expires > self.clock()

    def _rate_limited(self) -> bool:
        if self.rate_limit is None:
            return False
        now = self.clock()
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        if len(self._window) >= self.rate_limit:
            self.rate_limited += 1
            self._recent_429s.append(now)
            while self._recent_429s and self._recent_429s[0] <= now - 60.0:
                self._recent_429s.popleft()
            if (
                self.block_after_429s is not None
                and len(self._recent_429s) >= self.block_after_429s
            ):
                self.blocked = (403, True)
            return True
        self._window.append(now)
        return False

    def _create_contact(self, data: dict[str, Any]) -> int:
        now = int(self.clock())
        contact_id = self._new_id()
        self.contacts[contact_id] = {
            "id": contact_id,
            "name": str(data.get("name") or "").strip()
            or " ".join(str(data.get(k) or "") for k in ("first_name", "last_name")).strip(),
            "first_name": str(data.get("first_name") or ""),
            "last_name": str(data.get("last_name") or ""),
            "responsible_user_id": data.get("responsible_user_id") or USER_ID,
            "group_id": 0,
            "created_by": USER_ID,
            "updated_by": USER_ID,
            "created_at": now,
            "updated_at": now,
            "closest_task_at": None,
            "custom_fields_values": data.get("custom_fields_values") or None,
            "account_id": ACCOUNT_ID,
            "tags": [],
        }
        return contact_id

    def _main_pipeline(self) -> dict[str, Any]:
        for pipeline in self.pipelines.values():
            if pipeline.get("is_main"):
                return pipeline
        return next(iter(self.pipelines.values()))


def _rights(level: str, *, is_admin: bool) -> dict[str, Any]:
    actions = {"view": level, "edit": level, "add": level, "delete": level, "export": level}
    return {
        "leads": dict(actions),
        "contacts": dict(actions),
        "companies": dict(actions),
        "tasks": {"edit": level, "delete": level},
        "mail_access": True,
        "catalog_access": True,
        "status_rights": [],
        "is_admin": is_admin,
        "is_free": False,
        "is_active": True,
        "group_id": None,
        "role_id": None,
    }


def _cf(
    field_id: int,
    name: str,
    code: str | None,
    kind: str,
    enums: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "id": field_id,
        "name": name,
        "code": code,
        "type": kind,
        "sort": 500,
        "is_api_only": False,
        "enums": [
            {"id": i, "value": v, "sort": n} for n, (v, i) in enumerate((enums or {}).items())
        ]
        or None,
    }


def _stored_multitext(state: AmoState, code: str, values: list[dict[str, Any]]) -> dict[str, Any]:
    field_def = next(f for f in state.custom_fields["contacts"].values() if f["code"] == code)
    enums = {e["value"]: e["id"] for e in field_def["enums"] or []}
    return {
        "field_id": field_def["id"],
        "field_name": field_def["name"],
        "field_code": code,
        "field_type": "multitext",
        "values": [
            {
                "value": v["value"],
                "enum_id": enums.get(v.get("enum_code") or "WORK"),
                "enum_code": v.get("enum_code") or "WORK",
            }
            for v in values
        ],
    }


# --- request validation ---------------------------------------------------------------


def _check_custom_fields(
    state: AmoState, entity: str, raw: Any, prefix: str
) -> tuple[list[dict[str, Any]], list[FieldError]]:
    """Validate ``custom_fields_values`` of one item; return them in stored form."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [FieldError(prefix, "InvalidType", "This value should be of type array.")]
    known = state.custom_fields[entity]
    by_code = {f["code"]: f for f in known.values() if f["code"]}
    stored: list[dict[str, Any]] = []
    errors: list[FieldError] = []
    for i, item in enumerate(raw):
        path = f"{prefix}.{i}"
        if not isinstance(item, dict):
            errors.append(FieldError(path, "InvalidType", "This value should be of type object."))
            continue
        field_def = None
        if "field_id" in item:
            field_def = known.get(item["field_id"]) if isinstance(item["field_id"], int) else None
            if field_def is None:
                errors.append(FieldError(f"{path}.field_id"))
                continue
        elif "field_code" in item:
            field_def = by_code.get(item["field_code"])
            if field_def is None:
                errors.append(FieldError(f"{path}.field_code"))
                continue
        else:
            errors.append(
                FieldError(f"{path}.field_id", "NotBlank", "This value should not be blank.")
            )
            continue
        values = item.get("values")
        if not isinstance(values, list):
            errors.append(
                FieldError(f"{path}.values", "InvalidType", "This value should be of type array.")
            )
            continue
        enums = {e["value"]: e["id"] for e in field_def["enums"] or []}
        out: list[dict[str, Any]] = []
        for j, value in enumerate(values):
            vpath = f"{path}.values.{j}"
            if not isinstance(value, dict) or not isinstance(value.get("value"), str | int | float):
                errors.append(
                    FieldError(
                        f"{vpath}.value", "InvalidType", "This value should be of type string."
                    )
                )
                continue
            entry: dict[str, Any] = {"value": value["value"]}
            if enums:
                code = value.get("enum_code")
                if code is None and value.get("enum_id") in enums.values():
                    code = next(c for c, i in enums.items() if i == value["enum_id"])
                code = code or next(iter(enums))
                if code not in enums:
                    errors.append(FieldError(f"{vpath}.enum_code"))
                    continue
                entry.update(enum_id=enums[code], enum_code=code)
            out.append(entry)
        stored.append(
            {
                "field_id": field_def["id"],
                "field_name": field_def["name"],
                "field_code": field_def["code"],
                "field_type": field_def["type"],
                "values": out,
            }
        )
    return stored, errors


def _merge_fields(current: list[dict[str, Any]] | None, given: list[dict[str, Any]]) -> Any:
    """A field named in an update replaces that field's values; others stay."""
    merged = {f["field_id"]: f for f in current or []}
    for f in given:
        if f["values"]:
            merged[f["field_id"]] = f
        else:
            merged.pop(f["field_id"], None)
    return list(merged.values()) or None


def _check_user(state: AmoState, item: dict[str, Any], errors: list[FieldError]) -> None:
    user = item.get("responsible_user_id")
    if user is not None and user not in state.users:
        errors.append(FieldError("responsible_user_id"))


def _check_name(item: dict[str, Any], errors: list[FieldError]) -> None:
    if "name" in item and not isinstance(item["name"], str):
        errors.append(FieldError("name", "InvalidType", "This value should be of type string."))


def _check_stage(
    state: AmoState, item: dict[str, Any], current: dict[str, Any] | None, errors: list[FieldError]
) -> tuple[int, int]:
    """The (pipeline, status) a lead ends up in, checking the pair exists."""
    pipeline_id = item.get("pipeline_id")
    if pipeline_id is None:
        pipeline = (
            state.pipelines.get(current["pipeline_id"]) if current else state._main_pipeline()
        )
    else:
        pipeline = state.pipelines.get(pipeline_id) if isinstance(pipeline_id, int) else None
        if pipeline is None:
            errors.append(FieldError("pipeline_id"))
            return (current or {}).get("pipeline_id", 0), (current or {}).get("status_id", 0)
    assert pipeline is not None
    status_ids = [s["id"] for s in pipeline["statuses"]]
    status_id = item.get("status_id")
    if status_id is None:
        if current is not None and pipeline["id"] == current["pipeline_id"]:
            return pipeline["id"], current["status_id"]
        first = [s for s in pipeline["statuses"] if s.get("type") == 0]
        return pipeline["id"], first[0]["id"]
    if status_id not in status_ids:
        errors.append(FieldError("status_id"))
        return pipeline["id"], (current or {}).get("status_id", 0)
    return pipeline["id"], status_id


def _tag_ids(state: AmoState, raw: Any) -> list[int]:
    ids: list[int] = []
    for tag in raw or []:
        if not isinstance(tag, dict):
            continue
        if isinstance(tag.get("id"), int) and tag["id"] in state.tags:
            ids.append(tag["id"])
        elif isinstance(tag.get("name"), str) and tag["name"]:
            found = next((i for i, n in state.tags.items() if n == tag["name"]), None)
            if found is None:
                found = state._new_id()
                state.tags[found] = tag["name"]
            ids.append(found)
    return ids


# --- rendering ------------------------------------------------------------------------


def _link(base: str, path: str) -> dict[str, Any]:
    return {"self": {"href": f"{base}{path}"}}


def _render_contact(
    state: AmoState, c: dict[str, Any], base: str, with_: set[str]
) -> dict[str, Any]:
    out = {k: v for k, v in c.items() if k != "tags"}
    out["_links"] = _link(base, f"/api/v4/contacts/{c['id']}")
    embedded: dict[str, Any] = {
        "tags": [{"id": t, "name": state.tags[t], "color": None} for t in c["tags"]],
        "companies": [],
    }
    if "leads" in with_:
        embedded["leads"] = [
            {"id": lead_id, "_links": _link(base, f"/api/v4/leads/{lead_id}")}
            for lead_id, lead in sorted(state.leads.items())
            if c["id"] in lead["contact_ids"]
        ]
    out["_embedded"] = embedded
    return out


def _render_lead(
    state: AmoState, lead: dict[str, Any], base: str, with_: set[str]
) -> dict[str, Any]:
    out = {k: v for k, v in lead.items() if k not in ("tags", "contact_ids")}
    out["_links"] = _link(base, f"/api/v4/leads/{lead['id']}")
    embedded: dict[str, Any] = {
        "tags": [{"id": t, "name": state.tags[t], "color": None} for t in lead["tags"]],
        "companies": [],
    }
    if "contacts" in with_:
        embedded["contacts"] = [
            {"id": cid, "is_main": n == 0, "_links": _link(base, f"/api/v4/contacts/{cid}")}
            for n, cid in enumerate(lead["contact_ids"])
        ]
    out["_embedded"] = embedded
    return out


def _render_note(note: dict[str, Any], base: str) -> dict[str, Any]:
    out = dict(note)
    out.pop("entity_type", None)
    # PHP writes an empty map as [] (a note type without params).
    out["params"] = note["params"] or []
    out["_links"] = _link(
        base, f"/api/v4/{note['entity_type']}/{note['entity_id']}/notes/{note['id']}"
    )
    return out


def _page(request: Request, key: str, items: list[dict[str, Any]]) -> Response:
    """A HAL page, or 204 No Content when there is nothing (amoCRM's empty list)."""
    try:
        limit = int(request.query_params.get("limit", "50"))
        page = int(request.query_params.get("page", "1"))
    except ValueError:
        return validation_errors([("0", FieldError("limit", "InvalidType", "Not a number."))])
    if limit > _MAX_LIMIT:
        return problem(422, "Unprocessable Entity", f"Limit {_MAX_LIMIT} per page")
    limit = max(1, limit)
    page = max(1, page)
    chunk = items[(page - 1) * limit : page * limit]
    if not chunk:
        return Response(status_code=204)
    base = str(request.base_url).rstrip("/")
    url = f"{base}{request.url.path}"
    links: dict[str, Any] = {"self": {"href": f"{url}?limit={limit}&page={page}"}}
    if page * limit < len(items):
        links["next"] = {"href": f"{url}?limit={limit}&page={page + 1}"}
    if page > 1:
        links["prev"] = {"href": f"{url}?limit={limit}&page={page - 1}"}
    body = {"_page": page, "_links": links, "_embedded": {key: chunk}}
    return JSONResponse(body, media_type=_HAL)


def _matches(state: AmoState, record: dict[str, Any], query: str) -> bool:
    """``query``: a case-insensitive substring of the name or any field value.

    Phones match on digits, so "9991234567" finds "+7 (999) 123-45-67".
    """
    q = query.strip().lower()
    if not q:
        return True
    if q in str(record.get("name") or "").lower():
        return True
    digits = re.sub(r"\D", "", q)
    for f in record.get("custom_fields_values") or []:
        for v in f["values"]:
            text = str(v.get("value", ""))
            if q in text.lower():
                return True
            if (
                f.get("field_code") == "PHONE"
                and len(digits) >= 5
                and digits in re.sub(r"\D", "", text)
            ):
                return True
    if state.query_searches_tags:
        return any(q in state.tags[t].lower() for t in record.get("tags", []))
    return False


def _with(request: Request) -> set[str]:
    return {w.strip() for w in request.query_params.get("with", "").split(",") if w.strip()}


def _ids_filter(request: Request) -> set[int] | None:
    raw = request.query_params.getlist("filter[id][]") or request.query_params.getlist("filter[id]")
    if not raw:
        return None
    return {int(x) for x in raw if x.strip().isdigit()}


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _empty_request() -> JSONResponse:
    return problem(400, "Bad Request", "Request data can not be empty")


def _count_bulk(state: AmoState, request: Request, records: int) -> None:
    """Note a write to an endpoint that takes arrays: one request, ``records`` records."""
    path = "/".join("{id}" if p.isdigit() else p for p in request.url.path.split("/"))
    state.bulk_sizes.setdefault(f"{request.method} {path}", []).append(records)


def _rid(item: dict[str, Any], index: int) -> str:
    return str(item.get("request_id", index))


def create_amocrm_emulator(
    *,
    subdomain: str = "example",
    client_id: str = "syncd-emulator-client",
    client_secret: str = "syncd-emulator-secret",  # noqa: S107 - a test double's fixed secret
    redirect_uri: str = "https://syncd.example/amocrm/oauth",
    rate_limit: float | None = 7.0,
    access_token_ttl: float = 86400.0,
    long_lived_token: str | None = None,
    query_searches_tags: bool = False,
    clock: Callable[[], float] = time.time,
) -> tuple[FastAPI, AmoState]:
    """An amoCRM account as a FastAPI app, and its state (see the module docstring)."""
    state = AmoState(
        subdomain=subdomain,
        client_id=client_id,
        client_secret=client_secret,
        redirect_uri=redirect_uri,
        rate_limit=rate_limit,
        access_token_ttl=access_token_ttl,
        query_searches_tags=query_searches_tags,
        clock=clock,
    )
    if long_lived_token is not None:
        state.add_long_lived_token(long_lived_token)
    app = FastAPI(title="amoCRM emulator", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _gate(request: Request, call_next: Any) -> Response:
        """Latency, a blocked account, the rate limit, injected faults, auth; then drops."""
        if state.latency:
            await asyncio.sleep(state.latency)
        path = request.url.path
        api = path.startswith("/api/")
        with state.lock:
            state.requests.append((request.method, path))
            if state.blocked is not None:
                status, html = state.blocked
                return injected_response(status, html=html, retry_after=None)
            if api:
                if state._rate_limited():
                    limited = injected_response(429, html=False, retry_after=1)
                    if state.retry_after_header:
                        limited.headers["Retry-After"] = "1"
                    return limited
                f = state.faults
                if f.fail_count > 0:
                    f.fail_count -= 1
                    failed = injected_response(
                        f.fail_status, html=f.fail_html, retry_after=f.retry_after
                    )
                    if f.fail_status == 429 and state.retry_after_header:
                        failed.headers["Retry-After"] = str(f.retry_after or 1)
                    return failed
                if not state._authorized(request.headers.get("authorization")):
                    return problem(401, "Unauthorized", "Invalid user name or password")
        response: Response = await call_next(request)
        if api and request.method in ("POST", "PATCH") and response.status_code < 300:
            with state.lock:
                drop = state.faults.drop_count > 0
                if drop:
                    state.faults.drop_count -= 1
                seconds = state.faults.drop_seconds
            if drop:
                # Committed, but the answer comes after the client has given up.
                await asyncio.sleep(seconds)
        return response

    # --- OAuth ------------------------------------------------------------------------

    @app.post("/oauth2/access_token")
    async def access_token(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            return _oauth_error(400, "Request body is not JSON")
        with state.lock:
            if (
                body.get("client_id") != state.client_id
                or body.get("client_secret") != state.client_secret
            ):
                return _oauth_error(401, "Client authentication failed")
            if body.get("redirect_uri") != state.redirect_uri:
                return _oauth_error(400, "Redirect URI does not match")
            if body.get("grant_type") != "refresh_token":
                return _oauth_error(400, "The authorization grant type is not supported")
            token = body.get("refresh_token")
            if token in state.spent_refresh_tokens:
                return _oauth_error(state.revoked_refresh_status, "Token has been revoked")
            if token not in state.refresh_tokens:
                return _oauth_error(
                    state.revoked_refresh_status, "Cannot decrypt the refresh token"
                )
            state.refresh_tokens.discard(token)
            state.spent_refresh_tokens.add(token)
            state.refreshes += 1
            access, refresh = state._issue_pair()
        return JSONResponse(
            {
                "token_type": "Bearer",
                "expires_in": int(state.access_token_ttl),
                "access_token": access,
                "refresh_token": refresh,
            }
        )

    # --- account ----------------------------------------------------------------------

    @app.get("/api/v4/account")
    async def account(request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {
                "id": ACCOUNT_ID,
                "name": state.subdomain,
                "subdomain": state.subdomain,
                "current_user_id": USER_ID,
                "country": "RU",
                "customers_mode": "disabled",
                "is_unsorted_on": True,
                "is_loss_reason_enabled": True,
                "is_helpbot_enabled": False,
                "is_technical_account": False,
                "contact_name_display_order": 1,
                "_links": _link(base, "/api/v4/account"),
                "_embedded": [],
            },
            media_type=_HAL,
        )

    @app.get("/api/v4/users/{user_id}")
    async def user(user_id: int, request: Request) -> Response:
        with state.lock:
            found = state.users.get(user_id)
            if found is None:
                return Response(status_code=204)
            body = dict(found)
        body["_links"] = _link(str(request.base_url).rstrip("/"), f"/api/v4/users/{user_id}")
        return JSONResponse(body, media_type=_HAL)

    @app.get("/api/v4/leads/pipelines")
    async def pipelines(request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        with state.lock:
            items = []
            for p in state.pipelines.values():
                statuses = [
                    {**s, "pipeline_id": p["id"], "account_id": ACCOUNT_ID} for s in p["statuses"]
                ]
                rest = {k: v for k, v in p.items() if k != "statuses"}
                items.append(
                    {**rest, "account_id": ACCOUNT_ID, "_embedded": {"statuses": statuses}}
                )
        body = {
            "_total_items": len(items),
            "_links": _link(base, "/api/v4/leads/pipelines"),
            "_embedded": {"pipelines": items},
        }
        return JSONResponse(body, media_type=_HAL)

    @app.get("/api/v4/{entity}/custom_fields/{field_id}")
    async def custom_field(entity: str, field_id: int, request: Request) -> Response:
        with state.lock:
            found = state.custom_fields.get(entity, {}).get(field_id)
        if found is None:
            return Response(status_code=204)
        base = str(request.base_url).rstrip("/")
        path = f"/api/v4/{entity}/custom_fields/{field_id}"
        return JSONResponse({**found, "_links": _link(base, path)}, media_type=_HAL)

    # --- contacts ---------------------------------------------------------------------

    @app.get("/api/v4/contacts")
    async def list_contacts(request: Request) -> Response:
        query = request.query_params.get("query", "")
        ids = _ids_filter(request)
        base = str(request.base_url).rstrip("/")
        with state.lock:
            items = [
                _render_contact(state, c, base, _with(request))
                for cid, c in sorted(state.contacts.items())
                if (ids is None or cid in ids) and _matches(state, c, query)
            ]
        return _page(request, "contacts", items)

    @app.get("/api/v4/contacts/{contact_id}")
    async def get_contact(contact_id: int, request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        with state.lock:
            c = state.contacts.get(contact_id)
            if c is None:
                return Response(status_code=204)
            body = _render_contact(state, c, base, _with(request))
        return JSONResponse(body, media_type=_HAL)

    def _contact_errors(item: dict[str, Any]) -> tuple[list[dict[str, Any]], list[FieldError]]:
        errors: list[FieldError] = []
        _check_name(item, errors)
        _check_user(state, item, errors)
        fields, field_errors = _check_custom_fields(
            state, "contacts", item.get("custom_fields_values"), "custom_fields_values"
        )
        return fields, errors + field_errors

    @app.post("/api/v4/contacts")
    async def add_contacts(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, list) or not body:
            return _empty_request()
        base = str(request.base_url).rstrip("/")
        with state.lock:
            problems: list[tuple[str, FieldError]] = []
            prepared = []
            for i, item in enumerate(body):
                if not isinstance(item, dict):
                    problems.append((str(i), FieldError("", "InvalidType", "Not an object.")))
                    continue
                fields, errors = _contact_errors(item)
                problems += [(_rid(item, i), e) for e in errors]
                prepared.append((item, fields))
            if problems:
                return validation_errors(problems)
            created = []
            for i, (item, fields) in enumerate(prepared):
                cid = state._create_contact({**item, "custom_fields_values": fields or None})
                created.append(
                    {
                        "id": cid,
                        "request_id": _rid(item, i),
                        "_links": _link(base, f"/api/v4/contacts/{cid}"),
                    }
                )
        return JSONResponse(
            {"_links": _link(base, "/api/v4/contacts"), "_embedded": {"contacts": created}},
            media_type=_HAL,
        )

    async def _update_contacts(request: Request, items: list[Any]) -> Response:
        base = str(request.base_url).rstrip("/")
        with state.lock:
            _count_bulk(state, request, len(items))
            problems: list[tuple[str, FieldError]] = []
            prepared = []
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    problems.append((str(i), FieldError("", "InvalidType", "Not an object.")))
                    continue
                current = state.contacts.get(item.get("id"))  # type: ignore[arg-type]
                if current is None:
                    problems.append(
                        (_rid(item, i), FieldError("id", "NotFound", "Entity not found"))
                    )
                    continue
                fields, errors = _contact_errors(item)
                problems += [(_rid(item, i), e) for e in errors]
                prepared.append((item, current, fields))
            if problems:
                return validation_errors(problems)
            updated = []
            now = int(state.clock())
            for item, current, fields in prepared:
                for key in ("name", "first_name", "last_name", "responsible_user_id"):
                    if key in item:
                        current[key] = item[key]
                if "custom_fields_values" in item:
                    current["custom_fields_values"] = _merge_fields(
                        current["custom_fields_values"], fields
                    )
                current["updated_at"] = now
                updated.append(
                    {
                        "id": current["id"],
                        "name": current["name"],
                        "updated_at": now,
                        "_links": _link(base, f"/api/v4/contacts/{current['id']}"),
                    }
                )
        return JSONResponse(
            {"_links": _link(base, "/api/v4/contacts"), "_embedded": {"contacts": updated}},
            media_type=_HAL,
        )

    @app.patch("/api/v4/contacts")
    async def patch_contacts(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, list) or not body:
            return _empty_request()
        return await _update_contacts(request, body)

    @app.patch("/api/v4/contacts/{contact_id}")
    async def patch_contact(contact_id: int, request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            return _empty_request()
        return await _update_contacts(request, [{**body, "id": contact_id}])

    # --- leads ------------------------------------------------------------------------

    @app.get("/api/v4/leads")
    async def list_leads(request: Request) -> Response:
        query = request.query_params.get("query", "")
        ids = _ids_filter(request)
        base = str(request.base_url).rstrip("/")
        with state.lock:
            items = [
                _render_lead(state, lead, base, _with(request))
                for lead_id, lead in sorted(state.leads.items())
                if (ids is None or lead_id in ids) and _matches(state, lead, query)
            ]
        return _page(request, "leads", items)

    @app.get("/api/v4/leads/{lead_id}")
    async def get_lead(lead_id: int, request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        with state.lock:
            lead = state.leads.get(lead_id)
            if lead is None:
                return Response(status_code=204)
            body = _render_lead(state, lead, base, _with(request))
        return JSONResponse(body, media_type=_HAL)

    def _lead_errors(
        item: dict[str, Any], current: dict[str, Any] | None
    ) -> tuple[list[dict[str, Any]], tuple[int, int], list[int], list[FieldError]]:
        errors: list[FieldError] = []
        _check_name(item, errors)
        _check_user(state, item, errors)
        stage = _check_stage(state, item, current, errors)
        fields, field_errors = _check_custom_fields(
            state, "leads", item.get("custom_fields_values"), "custom_fields_values"
        )
        contacts: list[int] = []
        embedded = item.get("_embedded")
        if isinstance(embedded, dict) and current is None:
            for j, c in enumerate(embedded.get("contacts") or []):
                cid = c.get("id") if isinstance(c, dict) else None
                if cid is not None:
                    if cid not in state.contacts:
                        errors.append(
                            FieldError(f"_embedded.contacts.{j}.id", "NotFound", "Entity not found")
                        )
                    else:
                        contacts.append(cid)
        return fields, stage, contacts, errors + field_errors

    def _create_lead(
        item: dict[str, Any],
        fields: list[dict[str, Any]],
        stage: tuple[int, int],
        contacts: list[int],
    ) -> int:
        now = int(state.clock())
        lead_id = state._new_id()
        embedded = item.get("_embedded") if isinstance(item.get("_embedded"), dict) else {}
        tags = _tag_ids(state, (embedded or {}).get("tags")) + _tag_ids(
            state, item.get("tags_to_add")
        )
        state.leads[lead_id] = {
            "id": lead_id,
            "name": item.get("name") or f"Lead #{lead_id}",
            "price": item.get("price") or 0,
            "responsible_user_id": item.get("responsible_user_id") or USER_ID,
            "group_id": 0,
            "status_id": stage[1],
            "pipeline_id": stage[0],
            "loss_reason_id": None,
            "created_by": item.get("created_by", USER_ID),
            "updated_by": USER_ID,
            "created_at": now,
            "updated_at": now,
            "closed_at": now if stage[1] in (142, 143) else None,
            "closest_task_at": None,
            "is_deleted": False,
            "custom_fields_values": fields or None,
            "score": None,
            "account_id": ACCOUNT_ID,
            "labor_cost": None,
            "tags": list(dict.fromkeys(tags)),
            "contact_ids": contacts,
        }
        return lead_id

    @app.post("/api/v4/leads")
    async def add_leads(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, list) or not body:
            return _empty_request()
        base = str(request.base_url).rstrip("/")
        with state.lock:
            problems: list[tuple[str, FieldError]] = []
            prepared = []
            for i, item in enumerate(body):
                if not isinstance(item, dict):
                    problems.append((str(i), FieldError("", "InvalidType", "Not an object.")))
                    continue
                fields, stage, contacts, errors = _lead_errors(item, None)
                problems += [(_rid(item, i), e) for e in errors]
                prepared.append((i, item, fields, stage, contacts))
            if problems:
                return validation_errors(problems)
            created = []
            for i, item, fields, stage, contacts in prepared:
                lead_id = _create_lead(item, fields, stage, contacts)
                created.append(
                    {
                        "id": lead_id,
                        "request_id": _rid(item, i),
                        "_links": _link(base, f"/api/v4/leads/{lead_id}"),
                    }
                )
        return JSONResponse(
            {"_links": _link(base, "/api/v4/leads"), "_embedded": {"leads": created}},
            media_type=_HAL,
        )

    @app.post("/api/v4/leads/complex")
    async def add_complex(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, list) or not body:
            return _empty_request()
        if len(body) > 50:
            return problem(422, "Unprocessable Entity", "Limit 50 leads per request")
        with state.lock:
            _count_bulk(state, request, len(body))
            problems: list[tuple[str, FieldError]] = []
            prepared = []
            for i, item in enumerate(body):
                if not isinstance(item, dict):
                    problems.append((str(i), FieldError("", "InvalidType", "Not an object.")))
                    continue
                rid = _rid(item, i)
                embedded = item.get("_embedded") if isinstance(item.get("_embedded"), dict) else {}
                raw_contacts = (embedded or {}).get("contacts") or []
                if len(raw_contacts) > 1:
                    problems.append(
                        (rid, FieldError("_embedded.contacts", "Count", "Only 1 contact"))
                    )
                    continue
                new_contact: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
                existing: list[int] = []
                if raw_contacts:
                    c = raw_contacts[0]
                    if isinstance(c, dict) and set(c) <= {"id", "is_main"} and "id" in c:
                        if c["id"] not in state.contacts:
                            problems.append(
                                (
                                    rid,
                                    FieldError(
                                        "_embedded.contacts.0.id", "NotFound", "Entity not found"
                                    ),
                                )
                            )
                            continue
                        existing = [c["id"]]
                    elif isinstance(c, dict):
                        fields, errors = _contact_errors(c)
                        problems += [
                            (rid, FieldError(f"_embedded.contacts.0.{e.path}", e.code, e.detail))
                            for e in errors
                        ]
                        new_contact = (c, fields)
                lead_item = {
                    **item,
                    "_embedded": {k: v for k, v in (embedded or {}).items() if k != "contacts"},
                }
                fields, stage, _, errors = _lead_errors(lead_item, None)
                problems += [(rid, e) for e in errors]
                prepared.append((rid, lead_item, fields, stage, existing, new_contact))
            if problems:
                return validation_errors(problems)
            rows = []
            for rid, lead_item, fields, stage, existing, new_contact in prepared:
                contact_ids = list(existing)
                if new_contact is not None:
                    c, cfields = new_contact
                    contact_ids.append(
                        state._create_contact({**c, "custom_fields_values": cfields or None})
                    )
                lead_id = _create_lead(lead_item, fields, stage, contact_ids)
                rows.append(
                    {
                        "id": lead_id,
                        "contact_id": contact_ids[0] if contact_ids else None,
                        "company_id": None,
                        "request_id": [rid],
                        "merged": False,
                    }
                )
        # A plain array, not a HAL envelope (as amoCRM answers this method).
        return JSONResponse(rows, media_type=_HAL)

    async def _update_leads(request: Request, items: list[Any]) -> Response:
        base = str(request.base_url).rstrip("/")
        with state.lock:
            _count_bulk(state, request, len(items))
            problems: list[tuple[str, FieldError]] = []
            prepared = []
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    problems.append((str(i), FieldError("", "InvalidType", "Not an object.")))
                    continue
                current = state.leads.get(item.get("id"))  # type: ignore[arg-type]
                if current is None:
                    problems.append(
                        (_rid(item, i), FieldError("id", "NotFound", "Entity not found"))
                    )
                    continue
                fields, stage, _, errors = _lead_errors(item, current)
                problems += [(_rid(item, i), e) for e in errors]
                prepared.append((item, current, fields, stage))
            if problems:
                return validation_errors(problems)
            updated = []
            now = int(state.clock())
            for item, current, fields, stage in prepared:
                for key in ("name", "price", "responsible_user_id"):
                    if key in item:
                        current[key] = item[key]
                current["pipeline_id"], current["status_id"] = stage
                if stage[1] in (142, 143) and current["closed_at"] is None:
                    current["closed_at"] = now
                if "custom_fields_values" in item:
                    current["custom_fields_values"] = _merge_fields(
                        current["custom_fields_values"], fields
                    )
                embedded = item.get("_embedded")
                if isinstance(embedded, dict) and "tags" in embedded:
                    current["tags"] = _tag_ids(state, embedded["tags"])
                current["tags"] = list(
                    dict.fromkeys(current["tags"] + _tag_ids(state, item.get("tags_to_add")))
                )
                dropped = set(_tag_ids(state, item.get("tags_to_delete")))
                current["tags"] = [t for t in current["tags"] if t not in dropped]
                current["updated_at"] = now
                updated.append(
                    {
                        "id": current["id"],
                        "updated_at": now,
                        "_links": _link(base, f"/api/v4/leads/{current['id']}"),
                    }
                )
        return JSONResponse(
            {"_links": _link(base, "/api/v4/leads"), "_embedded": {"leads": updated}},
            media_type=_HAL,
        )

    @app.patch("/api/v4/leads")
    async def patch_leads(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, list) or not body:
            return _empty_request()
        return await _update_leads(request, body)

    @app.patch("/api/v4/leads/{lead_id}")
    async def patch_lead(lead_id: int, request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            return _empty_request()
        return await _update_leads(request, [{**body, "id": lead_id}])

    # --- the UI's record pages (what the connector's record_url points at) ------------

    @app.get("/leads/detail/{lead_id}")
    async def lead_page(lead_id: int, request: Request) -> Response:
        return await get_lead(lead_id, request)

    @app.get("/contacts/detail/{contact_id}")
    async def contact_page(contact_id: int, request: Request) -> Response:
        return await get_contact(contact_id, request)

    # --- notes ------------------------------------------------------------------------

    def _parent(entity: str, entity_id: int) -> dict[str, Any] | None:
        table = {"leads": state.leads, "contacts": state.contacts}.get(entity)
        return None if table is None else table.get(entity_id)

    @app.get("/api/v4/{entity}/{entity_id}/notes")
    async def list_notes(entity: str, entity_id: int, request: Request) -> Response:
        if entity not in ("leads", "contacts"):
            return problem(404, "Not Found", f"Cannot GET {request.url.path}")
        kinds = set(
            request.query_params.getlist("filter[note_type]")
            + request.query_params.getlist("filter[note_type][]")
        )
        descending = request.query_params.get("order[id]") == "desc"
        base = str(request.base_url).rstrip("/")
        with state.lock:
            if _parent(entity, entity_id) is None:
                return Response(status_code=204)
            items = [
                _render_note(n, base)
                for _, n in sorted(state.notes.items(), reverse=descending)
                if n["entity_type"] == entity
                and n["entity_id"] == entity_id
                and (not kinds or n["note_type"] in kinds)
            ]
        return _page(request, "notes", items)

    @app.post("/api/v4/{entity}/notes")
    async def add_notes_bulk(entity: str, request: Request) -> Response:
        """Notes for several records in one request: each note names its own ``entity_id``."""
        if entity not in ("leads", "contacts"):
            return problem(404, "Not Found", f"Cannot POST {request.url.path}")
        body = await _json_body(request)
        if not isinstance(body, list) or not body:
            return _empty_request()
        items = [item if isinstance(item, dict) else {} for item in body]
        return _add_notes(request, entity, [(item.get("entity_id"), item) for item in items])

    @app.post("/api/v4/{entity}/{entity_id}/notes")
    async def add_notes(entity: str, entity_id: int, request: Request) -> Response:
        if entity not in ("leads", "contacts"):
            return problem(404, "Not Found", f"Cannot POST {request.url.path}")
        body = await _json_body(request)
        if not isinstance(body, list) or not body:
            return _empty_request()
        items = [item if isinstance(item, dict) else {} for item in body]
        return _add_notes(request, entity, [(entity_id, item) for item in items], entity_id)

    def _add_notes(
        request: Request,
        entity: str,
        notes: list[tuple[Any, dict[str, Any]]],
        path_id: int | None = None,
    ) -> Response:
        """Validate every note, then write all or none (as amoCRM does)."""
        base = str(request.base_url).rstrip("/")
        with state.lock:
            _count_bulk(state, request, len(notes))
            problems: list[tuple[str, FieldError]] = []
            if path_id is not None and _parent(entity, path_id) is None:
                problems.append(("0", FieldError("entity_id", "NotFound", "Entity not found")))
            for i, (entity_id, item) in enumerate(notes):
                rid = _rid(item, i)
                if path_id is None and (
                    not isinstance(entity_id, int) or _parent(entity, entity_id) is None
                ):
                    problems.append((rid, FieldError("entity_id", "NotFound", "Entity not found")))
                if item.get("note_type") not in _NOTE_TYPES:
                    problems.append((rid, FieldError("note_type")))
                params = item.get("params")
                if item.get("note_type") == "common" and not (
                    isinstance(params, dict)
                    and isinstance(params.get("text"), str)
                    and params["text"]
                ):
                    problems.append(
                        (
                            rid,
                            FieldError(
                                "params.text", "NotBlank", "This value should not be blank."
                            ),
                        )
                    )
            if problems:
                return validation_errors(problems)
            created = []
            now = int(state.clock())
            for i, (entity_id, item) in enumerate(notes):
                note_id = state._new_id()
                state.notes[note_id] = {
                    "id": note_id,
                    "entity_id": entity_id,
                    "entity_type": entity,
                    "created_by": USER_ID,
                    "updated_by": USER_ID,
                    "created_at": now,
                    "updated_at": now,
                    "responsible_user_id": USER_ID,
                    "group_id": 0,
                    "note_type": item["note_type"],
                    "params": dict(item.get("params") or {}),
                    "account_id": ACCOUNT_ID,
                }
                created.append(
                    {
                        "id": note_id,
                        "entity_id": entity_id,
                        "request_id": _rid(item, i),
                        "_links": _link(base, f"/api/v4/{entity}/{entity_id}/notes/{note_id}"),
                    }
                )
        return JSONResponse(
            {"_links": _link(base, f"/api/v4/{entity}/notes"), "_embedded": {"notes": created}},
            media_type=_HAL,
        )

    return app, state


def _oauth_error(status: int, hint: str) -> JSONResponse:
    """The OAuth server's problem body (amoCRM writes its title and detail in Russian)."""
    return JSONResponse(
        {
            "hint": hint,
            "title": "Bad request",
            "type": "https://developers.amocrm.ru/v3/errors/OAuthProblemJson",
            "status": status,
            "detail": "Some request parameters are missing or invalid",
        },
        status_code=status,
        media_type=_PROBLEM,
    )
