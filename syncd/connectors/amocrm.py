"""amoCRM (API v4): a ticket becomes a lead, its client a contact, its messages notes.

Why it is built this way:

* amoCRM has no idempotency keys. Every create is guarded by an intent (see
  :class:`RecordConnector`), and everything created can be found again after
  an unknown outcome: contacts by e-mail or phone, leads by the external key
  (a custom field or a ``syncd:<key>`` tag), notes by a marker line that
  carries the operation key.
* ``query`` is a substring search over every field of an entity, so a hit is
  only a candidate; the match is decided here, on normalized values.
* OAuth refresh tokens are single-use. The new pair is saved before the new
  access token is used: a crash between the two would otherwise strand the
  integration with a spent refresh token.
* amoCRM allows 7 requests in any second and blocks accounts that keep
  exceeding it, so requests are paced here (a sliding window, not a bucket:
  all 7, never an 8th) rather than refused there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from syncd.connectors.amocrm_bulk import Outcome, SharedWrites
from syncd.connectors.base import Created, DeliveryContext, LinkRef, RecordConnector
from syncd.connectors.http import classified, parse_retry_after
from syncd.connectors.throttle import SlidingWindow, Slot, TokenBucket
from syncd.dotted import dig
from syncd.errors import (
    AccessDenied,
    Contended,
    DeliveryError,
    NotFound,
    RateLimited,
    Rejected,
    ServerError,
)
from syncd.mapping import AddNote, Operation, Plan, Upsert, UpsertContact, UpsertDeal
from syncd.ticket import normalize_email, normalize_phone

API = "/api/v4"
TOKEN_PATH = "/oauth2/access_token"  # noqa: S105 - a path, not a secret
#: Refresh this long before the access token's known expiry, not on the 401 after it.
_EXPIRY_MARGIN = 60.0
#: Notes pages (250 each, newest first) read when looking for a note after an unknown outcome.
_NOTE_PAGES = 8
#: Leads asked for at once when checking a contact's leads for the external key.
_ID_CHUNK = 50
_PAGE = 250
_SNIPPET = 200
#: Seconds of the pacing window. amoCRM counts 7 requests in any second where they arrive,
#: which is somewhere between sending and the answer; the window is measured from the
#: 7th-last answer (see SlidingWindow.begin), so delays on the way cannot squeeze 8 into
#: one second. The 20 ms on top allow for the server stamping a request a little after
#: reading it, and for rounding in its count; they cost 2 % of the rate.
PACING_WINDOW = 1.02
#: Records per shared write request (amoCRM asks for at most 50).
_BULK = 50
_COMPLEX = "POST leads/complex"
#: Seconds a shared write may wait for reads queued ahead of it (see _pace_bulk).
_BULK_DEFER = 3.0

#: What the connector paces with (a test may swap in a TokenBucket or a fake clock).
Throttle = SlidingWindow | TokenBucket


class AmoCrmSettings(BaseModel):
    """``[destinations.<name>]`` for ``kind = "amocrm"``: one auth mode, pacing, the key's home."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The account's address, e.g. https://example.amocrm.ru (no path).
    base_url: str = Field(pattern=r"^https?://[^/?#\s]+/?$")
    #: A long-lived token; in OAuth mode the first access token of the pair (optional there).
    access_token: SecretStr | None = None
    #: OAuth: the integration's ID, secret key and redirect URI, and the first refresh token.
    client_id: str | None = None
    client_secret: SecretStr | None = None
    redirect_uri: str | None = None
    refresh_token: SecretStr | None = None
    #: A text custom field of leads holding the ticket key; unset: a ``syncd:<key>`` tag.
    external_key_field_id: int | None = Field(default=None, gt=0)
    #: Country for reading phones typed into amoCRM without a country code ("8 999 ...").
    phone_region: str = Field(default="RU", pattern=r"^[A-Za-z]{2}$")
    #: Client-side pacing: at most this many requests in any window of ~1 s (amoCRM allows
    #: 7). Unset: rate_per_second + burst, rounded down (older configs said it that way;
    #: both mean "requests in any one second"). Lower it when other integrations share
    #: the account's limit.
    requests_per_second: int | None = Field(default=None, ge=1, le=100)
    rate_per_second: float = Field(default=6.0, gt=0, le=100)
    burst: int = Field(default=1, ge=1, le=100)

    @model_validator(mode="after")
    def _one_auth_mode(self) -> AmoCrmSettings:
        """Each problem under its own key, so check-config points at the line to fix."""
        oauth = {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uri": self.redirect_uri,
            "refresh_token": self.refresh_token,
        }
        if all(v is None for v in oauth.values()):
            if self.access_token is None:
                raise _settings_error(
                    [
                        (
                            "access_token",
                            "set access_token (a long-lived token), or client_id, "
                            "client_secret, redirect_uri and refresh_token (OAuth)",
                        )
                    ]
                )
            return self
        missing = [k for k, v in oauth.items() if v is None]
        if missing:
            raise _settings_error(
                [
                    (
                        key,
                        "required for OAuth (client_id, client_secret, redirect_uri and "
                        "refresh_token go together); for a long-lived token set only access_token",
                    )
                    for key in missing
                ]
            )
        return self

    @property
    def oauth(self) -> bool:
        return self.client_id is not None

    @property
    def window_limit(self) -> int:
        """Requests allowed in any pacing window (see ``requests_per_second``)."""
        if self.requests_per_second is not None:
            return self.requests_per_second
        return max(1, int(self.rate_per_second + self.burst))


@dataclass(frozen=True)
class _Tokens:
    access: str
    refresh: str | None
    #: Epoch seconds; None when unknown (the first 401 will tell).
    expires_at: float | None


@dataclass(frozen=True)
class _Step(Upsert):
    """A plan record that still carries the typed operation (move_stage, parent entity...)."""

    op: Operation | None = None


class AmoCrmConnector(RecordConnector):
    kind = "amocrm"
    settings_model = AmoCrmSettings
    settings: AmoCrmSettings

    def __init__(self, *args: Any, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self._base = s.base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self._base,
            timeout=self.timeout,
            transport=self.transport,
            headers={"Accept": "application/json", "User-Agent": "syncd"},
        )
        #: Replaceable (tests drive time by hand); shared by every delivery of this destination.
        self.throttle: Throttle = SlidingWindow(s.window_limit, PACING_WINDOW)
        self._clock = clock
        self._tokens: _Tokens | None = None
        #: A rotated pair whose save failed: saved again before anything else is sent.
        self._unsaved: _Tokens | None = None
        #: (refresh token, why amoCRM refused it): not sent again.
        self._refused: tuple[str, str] | None = None
        self._auth_lock = asyncio.Lock()
        rt = s.refresh_token
        #: Ties stored credentials to the configured pair they grew from (see _initial_tokens).
        self._seed = hashlib.sha256(rt.get_secret_value().encode()).hexdigest()[:16] if rt else ""
        #: Writes of concurrent deliveries to the same bulk endpoint share one request.
        self._bulk = SharedWrites(
            acquire=self._pace_bulk,
            alone=self._write_alone,
            shared=self._write_shared,
            limit=_BULK,
        )

    # --- the plan ---------------------------------------------------------------------

    async def execute(self, plan: Plan, ctx: DeliveryContext) -> None:
        steps = [
            _Step(r.entity, r.external_key, r.fields, r.create_only, r.parent, r.identities, op=op)
            for r, op in zip(plan.records(), plan.operations, strict=True)
        ]
        known: dict[str, str] = {}
        index = 0
        while index < len(steps):
            step = steps[index]
            nxt = steps[index + 1] if index + 1 < len(steps) else None
            key = ctx.idempotency_key(index)
            if nxt is not None and await self._complex(step, nxt, known, ctx, key):
                index += 2
                continue
            parent_id = await self._parent_id(step, known, ctx)
            if await self._nothing_to_add(step, ctx):
                # Linked, and nothing it could add: no read of the contact, no write.
                step = replace(step, create_only=True)
            known[step.external_key] = await self._apply(step, parent_id, key, ctx)
            index += 1

    async def _nothing_to_add(self, step: _Step, ctx: DeliveryContext) -> bool:
        """A linked contact already holds everything this event says about the person.

        True when each e-mail and phone is an identity link to that same contact
        (links are recorded only after amoCRM took the value: see ``_remember``)
        and the event brings no other fields. The name does not count: syncd named
        the contact when it created or first updated it, and a name a manager
        changed since is theirs to keep.
        """
        op = _typed(step)
        if not isinstance(op, UpsertContact) or step.create_only or op.fields:
            return False
        link = await ctx.links.get("contact", op.key)
        if link is None or link.crm_id is None:
            return False
        for prefix, values in (("email", op.emails), ("phone", op.phones)):
            for value in values:
                known = await ctx.links.get("contact", f"{prefix}:{value}")
                if known is None or known.crm_id != link.crm_id:
                    return False
        return True

    async def _complex(
        self, contact: _Step, deal: _Step, known: dict[str, str], ctx: DeliveryContext, key: str
    ) -> bool:
        """A new lead for a new contact in one request, when both intents are durable first.

        Only for records syncd has never seen and amoCRM does not hold: anything
        else (a found contact, an intent left by an earlier try) takes the
        record-by-record path, which knows how to look before it creates.
        """
        c, d = contact.op, deal.op
        if (
            not (isinstance(c, UpsertContact) and isinstance(d, UpsertDeal))
            or d.contact_key != c.key
        ):
            return False
        if await self._linked(contact, ctx) is not None:
            return False
        if await ctx.links.get("deal", d.key) is not None:
            return False
        found = await self.find(contact, None)
        if found is not None and found.crm_id is not None:
            await ctx.links.record("contact", c.key, found.crm_id, found.url)
            return False
        for entity, external_key in (("contact", c.key), ("deal", d.key)):
            if not await ctx.links.intend(entity, external_key):
                raise Contended(
                    f"{entity} {external_key} is being created by another delivery",
                    retry_after=1.0,
                )
        body = self._lead_body(d, None, create=True)
        body.setdefault("_embedded", {})["contacts"] = [self._new_contact_body(c)]
        body["request_id"] = key
        row = await self._bulk.submit(_COMPLEX, key, body)
        lead_id, contact_id = _id(row.get("id")), _id(row.get("contact_id"))
        if lead_id is None:
            raise ServerError("amoCRM answered the complex create without a lead id")
        await ctx.links.record("deal", d.key, lead_id, self.record_url("deal", lead_id))
        known[d.key] = lead_id
        if contact_id is None:
            raise ServerError("amoCRM created the lead but named no contact; looking it up next")
        await ctx.links.record("contact", c.key, contact_id, self.record_url("contact", contact_id))
        await self._remember(contact, contact_id, ctx)
        known[c.key] = contact_id
        return True

    # --- RecordConnector --------------------------------------------------------------

    async def create(self, op: Upsert, parent_id: str | None, idempotency_key: str) -> Created:
        typed = _typed(op)
        if isinstance(typed, UpsertContact):
            body = self._new_contact_body(typed)
            body["request_id"] = idempotency_key
            response = await self._call("POST", f"{API}/contacts", body=[body], write=True)
            return self._created("contact", _first_id(response, "contacts"), response)
        if isinstance(typed, UpsertDeal):
            body = self._lead_body(typed, parent_id, create=True)
            body["request_id"] = idempotency_key
            response = await self._call("POST", f"{API}/leads", body=[body], write=True)
            return self._created("deal", _first_id(response, "leads"), response)
        if parent_id is None:
            raise Rejected(f"note {typed.key}: its {typed.parent_entity} was never created")
        body = {
            "entity_id": _int(parent_id, f"{typed.parent_entity} id"),
            "note_type": "common",
            "params": {"text": f"{typed.text}\n\n{_marker(typed.key)}"},
            "request_id": idempotency_key,
        }
        endpoint = f"POST {_plural(typed.parent_entity)}/notes"
        row = await self._bulk.submit(endpoint, idempotency_key, body)
        crm_id = _id(row.get("id"))
        if crm_id is None:
            raise ServerError("amoCRM answered the note create without an id")
        return Created(crm_id=crm_id, url=self.record_url("note", crm_id))

    async def update(
        self, op: Upsert, crm_id: str, parent_id: str | None, idempotency_key: str
    ) -> None:
        typed = _typed(op)
        if isinstance(typed, UpsertContact):
            await self._update_contact(typed, crm_id, idempotency_key)
        elif isinstance(typed, UpsertDeal):
            body = self._lead_body(typed, parent_id, create=False)
            if body:
                body["id"] = _int(crm_id, "lead id")
                await self._bulk.submit("PATCH leads", idempotency_key, body)
        # A note is never rewritten: it is create_only.

    async def find(self, op: Upsert, parent_id: str | None) -> LinkRef | None:
        typed = _typed(op)
        if isinstance(typed, UpsertContact):
            crm_id = await self._find_contact(typed.emails, typed.phones)
            entity = "contact"
        elif isinstance(typed, UpsertDeal):
            crm_id = await self._find_lead(typed.key, parent_id)
            entity = "deal"
        else:
            if parent_id is None:
                return None
            crm_id = await self._find_note(typed, parent_id)
            entity = "note"
        if crm_id is None:
            return None
        return LinkRef(crm_id=crm_id, url=self.record_url(entity, crm_id))

    def record_url(self, entity: str, crm_id: str) -> str | None:
        section = {"deal": "leads", "lead": "leads", "contact": "contacts"}.get(entity)
        return f"{self._base}/{section}/detail/{crm_id}" if section else None

    async def check(self) -> list[str]:
        account = _obj(_json(await self._call("GET", f"{API}/account")))
        lines = [
            f"account {account.get('name') or account.get('subdomain')} (id {account.get('id')})"
        ]
        rights: dict[str, Any] | None = None
        user_id = _id(account.get("current_user_id"))
        if user_id is not None:
            try:
                user = _obj(_json(await self._call("GET", f"{API}/users/{user_id}")))
                rights = _obj(user.get("rights"))
            except (AccessDenied, NotFound, Rejected):
                rights = None  # only admins may read users; the rest still works
        for entity in ("leads", "contacts"):
            lines.append(f"{entity}: {_rights_text(rights, entity)}")
        field_id = self.settings.external_key_field_id
        if field_id is None:
            lines.append("external key: lead tag syncd:<key>")
        else:
            try:
                response = await self._call("GET", f"{API}/leads/custom_fields/{field_id}")
                field = _obj(_json(response))
            except NotFound:
                field = {}
            if not field:
                raise Rejected(
                    f"external_key_field_id {field_id} is not a custom field of leads "
                    "in this account"
                )
            lines.append(f"external key: lead field {field_id} ({field.get('name')})")
        return lines

    async def aclose(self) -> None:
        await self._bulk.aclose()
        await self._client.aclose()

    # --- bulk writes (see amocrm_bulk) -----------------------------------------------

    async def _write_alone(self, endpoint: str, item: dict[str, Any]) -> dict[str, Any]:
        """One record, in exactly the request a delivery sends on its own (already paced)."""
        method, target = endpoint.split(" ", 1)
        if target.endswith("/notes"):
            item = dict(item)
            entity_id = item.pop("entity_id")
            path = f"{API}/{target.split('/')[0]}/{entity_id}/notes"
            response = await self._call(method, path, body=[item], write=True, paced=False)
            notes = _items(response, "notes")
            return notes[0] if notes else {}
        response = await self._call(method, f"{API}/{target}", body=[item], write=True, paced=False)
        rows = _json(response)
        if isinstance(rows, list):  # /leads/complex answers a plain array
            return rows[0] if rows and isinstance(rows[0], dict) else {}
        return {}

    async def _write_shared(
        self, endpoint: str, records: Sequence[tuple[str, dict[str, Any]]]
    ) -> Outcome:
        """Several deliveries' records in one request (already paced): rows and refusals.

        amoCRM names a bad record by its ``request_id`` and writes nothing of the
        request; those records are refused, the rest sent again by the caller.
        """
        method, target = endpoint.split(" ", 1)
        body = [{**item, "request_id": rid} for rid, item in records]
        index = {rid: i for i, (rid, _) in enumerate(records)}
        response = await self._exchange(method, f"{API}/{target}", body=body, paced=False)
        data = _json(response)
        if response.status_code == 400 and isinstance(data, dict):
            groups: dict[int, list[Any]] = {}
            for group in data.get("validation-errors") or []:
                at = index.get(str(_obj(group).get("request_id")))
                if at is not None:
                    groups.setdefault(at, []).append(group)
            if groups:
                refused: dict[int, DeliveryError] = {}
                for at, own in groups.items():
                    text = self._validation_text({"validation-errors": own}, [body[at]])
                    refused[at] = Rejected(
                        f"amoCRM rejected the request ({text or 'HTTP 400'})", status_code=400
                    )
                return {}, refused
        error = self._error(response, body=body, write=True)
        if error is not None:
            raise error
        if isinstance(data, list):  # /leads/complex
            rows = [r for r in data if isinstance(r, dict)]
        else:
            rows = _items(response, target.split("/")[-1])
        return _match_rows(rows, records, index), {}

    # --- contacts ---------------------------------------------------------------------

    def _new_contact_body(self, op: UpsertContact) -> dict[str, Any]:
        fields = [_field("EMAIL", [{"value": e, "enum_code": "WORK"} for e in op.emails])]
        fields.append(_field("PHONE", [{"value": p, "enum_code": "WORK"} for p in op.phones]))
        fields.extend(_custom_fields(op.fields, skip={"EMAIL", "PHONE"}))
        body: dict[str, Any] = {
            "name": op.name or next(iter((*op.emails, *op.phones)), op.key),
            "custom_fields_values": [f for f in fields if f["values"]],
        }
        if op.responsible_id is not None:
            body["responsible_user_id"] = _int(op.responsible_id, "responsible_id")
        if not body["custom_fields_values"]:
            del body["custom_fields_values"]
        return body

    async def _update_contact(self, op: UpsertContact, crm_id: str, key: str) -> None:
        """Add what is missing; never drop what a manager typed in (PATCH replaces a field)."""
        if not (op.emails or op.phones or op.fields or op.name):
            return
        current = _obj(_json(await self._call("GET", f"{API}/contacts/{crm_id}")))
        if not current:
            raise NotFound(
                f"contact {crm_id} no longer exists in amoCRM (deleted?); "
                "unlink it in syncd to create it again",
                status_code=204,
            )
        patch: list[dict[str, Any]] = []
        for code, ours in (("EMAIL", op.emails), ("PHONE", op.phones)):
            theirs = _field_entries(current, code=code)
            have = {self._normalized(code, v.get("value")) for v in theirs}
            missing = [v for v in ours if self._normalized(code, v) not in have]
            if missing:
                kept = [_kept_value(v) for v in theirs]
                added = [{"value": v, "enum_code": "WORK"} for v in missing]
                patch.append(_field(code, kept + added))
        patch.extend(_custom_fields(op.fields, skip={"EMAIL", "PHONE"}))
        body: dict[str, Any] = {}
        if patch:
            body["custom_fields_values"] = patch
        if op.name and not str(current.get("name") or "").strip():
            body["name"] = op.name
        if body:
            body["id"] = _int(crm_id, "contact id")
            await self._bulk.submit("PATCH contacts", key, body)

    def _normalized(self, code: str, value: Any) -> str | None:
        """How syncd writes an e-mail or phone, whatever way a person typed it into amoCRM."""
        text = str(value or "")
        if code == "EMAIL":
            return normalize_email(text)
        return normalize_phone(text, self.settings.phone_region)

    async def _find_contact(self, emails: Iterable[str], phones: Iterable[str]) -> str | None:
        """Exact match on normalized EMAIL/PHONE values; ``query`` only narrows the field."""
        region = self.settings.phone_region
        wanted = [("EMAIL", e, e) for e in emails]
        wanted += [("PHONE", p, _phone_query(p, region)) for p in phones]
        for code, value, query in wanted:
            target = self._normalized(code, value)
            if target is None:
                continue
            hits = [
                contact
                for contact in await self._search("contacts", query)
                if any(
                    self._normalized(code, v.get("value")) == target
                    for v in _field_entries(contact, code=code)
                )
            ]
            if hits:
                return _oldest(hits)
        return None

    # --- leads ------------------------------------------------------------------------

    def _lead_body(self, op: UpsertDeal, contact_id: str | None, *, create: bool) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if op.title is not None or create:
            # An update without a subject keeps the lead's name; a create always names it.
            body["name"] = op.title or op.fallback_title or op.key
        if op.stage_id is not None and (create or op.move_stage):
            body["status_id"] = _int(op.stage_id, "stage id (status_id)")
            if op.pipeline_id is not None:
                body["pipeline_id"] = _int(op.pipeline_id, "pipeline_id")
        elif create and op.pipeline_id is not None:
            body["pipeline_id"] = _int(op.pipeline_id, "pipeline_id")
        if op.responsible_id is not None:
            body["responsible_user_id"] = _int(op.responsible_id, "responsible_id")
        fields = _custom_fields(op.fields)
        field_id = self.settings.external_key_field_id
        if create and field_id is not None:
            fields = [f for f in fields if f.get("field_id") != field_id]
            fields.append({"field_id": field_id, "values": [{"value": op.key}]})
        if fields:
            body["custom_fields_values"] = fields
        if create:
            embedded: dict[str, Any] = {}
            if field_id is None:
                embedded["tags"] = [{"name": _tag(op.key)}]
            if contact_id is not None:
                embedded["contacts"] = [{"id": _int(contact_id, "contact id"), "is_main": True}]
            if embedded:
                body["_embedded"] = embedded
        return body

    def _carries_key(self, lead: Mapping[str, Any], key: str) -> bool:
        field_id = self.settings.external_key_field_id
        if field_id is not None and key in {
            str(v.get("value")) for v in _field_entries(lead, field_id=field_id)
        }:
            return True
        tags = _obj(lead.get("_embedded")).get("tags")
        return any(_obj(t).get("name") == _tag(key) for t in tags or [])

    async def _find_lead(self, key: str, contact_id: str | None) -> str | None:
        """By ``query`` first; then among the contact's leads (tags may not be searchable)."""
        hits = [lead for lead in await self._search("leads", key) if self._carries_key(lead, key)]
        if hits:
            return _oldest(hits)
        if contact_id is None:
            return None
        response = await self._call("GET", f"{API}/contacts/{contact_id}", params={"with": "leads"})
        contact = _obj(_json(response))
        ids = [_id(_obj(x).get("id")) for x in _obj(contact.get("_embedded")).get("leads") or []]
        wanted = [i for i in ids if i is not None]
        for start in range(0, len(wanted), _ID_CHUNK):
            chunk = wanted[start : start + _ID_CHUNK]
            params = [("filter[id][]", i) for i in chunk] + [("limit", str(_PAGE))]
            response = await self._call("GET", f"{API}/leads", params=params)
            hits = [x for x in _items(response, "leads") if self._carries_key(x, key)]
            if hits:
                return _oldest(hits)
        return None

    # --- notes ------------------------------------------------------------------------

    async def _find_note(self, op: AddNote, parent_id: str) -> str | None:
        marker = _marker(op.key)
        path = f"{API}/{_plural(op.parent_entity)}/{parent_id}/notes"
        for page in range(1, _NOTE_PAGES + 1):
            params = {
                "filter[note_type]": "common",
                "order[id]": "desc",
                "limit": str(_PAGE),
                "page": str(page),
            }
            response = await self._call("GET", path, params=params)
            for note in _items(response, "notes"):
                text = str(_obj(note.get("params")).get("text") or "")
                if marker in (line.strip() for line in text.splitlines()):
                    return _id(note.get("id"))
            if "next" not in _obj(_obj(_json(response)).get("_links")):
                break  # the last page (or 204: no notes at all)
        return None

    # --- HTTP, auth and errors --------------------------------------------------------

    async def _search(self, entity: str, query: str) -> list[dict[str, Any]]:
        response = await self._call(
            "GET", f"{API}/{entity}", params={"query": query, "limit": str(_PAGE)}
        )
        return _items(response, entity)

    def _created(self, entity: str, crm_id: str | None, response: httpx.Response) -> Created:
        if crm_id is None:
            raise ServerError(
                f"amoCRM answered the {entity} create with HTTP {response.status_code} but no id",
                status_code=response.status_code,
            )
        return Created(crm_id=crm_id, url=self.record_url(entity, crm_id))

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        body: Any = None,
        write: bool = False,
        paced: bool = True,
    ) -> httpx.Response:
        """One API request: paced, authorized, refreshed once on 401, classified."""
        response = await self._exchange(method, path, params=params, body=body, paced=paced)
        error = self._error(response, body=body, write=write)
        if error is not None:
            raise error
        return response

    async def _exchange(
        self, method: str, path: str, *, params: Any = None, body: Any = None, paced: bool = True
    ) -> httpx.Response:
        """The answer, once authorized (refreshed once on 401); not yet classified.

        ``paced=False``: the caller already waited for the limiter (a shared write).
        """
        tokens = await self._current_tokens()
        response = await self._send(method, path, params, body, tokens.access, paced=paced)
        if response.status_code == 401:
            if not self.settings.oauth:
                raise AccessDenied(
                    "amoCRM refused the long-lived access_token (HTTP 401): it expired or was "
                    "revoked; generate a new one in the integration's settings",
                    status_code=401,
                )
            await self._refresh_after_401(tokens.access)
            tokens = await self._current_tokens()
            response = await self._send(method, path, params, body, tokens.access)
            if response.status_code == 401:
                raise AccessDenied(
                    "amoCRM refused a freshly refreshed access token (HTTP 401): the "
                    "integration was probably disconnected; authorize it again",
                    status_code=401,
                )
        return response

    async def _send(
        self, method: str, path: str, params: Any, body: Any, access: str, *, paced: bool = True
    ) -> httpx.Response:
        slot = await self._pace() if paced else None
        try:
            async with classified():
                return await self._client.request(
                    method,
                    path,
                    params=params,
                    json=body,
                    headers={"Authorization": f"Bearer {access}"},
                )
        finally:
            if slot is not None:
                slot.end()

    async def _pace_bulk(self) -> Slot | None:
        """The limiter, for a shared write: it lets queued reads go first, for a while.

        While other deliveries wait to read, each of those reads ends with one more
        record for this request; once nobody waits (or after _BULK_DEFER s), it goes.
        """
        if isinstance(self.throttle, SlidingWindow):
            await self.throttle.quiet(_BULK_DEFER)
        return await self._pace()

    async def _pace(self) -> Slot | None:
        """Wait for the limiter; the slot (ended when the answer is in), if it keeps one."""
        if isinstance(self.throttle, SlidingWindow):
            return await self.throttle.begin()
        await self.throttle.acquire()
        return None

    async def _current_tokens(self) -> _Tokens:
        async with self._auth_lock:
            if self._unsaved is not None:
                await self._adopt(self._unsaved)
            if self._tokens is None:
                self._tokens = await self._initial_tokens()
            expires_at = self._tokens.expires_at
            if (
                self.settings.oauth
                and expires_at is not None
                and expires_at - _EXPIRY_MARGIN <= self._clock()
            ):
                await self._refresh_locked()
            return self._tokens

    async def _initial_tokens(self) -> _Tokens:
        """Stored tokens win (they are the newest), unless the configured pair was replaced."""
        s = self.settings
        if not s.oauth:
            assert s.access_token is not None
            return _Tokens(s.access_token.get_secret_value(), None, None)
        if self.credentials is not None:
            stored = await self.credentials.load() or {}
            if stored.get("refresh_token") and stored.get("seed", self._seed) == self._seed:
                expires = stored.get("expires_at")
                return _Tokens(
                    str(stored.get("access_token") or ""),
                    str(stored["refresh_token"]),
                    float(expires) if isinstance(expires, int | float) else None,
                )
        assert s.refresh_token is not None
        access = s.access_token.get_secret_value() if s.access_token else ""
        # No access token yet: expired at the epoch, so the first request refreshes.
        return _Tokens(
            access, s.refresh_token.get_secret_value(), _jwt_expiry(access) if access else 0.0
        )

    async def _refresh_after_401(self, rejected: str) -> None:
        async with self._auth_lock:
            if self._tokens is not None and self._tokens.access == rejected:
                await self._refresh_locked()
            # else: another delivery refreshed while this one waited; use its token.

    async def _refresh_locked(self) -> None:
        tokens = self._tokens
        assert tokens is not None and tokens.refresh is not None
        if self._refused is not None and self._refused[0] == tokens.refresh:
            raise AccessDenied(self._refused[1])
        s = self.settings
        assert s.client_secret is not None
        body = {
            "client_id": s.client_id,
            "client_secret": s.client_secret.get_secret_value(),
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh,
            "redirect_uri": s.redirect_uri,
        }
        slot = await self._pace()
        try:
            async with classified():
                response = await self._client.post(TOKEN_PATH, json=body)
        finally:
            if slot is not None:
                slot.end()
        if response.status_code in (400, 401):
            why = _problem_text(_json(response)) or f"HTTP {response.status_code}"
            message = self._scrub(
                f"amoCRM refused the OAuth refresh token ({why}). This is a credentials "
                "problem: the token was already used, revoked or has expired, and retrying "
                "cannot fix it. Authorize the integration again and put the new access_token "
                "and refresh_token into this destination's config."
            )
            self._refused = (tokens.refresh, message)
            raise AccessDenied(message, status_code=response.status_code)
        error = self._error(response, body=None, write=False)
        if error is not None:
            raise error
        data = _obj(_json(response))
        access, refresh = data.get("access_token"), data.get("refresh_token")
        if not isinstance(access, str) or not isinstance(refresh, str) or not access:
            raise ServerError(
                f"amoCRM's token endpoint answered HTTP {response.status_code} "
                "without a token pair",
                status_code=response.status_code,
            )
        lifetime = data.get("expires_in")
        expires_at = (
            self._clock() + float(lifetime)
            if isinstance(lifetime, int | float)
            else _jwt_expiry(access)
        )
        await self._adopt(_Tokens(access, refresh, expires_at))

    async def _adopt(self, tokens: _Tokens) -> None:
        """Save the rotated pair, then use it: the old refresh token is already spent."""
        self._unsaved = tokens
        if self.credentials is not None:
            await self.credentials.save(
                {
                    "access_token": tokens.access,
                    "refresh_token": tokens.refresh,
                    "expires_at": tokens.expires_at,
                    "seed": self._seed,
                }
            )
        self._tokens = tokens
        self._unsaved = None

    def _scrub(self, text: str) -> str:
        """Error texts end up in the store and the monitor: no token may reach them."""
        secrets = [
            self.settings.access_token,
            self.settings.client_secret,
            self.settings.refresh_token,
        ]
        values = [s.get_secret_value() for s in secrets if s is not None]
        for tokens in (self._tokens, self._unsaved):
            if tokens is not None:
                values += [tokens.access, tokens.refresh or ""]
        for value in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
            text = text.replace(value, "***")
        return text

    def _error(self, response: httpx.Response, *, body: Any, write: bool) -> DeliveryError | None:
        """amoCRM's answer as syncd's error class: the one place statuses are interpreted."""
        status = response.status_code
        if status < 300:
            return None
        data = _json(response)
        detail = self._scrub(_problem_text(data))
        said = f"HTTP {status}" + (f": {detail}" if detail else "")
        if status == 429:
            self.throttle.exhaust()
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is None and isinstance(data, dict):
                value = data.get("retry_after")
                retry_after = float(value) if isinstance(value, int | float) else None
            return RateLimited(
                f"amoCRM rate limit ({said}); repeated excess gets the account blocked",
                status_code=status,
                retry_after=retry_after,
            )
        if status in (400, 422):
            return Rejected(
                f"amoCRM rejected the request ({self._validation_text(data, body) or said})",
                status_code=status,
            )
        if status == 401:
            return AccessDenied(f"amoCRM refused the credentials ({said})", status_code=status)
        if status == 402:
            return AccessDenied(
                "amoCRM account is blocked: payment required (HTTP 402), the subscription has "
                "ended and amoCRM refuses writes until it is paid. Permanent for this delivery; "
                "pause the destination and resend once the account is paid.",
                status_code=status,
            )
        if status == 403:
            why = f" ({detail})" if detail else " (no JSON body: a blocked account or IP)"
            return AccessDenied(
                f"amoCRM account is blocked or access is forbidden (HTTP 403){why}. amoCRM "
                "blocks accounts and IPs that keep exceeding its rate limit. Permanent for this "
                "delivery; pause the destination and resend once access is restored.",
                status_code=status,
            )
        if status in (404, 410):
            return NotFound(f"amoCRM has no such record or endpoint ({said})", status_code=status)
        if status >= 500 or status == 408:
            error = ServerError(f"amoCRM failed on its side ({said})", status_code=status)
            if write and status in (502, 504):
                # A gateway gave up waiting: the write may well have been applied.
                error.outcome_unknown = True
            return error
        return Rejected(f"amoCRM refused the request ({said})", status_code=status)

    def _validation_text(self, data: Any, body: Any) -> str:
        """``validation-errors`` as "path=value: code (detail)", naming what was sent."""
        if not isinstance(data, dict) or not isinstance(data.get("validation-errors"), list):
            return ""
        items = body if isinstance(body, list) else [body]
        parts: list[str] = []
        for group in data["validation-errors"]:
            group = _obj(group)
            sent = _sent_item(items, group.get("request_id"))
            for err in group.get("errors") or []:
                err = _obj(err)
                path = str(err.get("path") or "?")
                value = dig(sent, path)
                if not isinstance(value, str | int | float | bool):
                    value = None  # only a scalar is worth showing beside the error
                shown = (
                    f"={json.dumps(value, ensure_ascii=False)[:60]}" if value is not None else ""
                )
                code, why = err.get("code"), err.get("detail")
                what = f"{code} ({why})" if code and why else str(code or why or "")
                parts.append(f"{path}{shown}: {what}" if what else f"{path}{shown}")
        return self._scrub("HTTP 400 validation-errors: " + "; ".join(parts)) if parts else ""


# --- helpers --------------------------------------------------------------------------


def _settings_error(problems: list[tuple[str, str]]) -> ValidationError:
    return ValidationError.from_exception_data(
        "AmoCrmSettings",
        [
            InitErrorDetails(type=PydanticCustomError("auth_mode", message), loc=(key,), input=None)
            for key, message in problems
        ],
    )


def _typed(op: Upsert) -> Operation:
    """The typed operation behind a record; rebuilt from plain fields when it has none."""
    if isinstance(op, _Step) and op.op is not None:
        return op.op
    f = dict(op.fields)
    if op.entity == "contact":
        known = {"name", "emails", "phones", "responsible_id"}
        return UpsertContact(
            key=op.external_key,
            identities=op.identities,
            name=f.get("name"),
            emails=tuple(f.get("emails") or ()),
            phones=tuple(f.get("phones") or ()),
            fields={k: v for k, v in f.items() if k not in known},
            responsible_id=f.get("responsible_id"),
        )
    if op.entity == "deal":
        known = {"title", "pipeline", "pipeline_id", "stage_id", "responsible_id"}
        return UpsertDeal(
            key=op.external_key,
            title=f.get("title"),
            pipeline=f.get("pipeline"),
            pipeline_id=f.get("pipeline_id"),
            stage_id=f.get("stage_id"),
            move_stage=f.get("stage_id") is not None,
            responsible_id=f.get("responsible_id"),
            fields={k: v for k, v in f.items() if k not in known},
            contact_key=op.parent,
        )
    return AddNote(
        key=op.external_key,
        parent_key=op.parent or "",
        parent_entity="deal",
        text=str(f.get("text", "")),
    )


def _plural(entity: str) -> str:
    return "contacts" if entity == "contact" else "leads"


def _marker(key: str) -> str:
    """The line that lets a note be found again after its create timed out."""
    return f"[syncd {key}]"


def _tag(key: str) -> str:
    return f"syncd:{key}"


def _json(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _obj(value: Any) -> dict[str, Any]:
    """A JSON object, or {} for null and for PHP's ``[]`` (how it writes an empty map)."""
    return value if isinstance(value, dict) else {}


def _items(response: httpx.Response, key: str) -> list[dict[str, Any]]:
    """A HAL list; 204 No Content is amoCRM's empty list."""
    embedded = _obj(_obj(_json(response)).get("_embedded"))
    return [x for x in embedded.get(key) or [] if isinstance(x, dict)]


def _first_id(response: httpx.Response, key: str) -> str | None:
    items = _items(response, key)
    return _id(items[0].get("id")) if items else None


def _id(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | str) and str(value).strip().isdigit():
        return str(int(value))
    return None


def _int(value: str | int, what: str) -> int:
    """CRM ids are numbers in amoCRM; a mapping that says otherwise is a config mistake."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise Rejected(f"{what} must be an amoCRM numeric id, got {value!r}") from None


def _oldest(entities: list[dict[str, Any]]) -> str | None:
    ids = [int(i) for i in (_id(e.get("id")) for e in entities) if i is not None]
    return str(min(ids)) if ids else None


def _field(code: str, values: list[dict[str, Any]]) -> dict[str, Any]:
    return {"field_code": code, "values": values}


def _custom_fields(fields: Mapping[str, Any], skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Mapping fields as custom_fields_values: numeric names are field ids, others codes."""
    out: list[dict[str, Any]] = []
    for name, value in fields.items():
        if name in skip or value is None or value == "":
            continue
        values = value if isinstance(value, list | tuple) else [value]
        entry: dict[str, Any] = {"values": [{"value": v} for v in values]}
        if str(name).isdigit():
            entry["field_id"] = int(name)
        else:
            entry["field_code"] = str(name)
        out.append(entry)
    return out


def _field_entries(
    entity: Mapping[str, Any], *, code: str | None = None, field_id: int | None = None
) -> list[dict[str, Any]]:
    for field in entity.get("custom_fields_values") or []:
        field = _obj(field)
        if (code is not None and field.get("field_code") == code) or (
            field_id is not None and field.get("field_id") == field_id
        ):
            return [v for v in field.get("values") or [] if isinstance(v, dict)]
    return []


def _kept_value(value: Mapping[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {"value": value.get("value")}
    if value.get("enum_id") is not None:
        kept["enum_id"] = value["enum_id"]
    elif value.get("enum_code") is not None:
        kept["enum_code"] = value["enum_code"]
    return kept


def _phone_query(phone: str, region: str) -> str:
    """The national digits: they are in the stored value whether it reads +7 999 or 8 999."""
    try:
        return str(phonenumbers.parse(phone, region.upper()).national_number)
    except phonenumbers.NumberParseException:
        return re.sub(r"\D", "", phone)


def _jwt_expiry(token: str) -> float | None:
    """amoCRM access tokens are JWTs; their ``exp`` saves a wasted 401 (None if unreadable)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


def _problem_text(data: Any) -> str:
    """A short reason from a problem+json body (title, detail, hint); '' for HTML or nothing."""
    if not isinstance(data, dict):
        return ""
    parts = [str(data[k]) for k in ("title", "detail", "hint") if data.get(k)]
    return ": ".join(dict.fromkeys(parts))[:_SNIPPET]


def _match_rows(
    rows: list[dict[str, Any]],
    records: Sequence[tuple[str, dict[str, Any]]],
    index: Mapping[str, int],
) -> dict[int, dict[str, Any]]:
    """Each record's row of a bulk answer: by ``request_id``, else by ``id``, else by order."""
    out: dict[int, dict[str, Any]] = {}
    by_id = {str(item.get("id")): i for i, (_, item) in enumerate(records) if "id" in item}
    for row in rows:
        rid = row.get("request_id")
        rid = rid[0] if isinstance(rid, list) and rid else rid  # complex: a list of one
        at = index.get(str(rid)) if rid is not None else None
        if at is None:
            at = by_id.get(str(row.get("id")))
        if at is not None:
            out[at] = row
    if not out and len(rows) == len(records):
        out = dict(enumerate(rows))
    return out


def _sent_item(items: list[Any], request_id: Any) -> Any:
    for index, item in enumerate(items):
        if isinstance(item, dict) and str(item.get("request_id", index)) == str(request_id):
            return item
    return items[0] if len(items) == 1 else None


def _rights_text(rights: Mapping[str, Any] | None, entity: str) -> str:
    """amoCRM rights per action are "A" (all), "G" (group), "M" (own) or "D" (denied)."""
    if rights is None:
        return "rights not visible to this user (not an admin)"
    r = _obj(rights.get(entity))
    if not r:
        return "rights unknown"
    can = {action: r.get(action, "D") != "D" for action in ("view", "add", "edit")}
    if all(can.values()):
        return "read/write"
    if can["view"]:
        return "read only (cannot " + " or ".join(a for a in ("add", "edit") if not can[a]) + ")"
    return "no access"
