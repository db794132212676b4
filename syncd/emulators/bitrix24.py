"""A stand-in for one Bitrix24 portal: the CRM REST methods syncd uses, over real HTTP.

It answers like the real portal where syncd depends on it: the
``{"result", "time"}`` envelope (``total``/``next`` on lists), integer ids from
``*.add`` and string ids in records, errors as ``{"error",
"error_description"}`` with Bitrix24's HTTP codes, PHP-style parameters,
``batch`` with ``$result[...]`` references, ``halt`` and ``result_error``, a
per-portal leaky bucket answering 503 ``QUERY_LIMIT_EXCEEDED``, incoming
webhooks (``/rest/<user>/<code>/<method>``) and OAuth (``/rest/<method>`` with
``auth``, plus a token endpoint that rotates the refresh token).

Tests steer it through :class:`Bitrix24State`: ``fail_next``,
``drop_after_commit`` (commit, then answer too late), ``latency``,
``expire_tokens``; and read it back: ``contacts``, ``deals`` and ``comments``
are plain dicts shaped like Bitrix24's own records.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from syncd.ticket import normalize_phone

PAGE = 50
BATCH_MAX = 50
#: Stages of the default funnel (CATEGORY_ID 0) and of the extra funnel 2.
DEFAULT_CATEGORIES: dict[int, list[str]] = {
    0: ["NEW", "PREPARATION", "PREPAYMENT_INVOICE", "EXECUTING", "FINAL_INVOICE", "WON", "LOSE"],
    2: ["C2:NEW", "C2:PREPARATION", "C2:EXECUTING", "C2:FINAL_INVOICE", "C2:WON", "C2:LOSE"],
}
_MULTI = ("EMAIL", "PHONE", "WEB", "IM")
_CONTACT_FIELDS = (
    "NAME",
    "LAST_NAME",
    "SECOND_NAME",
    "ASSIGNED_BY_ID",
    "SOURCE_ID",
    "OPENED",
    "COMMENTS",
    "ORIGINATOR_ID",
    "ORIGIN_ID",
    "TYPE_ID",
)
_DEAL_FIELDS = (
    "TITLE",
    "TYPE_ID",
    "CATEGORY_ID",
    "STAGE_ID",
    "CONTACT_ID",
    "COMPANY_ID",
    "ASSIGNED_BY_ID",
    "OPPORTUNITY",
    "CURRENCY_ID",
    "COMMENTS",
    "SOURCE_ID",
    "SOURCE_DESCRIPTION",
    "OPENED",
    "CLOSED",
    "ORIGINATOR_ID",
    "ORIGIN_ID",
)
_REF = re.compile(r"\$(result(?:_error|_total|_next|_time)?)((?:\[[^\]\s]+\])+)")

#: The body each injected status gets, as Bitrix24 sends it.
FAULT_BODIES: dict[int, tuple[str, str]] = {
    400: ("ERROR_CORE", "The field `Work e-mail` contains an invalid address"),
    401: ("expired_token", "The access token provided has expired."),
    403: ("ACCESS_DENIED", "REST is available only on commercial plans."),
    404: ("ERROR_METHOD_NOT_FOUND", "Method not found!"),
    429: ("OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit."),
    500: ("INTERNAL_SERVER_ERROR", "Internal server error"),
    503: ("QUERY_LIMIT_EXCEEDED", "Too many requests"),
}


class _Fail(Exception):
    """A Bitrix24 error answer, raised by a method handler."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description


@dataclass
class Bitrix24Faults:
    fail_count: int = 0
    #: Every request fails until this time (the state's clock): an outage of a given length.
    fail_until: float = 0.0
    fail_status: int = 503
    fail_error: str | None = None
    fail_description: str | None = None
    #: How far in the future an injected OPERATION_TIME_LIMIT says the limit resets.
    operating_reset_seconds: float = 30.0
    drop_count: int = 0
    drop_seconds: float = 2.0
    #: Added to every API request before it is handled.
    latency: float = 0.0


@dataclass
class Bitrix24State:
    """Everything the portal holds, and the knobs a test turns. Guarded by ``lock``."""

    webhook_user: str = "1"
    webhook_code: str = field(default_factory=lambda: secrets.token_hex(8))
    client_id: str = "local.syncd0000000000.00000000"
    client_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    scopes: list[str] = field(default_factory=lambda: ["crm", "user"])
    token_lifetime: float = 3600.0
    rate_per_second: float = 2.0
    burst: int = 50
    categories: dict[int, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_CATEGORIES.items()}
    )
    contacts: dict[int, dict[str, Any]] = field(default_factory=dict)
    deals: dict[int, dict[str, Any]] = field(default_factory=dict)
    comments: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: Access token -> when it expires (wall clock); refresh tokens still usable.
    access_tokens: dict[str, float] = field(default_factory=dict)
    refresh_tokens: set[str] = field(default_factory=set)
    faults: Bitrix24Faults = field(default_factory=Bitrix24Faults)
    #: HTTP requests answered (token endpoint excluded), and calls per method (batch commands too).
    requests: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    refreshes: int = 0
    rate_limited: int = 0
    clock: Callable[[], float] = time.monotonic
    lock: threading.Lock = field(default_factory=threading.Lock)
    _level: float = 0.0
    _drained_at: float | None = None
    _next_id: int = 1
    _next_value_id: int = 1

    # --- knobs -------------------------------------------------------------------------

    def fail_next(
        self,
        count: int,
        status: int,
        *,
        error: str | None = None,
        description: str | None = None,
    ) -> None:
        """The next ``count`` API requests fail before running, with Bitrix24's body for it."""
        with self.lock:
            self.faults.fail_count = count
            self.faults.fail_status = status
            self.faults.fail_error = error
            self.faults.fail_description = description

    def down_for(self, seconds: float, status: int = 503) -> None:
        """Every API request fails with ``status`` for the next ``seconds``: an outage."""
        with self.lock:
            self.faults.fail_until = self.clock() + seconds
            self.faults.fail_status = status
            self.faults.fail_error = None
            self.faults.fail_description = None

    def drop_after_commit(self, count: int, seconds: float = 2.0) -> None:
        """The next ``count`` requests that write are committed, then answered after ``seconds``."""
        with self.lock:
            self.faults.drop_count = count
            self.faults.drop_seconds = seconds

    @property
    def latency(self) -> float:
        return self.faults.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self.faults.latency = seconds

    def set_limits(self, rate_per_second: float, burst: int) -> None:
        with self.lock:
            self.rate_per_second, self.burst = rate_per_second, burst

    def issue_tokens(self) -> tuple[str, str]:
        """A fresh (access, refresh) pair, as an app install would hand out."""
        with self.lock:
            return self._issue()

    def expire_tokens(self) -> None:
        """Every access token handed out so far expires now."""
        with self.lock:
            for token in self.access_tokens:
                self.access_tokens[token] = 0.0

    def revoke_refresh_tokens(self) -> None:
        """Refresh tokens stop working (app reinstalled, or unused for 180 days)."""
        with self.lock:
            self.refresh_tokens.clear()

    def webhook_path(self) -> str:
        """``/rest/<user>/<code>/``: append it to the server URL for a webhook_url."""
        return f"/rest/{self.webhook_user}/{self.webhook_code}/"

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "contacts": len(self.contacts),
                "deals": len(self.deals),
                "comments": len(self.comments),
                "requests": self.requests,
                "rate_limited": self.rate_limited,
                "refreshes": self.refreshes,
                "calls": dict(self.calls),
                "deals_per_origin": self.deals_per_origin(),
            }

    def deals_per_origin(self) -> dict[str, int]:
        """How many deals carry each ORIGIN_ID: any value above 1 is a duplicate."""
        return dict(Counter(str(d.get("ORIGIN_ID")) for d in self.deals.values()))

    # --- internals (lock held) -------------------------------------------------------------

    def _issue(self) -> tuple[str, str]:
        access, refresh = secrets.token_hex(16), secrets.token_hex(16)
        self.access_tokens[access] = time.time() + self.token_lifetime
        self.refresh_tokens.add(refresh)
        return access, refresh

    def _new_id(self) -> int:
        # One sequence for contacts, deals and comments (the portal keeps one per entity):
        # an id passed as the wrong kind of record then fails instead of hitting another one.
        value = self._next_id
        self._next_id += 1
        return value

    def _take_bucket(self) -> bool:
        """Leaky bucket: False when this request overflows it (and is refused)."""
        now = self.clock()
        if self._drained_at is not None:
            self._level = max(0.0, self._level - (now - self._drained_at) * self.rate_per_second)
        self._drained_at = now
        if self._level + 1 > self.burst:
            self.rate_limited += 1
            return False
        self._level += 1
        return True


def _time(started: float, operating_reset_at: float | None = None) -> dict[str, Any]:
    finish = time.time()
    reset = operating_reset_at if operating_reset_at is not None else started + 600
    return {
        "start": started,
        "finish": finish,
        "duration": finish - started,
        "processing": finish - started,
        "date_start": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "date_finish": datetime.fromtimestamp(finish, UTC).isoformat(timespec="seconds"),
        "operating_reset_at": int(reset),
        "operating": 0,
    }


def _error(status: int, code: str, description: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": description, **extra}, status)


# --- parameters ------------------------------------------------------------------------------


def parse_php_query(query: str) -> dict[str, Any]:
    """``a[b][0]=x&a[b][1]=y`` -> ``{"a": {"b": ["x", "y"]}}``, as PHP's ``parse_str`` reads it."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        head, _, rest = key.partition("[")
        parts = [head] + (re.findall(r"\[([^\]]*)\]", "[" + rest) if rest else [])
        node = root
        for index, part in enumerate(parts):
            if part == "":
                part = str(len(node))
            if index == len(parts) - 1:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
    listed = _listify(root)
    assert isinstance(listed, dict)
    return listed


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        items = {k: _listify(v) for k, v in value.items()}
        if items and list(items) == [str(i) for i in range(len(items))]:
            return list(items.values())
        return items
    return value


def _php_map(values: Mapping[str, Any]) -> Any:
    """PHP's JSON for an array: ``[]`` when empty, a list when its keys are 0..n-1."""
    if not values:
        return []
    if list(values) == [str(i) for i in range(len(values))]:
        return list(values.values())
    return dict(values)


def _param(params: Mapping[str, Any], name: str, *, exact: bool = False) -> Any:
    """CRM methods take ``fields``, ``FIELDS``, ``Fields``...; some newer ones one spelling only."""
    if name in params or exact:
        return params.get(name)
    for key, value in params.items():
        if key.lower() == name.lower():
            return value
    return None


def _substitute(value: Any, done: Mapping[str, Any]) -> Any:
    """``$result[name][field]`` in a batch command, replaced as Bitrix24 does it."""
    if isinstance(value, dict):
        return {k: _substitute(v, done) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, done) for v in value]
    if not isinstance(value, str):
        return value
    out: Any = value
    for match in _REF.finditer(value):
        target: Any = done.get(match.group(1))
        for step in re.findall(r"\[([^\]]+)\]", match.group(2)):
            if isinstance(target, dict) and step in target:
                target = target[step]
            elif isinstance(target, list) and step.isdigit() and int(step) < len(target):
                target = target[int(step)]
            else:
                break
        if match.group(0) == value:
            return target
        if isinstance(out, str) and isinstance(target, str):
            out = out.replace(match.group(0), target)
    return out


# --- records -----------------------------------------------------------------------------------


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _digits(value: str) -> str:
    return "".join(c for c in value if c.isdigit())


def _phone_key(value: str) -> str:
    return normalize_phone(value, "RU") or _digits(value)


class _Portal:
    """The CRM methods, run with the state's lock held."""

    def __init__(self, state: Bitrix24State, user: str) -> None:
        self.state = state
        self.user = user

    def call(self, method: str, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        """(result, extra envelope keys, wrote anything)."""
        self.state.calls[method] += 1
        if method.startswith("crm.") and "crm" not in self.state.scopes:
            raise _Fail(
                401,
                "insufficient_scope",
                "The request requires higher privileges than provided by the webhook token",
            )
        handler = _METHODS.get(method)
        if handler is None:
            raise _Fail(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        return handler(self, params)

    # --- generic ------------------------------------------------------------------------

    def profile(self, _params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        return (
            {"ID": self.user, "ADMIN": True, "NAME": "Portal", "LAST_NAME": "Admin"},
            {},
            False,
        )

    def scope(self, _params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        return list(self.state.scopes), {}, False

    @staticmethod
    def _fields_of(names: tuple[str, ...]) -> dict[str, Any]:
        described = {"ID": {"type": "integer", "isReadOnly": True, "title": "ID"}}
        for name in names:
            described[name] = {"type": "string", "isReadOnly": False, "title": name}
        for name in ("EMAIL", "PHONE"):
            described[name] = {"type": "crm_multifield", "isMultiple": True, "title": name}
        return described

    def contact_fields(self, _params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        return self._fields_of(_CONTACT_FIELDS), {}, False

    def deal_fields(self, _params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        return self._fields_of(_DEAL_FIELDS), {}, False

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _fields_param(params: Mapping[str, Any]) -> dict[str, Any]:
        fields = _param(params, "fields")
        if fields is None:
            fields = _param(params, "arFields")
        if not isinstance(fields, dict):
            raise _Fail(400, "", "Parameter 'fields' must be array.")
        return fields

    @staticmethod
    def _id_param(params: Mapping[str, Any]) -> int:
        raw = _param(params, "id")
        if raw is None or not str(raw).isdigit() or int(raw) <= 0:
            raise _Fail(400, "", "ID is not defined or invalid.")
        return int(raw)

    def _multi(self, record: dict[str, Any], name: str, items: Any) -> None:
        """Bitrix24's multi-field rules: new values append, ``ID`` edits, ``DELETE`` removes."""
        if isinstance(items, dict):
            items = list(items.values())
        if not isinstance(items, list):
            return
        current: list[dict[str, Any]] = record.setdefault(name, [])
        for item in items:
            if not isinstance(item, dict):
                continue
            value = str(item.get("VALUE") or "")
            existing = next((v for v in current if str(v["ID"]) == str(item.get("ID"))), None)
            if existing is not None:
                if item.get("DELETE") == "Y" or value == "":
                    current.remove(existing)
                else:
                    existing["VALUE"] = value
                    existing["VALUE_TYPE"] = str(item.get("VALUE_TYPE") or existing["VALUE_TYPE"])
                continue
            if not value:
                continue
            if name == "EMAIL" and ("@" not in value or " " in value.strip()):
                raise _Fail(
                    400, "ERROR_CORE", "The field `Work e-mail` contains an invalid address"
                )
            current.append(
                {
                    "ID": str(self.state._next_value_id),
                    "VALUE_TYPE": str(item.get("VALUE_TYPE") or "WORK"),
                    "VALUE": value,
                    "TYPE_ID": name,
                }
            )
            self.state._next_value_id += 1

    @staticmethod
    def _scalar(value: Any) -> Any:
        if isinstance(value, bool):
            return "Y" if value else "N"
        if isinstance(value, int | float):
            return str(value)
        return value

    def _apply(
        self, record: dict[str, Any], fields: Mapping[str, Any], known: tuple[str, ...]
    ) -> None:
        for key, value in fields.items():
            upper = str(key).upper()
            if upper in _MULTI:
                self._multi(record, upper, value)
            elif upper in known or upper.startswith("UF_CRM_"):
                record[upper] = self._scalar(value)
            # Unknown keys are silently ignored, as the real portal does.

    # --- contacts ---------------------------------------------------------------------------

    def contact_add(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        fields = self._fields_param(params)
        new_id = self.state._new_id()
        record: dict[str, Any] = {
            "ID": str(new_id),
            "NAME": None,
            "LAST_NAME": None,
            "ASSIGNED_BY_ID": self.user,
            "ORIGINATOR_ID": None,
            "ORIGIN_ID": None,
            "DATE_CREATE": _now_iso(),
            "EMAIL": [],
            "PHONE": [],
        }
        self._apply(record, fields, _CONTACT_FIELDS)
        self.state.contacts[new_id] = record
        return new_id, {}, True

    def contact_update(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        record_id = self._id_param(params)
        fields = self._fields_param(params)
        record = self.state.contacts.get(record_id)
        if record is None:
            raise _Fail(400, "", "Contact is not found")
        self._apply(record, fields, _CONTACT_FIELDS)
        return True, {}, True

    def contact_get(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        record = self.state.contacts.get(self._id_param(params))
        if record is None:
            raise _Fail(400, "", "Not found")
        return _copy(record), {}, False

    def contact_list(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        return self._list(self.state.contacts, params)

    # --- deals ------------------------------------------------------------------------------

    def deal_add(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        fields = self._fields_param(params)
        new_id = self.state._new_id()
        record: dict[str, Any] = {
            "ID": str(new_id),
            "TITLE": None,
            "CATEGORY_ID": "0",
            "STAGE_ID": None,
            "CONTACT_ID": None,
            "CONTACT_IDS": [],
            "ASSIGNED_BY_ID": self.user,
            "ORIGINATOR_ID": None,
            "ORIGIN_ID": None,
            "DATE_CREATE": _now_iso(),
        }
        self._apply(record, fields, _DEAL_FIELDS)
        self._contacts_of(record, fields)
        if not record["TITLE"]:
            record["TITLE"] = f"Deal #{new_id}"
        category = int(record["CATEGORY_ID"] or 0)
        if not record["STAGE_ID"]:
            stages = self.state.categories.get(category) or ["NEW"]
            record["STAGE_ID"] = stages[0]
        self.state.deals[new_id] = record
        return new_id, {}, True

    def _contacts_of(self, record: dict[str, Any], fields: Mapping[str, Any]) -> None:
        ids = _param(fields, "CONTACT_IDS")
        if isinstance(ids, list):
            record["CONTACT_IDS"] = [str(i) for i in ids if str(i).isdigit()]
        elif (
            record.get("CONTACT_ID")
            and str(record["CONTACT_ID"]).isdigit()
            and str(record["CONTACT_ID"]) not in record["CONTACT_IDS"]
        ):
            record["CONTACT_IDS"] = [str(record["CONTACT_ID"]), *record["CONTACT_IDS"]]
        record["CONTACT_ID"] = record["CONTACT_IDS"][0] if record["CONTACT_IDS"] else None

    def deal_update(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        record_id = self._id_param(params)
        fields = dict(self._fields_param(params))
        record = self.state.deals.get(record_id)
        if record is None:
            raise _Fail(400, "", "Not found")
        # The funnel of a deal cannot change through crm.deal.update.
        fields.pop("CATEGORY_ID", None)
        self._apply(record, fields, _DEAL_FIELDS)
        self._contacts_of(record, fields)
        return True, {}, True

    def deal_get(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        record = self.state.deals.get(self._id_param(params))
        if record is None:
            raise _Fail(400, "", "Not found")
        shown = _copy(record)
        shown.pop("CONTACT_IDS", None)
        return shown, {}, False

    def deal_list(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        return self._list(self.state.deals, params, hidden=("CONTACT_IDS",))

    # --- lists ------------------------------------------------------------------------------

    def _list(
        self,
        table: Mapping[int, dict[str, Any]],
        params: Mapping[str, Any],
        hidden: tuple[str, ...] = (),
    ) -> tuple[Any, dict[str, Any], bool]:
        flt = _param(params, "filter") or {}
        if not isinstance(flt, dict):
            raise _Fail(400, "", "Parameter 'filter' must be array.")
        rows = [r for r in table.values() if all(_matches(r, k, v) for k, v in flt.items())]
        order = _param(params, "order") or {"ID": "ASC"}
        if isinstance(order, dict):
            for key, direction in reversed(list(order.items())):
                rows.sort(key=_by(str(key).upper()), reverse=str(direction).upper() == "DESC")
        return _page(rows, params, lambda r: _select(r, _param(params, "select"), hidden))

    # --- duplicates -------------------------------------------------------------------------

    def findbycomm(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        kind = str(_param(params, "type") or "").upper()
        if not kind:
            raise _Fail(400, "", "Communication type is not defined.")
        if kind not in ("EMAIL", "PHONE"):
            raise _Fail(
                400, "", f"Communication type '{kind}' is not supported in current context."
            )
        values = _param(params, "values")
        if isinstance(values, str):
            values = [values]
        if not values:
            raise _Fail(400, "", "Communication values is not defined.")
        entity = str(_param(params, "entity_type") or "CONTACT").upper()
        if kind == "EMAIL":
            wanted = {str(v).strip().lower() for v in values}
        else:
            wanted = {_phone_key(str(v)) for v in values}
        found: list[int] = []
        if entity == "CONTACT":
            for contact_id, record in sorted(self.state.contacts.items()):
                for item in record.get(kind) or []:
                    value = str(item["VALUE"])
                    have = value.strip().lower() if kind == "EMAIL" else _phone_key(value)
                    if have in wanted:
                        found.append(contact_id)
                        break
        # Nothing found is an empty PHP array: JSON [] rather than {}.
        return ({"CONTACT": found} if found else []), {}, False

    # --- timeline ----------------------------------------------------------------------------

    def comment_add(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        # Since crm 23.100.0 this method reads only the lower-case "fields".
        fields = _param(params, "fields", exact=True)
        if not isinstance(fields, dict):
            raise _Fail(400, "100", "Required fields: fields")
        entity_type = str(fields.get("ENTITY_TYPE") or "").lower()
        entity_id = str(fields.get("ENTITY_ID") or "")
        comment = str(fields.get("COMMENT") or "")
        if not entity_type or not entity_id:
            raise _Fail(400, "100", "Required fields: ENTITY_ID, ENTITY_TYPE")
        if not comment.strip():
            raise _Fail(400, "INVALID_ARG_VALUE", "Comment text is empty")
        table = {"deal": self.state.deals, "contact": self.state.contacts}.get(entity_type)
        if table is None or not entity_id.isdigit() or int(entity_id) not in table:
            raise _Fail(400, "OWNER_NOT_FOUND", "Owner entity not found.")
        new_id = self.state._new_id()
        self.state.comments[new_id] = {
            "ID": str(new_id),
            "CREATED": _now_iso(),
            "ENTITY_ID": entity_id,
            "ENTITY_TYPE": entity_type,
            "AUTHOR_ID": self.user,
            "COMMENT": comment,
            "FILES": [],
        }
        return new_id, {}, True

    def comment_list(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        return self._list(self.state.comments, params)


_Handler = Callable[[_Portal, Mapping[str, Any]], tuple[Any, dict[str, Any], bool]]

_METHODS: dict[str, _Handler] = {
    "profile": _Portal.profile,
    "scope": _Portal.scope,
    "crm.contact.fields": _Portal.contact_fields,
    "crm.contact.add": _Portal.contact_add,
    "crm.contact.update": _Portal.contact_update,
    "crm.contact.get": _Portal.contact_get,
    "crm.contact.list": _Portal.contact_list,
    "crm.deal.fields": _Portal.deal_fields,
    "crm.deal.add": _Portal.deal_add,
    "crm.deal.update": _Portal.deal_update,
    "crm.deal.get": _Portal.deal_get,
    "crm.deal.list": _Portal.deal_list,
    "crm.duplicate.findbycomm": _Portal.findbycomm,
    "crm.timeline.comment.add": _Portal.comment_add,
    "crm.timeline.comment.list": _Portal.comment_list,
}


def _copy(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}


_FILTER_OPS = ("!@", ">=", "<=", "!=", "@", ">", "<", "=", "!", "%")


def _matches(record: Mapping[str, Any], key: str, wanted: Any) -> bool:
    op = next((p for p in _FILTER_OPS if key.startswith(p)), "")
    name = key[len(op) :].upper()
    have = record.get(name)
    if name in _MULTI:
        # Multi-fields filter by exact value only.
        values = {str(item["VALUE"]) for item in have or []}
        return str(wanted) in values
    options = [str(w) for w in wanted] if isinstance(wanted, list) else [str(wanted)]
    text = "" if have is None else str(have)
    if op in ("", "="):
        return text in options
    if op == "@":
        return text in options
    if op in ("!", "!=", "!@"):
        return text not in options
    if op == "%":
        return options[0].lower() in text.lower()
    try:
        left, right = float(text or 0), float(options[0])
    except ValueError:
        left, right = 0.0, 0.0
    return {">": left > right, ">=": left >= right, "<": left < right, "<=": left <= right}[op]


def _by(name: str) -> Callable[[Mapping[str, Any]], tuple[int, float, str]]:
    return lambda record: _sort_key(record.get(name))


def _sort_key(value: Any) -> tuple[int, float, str]:
    text = "" if value is None else str(value)
    return (0, float(text), "") if text.isdigit() else (1, 0.0, text)


def _select(record: Mapping[str, Any], select: Any, hidden: tuple[str, ...]) -> dict[str, Any]:
    """``*`` (the default) leaves out multi-fields: they come only when named."""
    names = [str(s).upper() for s in select] if isinstance(select, list) and select else ["*"]
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in hidden:
            continue
        if key in names or (("*" in names) and key not in _MULTI):
            out[key] = list(value) if isinstance(value, list) else value
    out["ID"] = record["ID"]
    return out


def _page(
    rows: list[dict[str, Any]],
    params: Mapping[str, Any],
    shape: Callable[[dict[str, Any]], dict[str, Any]],
) -> tuple[Any, dict[str, Any], bool]:
    raw_start = _param(params, "start")
    start = int(raw_start) if raw_start is not None and str(raw_start).lstrip("-").isdigit() else 0
    if start == -1:
        # start=-1: no counting, no "next".
        return [shape(r) for r in rows[:PAGE]], {}, False
    chunk = rows[start : start + PAGE]
    extra: dict[str, Any] = {"total": len(rows)}
    if start + PAGE < len(rows):
        extra["next"] = start + PAGE
    return [shape(r) for r in chunk], extra, False


# --- the app -----------------------------------------------------------------------------


def create_bitrix24_emulator(
    *,
    rate_per_second: float = 2.0,
    burst: int = 50,
    scopes: list[str] | None = None,
    webhook_user: str = "1",
    webhook_code: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
) -> tuple[FastAPI, Bitrix24State]:
    """A FastAPI app serving one portal, and its state. Serve it with ``ServerThread(app)``."""
    state = Bitrix24State(rate_per_second=rate_per_second, burst=burst, webhook_user=webhook_user)
    if scopes is not None:
        state.scopes = list(scopes)
    if webhook_code is not None:
        state.webhook_code = webhook_code
    if client_id is not None:
        state.client_id = client_id
    if client_secret is not None:
        state.client_secret = client_secret
    app = FastAPI(title="Bitrix24 emulator", docs_url=None, redoc_url=None)

    async def read_params(request: Request) -> dict[str, Any]:
        params = parse_php_query(request.url.query)
        body = await request.body()
        if body:
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            if kind == "application/json":
                try:
                    data = await request.json()
                except ValueError:
                    data = {}
                if isinstance(data, dict):
                    params.update(data)
            else:
                params.update(parse_php_query(body.decode("utf-8", "replace")))
        return params

    def injected(oauth: bool) -> JSONResponse | None:
        f = state.faults
        if f.fail_count > 0:
            f.fail_count -= 1
        elif state.clock() >= f.fail_until:
            return None
        code, description = FAULT_BODIES.get(
            f.fail_status, ("ERROR_UNEXPECTED_ANSWER", "Unexpected answer")
        )
        if f.fail_status == 401 and not oauth:
            code, description = "INVALID_CREDENTIALS", "Invalid request credentials"
        code = f.fail_error or code
        description = f.fail_description or description
        extra: dict[str, Any] = {}
        if code == "OPERATION_TIME_LIMIT":
            extra["time"] = _time(time.time(), time.time() + f.operating_reset_seconds)
        return _error(f.fail_status, code, description, **extra)

    def run_batch(portal: _Portal, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any], bool]:
        cmd = _param(params, "cmd")
        if isinstance(cmd, list):
            cmd = {str(i): c for i, c in enumerate(cmd)}
        if not isinstance(cmd, dict):
            raise _Fail(400, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Batch commands are not defined")
        if len(cmd) > BATCH_MAX:
            raise _Fail(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        halt = str(_param(params, "halt") or "0").lower() in ("1", "true", "y")
        done: dict[str, dict[str, Any]] = {
            "result": {},
            "result_error": {},
            "result_total": {},
            "result_next": {},
            "result_time": {},
        }
        wrote = False
        for name, line in cmd.items():
            started = time.time()
            method, _, query = str(line).partition("?")
            method = method.strip().lower()
            try:
                if method == "batch":
                    raise _Fail(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed")
                sub = _substitute(parse_php_query(query), done)
                result, extra, changed = portal.call(method, sub)
            except _Fail as fail:
                done["result_error"][name] = {
                    "error": fail.code,
                    "error_description": fail.description,
                }
                if halt:
                    break
                continue
            wrote = wrote or changed
            done["result"][name] = result
            if "total" in extra:
                done["result_total"][name] = extra["total"]
            if "next" in extra:
                done["result_next"][name] = extra["next"]
            done["result_time"][name] = _time(started)
        return {k: _php_map(v) for k, v in done.items()}, {}, wrote

    async def handle(request: Request, method: str, user: str | None, code: str | None) -> Response:
        started = time.time()
        if state.faults.latency:
            await asyncio.sleep(state.faults.latency)
        params = await read_params(request)
        method = method.removesuffix(".json").lower()
        oauth = user is None
        with state.lock:
            state.requests += 1
            fault = injected(oauth)
            if fault is not None:
                return fault
            if not state._take_bucket():
                return _error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            if oauth:
                token = _param(params, "auth", exact=True) or _param(
                    params, "access_token", exact=True
                )
                header = request.headers.get("authorization", "")
                if not token and header.lower().startswith("bearer "):
                    token = header[7:].strip()
                if not token:
                    return _error(401, "NO_AUTH_FOUND", "Wrong authorization data")
                expires = state.access_tokens.get(str(token))
                if expires is None:
                    return _error(401, "invalid_token", "Unable to get application by token")
                if expires <= time.time():
                    return _error(401, "expired_token", "The access token provided has expired.")
                who = "1"
            else:
                if (user, code) != (state.webhook_user, state.webhook_code):
                    return _error(401, "INVALID_CREDENTIALS", "Invalid request credentials")
                who = str(user)
            for key in ("auth", "access_token"):
                params.pop(key, None)
            portal = _Portal(state, who)
            try:
                if method == "batch":
                    state.calls["batch"] += 1
                    result, extra, wrote = run_batch(portal, params)
                else:
                    result, extra, wrote = portal.call(method, params)
            except _Fail as fail:
                return _error(fail.status, fail.code, fail.description)
            drop = wrote and state.faults.drop_count > 0
            if drop:
                state.faults.drop_count -= 1
            hold = state.faults.drop_seconds
        if drop:
            # Committed; the answer comes after the client has given up: outcome unknown.
            await asyncio.sleep(hold)
        return JSONResponse({"result": result, **extra, "time": _time(started)})

    @app.api_route("/rest/{user}/{code}/{method}", methods=["GET", "POST"])
    async def webhook(user: str, code: str, method: str, request: Request) -> Response:
        return await handle(request, method, user, code)

    @app.api_route("/rest/{method}", methods=["GET", "POST"])
    async def oauth(method: str, request: Request) -> Response:
        return await handle(request, method, None, None)

    @app.api_route("/oauth/token/", methods=["GET", "POST"])
    async def token(request: Request) -> Response:
        params = await read_params(request)
        with state.lock:
            if (params.get("client_id"), params.get("client_secret")) != (
                state.client_id,
                state.client_secret,
            ):
                return _error(401, "invalid_client", "Invalid client credentials")
            if params.get("grant_type") != "refresh_token":
                return _error(400, "invalid_request", "Unsupported grant_type")
            old = str(params.get("refresh_token") or "")
            if old not in state.refresh_tokens:
                return _error(400, "invalid_grant", "Invalid refresh token")
            # Rotation: the refresh token just used is spent.
            state.refresh_tokens.discard(old)
            access, refresh = state._issue()
            state.refreshes += 1
            lifetime = int(state.token_lifetime)
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {
                "access_token": access,
                "client_endpoint": f"{base}/rest/",
                "domain": "oauth.bitrix.info",
                "expires": int(time.time()) + lifetime,
                "expires_in": lifetime,
                "member_id": "emulated",
                "refresh_token": refresh,
                "scope": ",".join(state.scopes),
                "server_endpoint": f"{base}/rest/",
                "status": "L",
                "user_id": 1,
            }
        )

    @app.get("/crm/{entity}/details/{record_id}/")
    async def details(entity: str, record_id: int) -> Response:
        """What a record link from the monitor opens: the record as JSON."""
        with state.lock:
            table = {"deal": state.deals, "contact": state.contacts}.get(entity, {})
            record = table.get(record_id)
            shown = _copy(record) if record is not None else None
        if shown is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        if entity == "deal":
            with state.lock:
                shown["TIMELINE"] = [
                    c["COMMENT"]
                    for c in state.comments.values()
                    if c["ENTITY_TYPE"] == "deal" and c["ENTITY_ID"] == str(record_id)
                ]
        return JSONResponse(shown)

    @app.get("/_bitrix24/state")
    async def get_state() -> dict[str, Any]:
        return state.snapshot()

    @app.post("/_bitrix24/faults")
    async def set_faults(request: Request) -> dict[str, Any]:
        body = await request.json()
        with state.lock:
            state.faults = Bitrix24Faults(**body)
        return {"ok": True}

    return app, state
