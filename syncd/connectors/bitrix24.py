"""Bitrix24 CRM: a ticket becomes a deal, its client a contact, its messages timeline comments.

Auth is an incoming webhook (one secret URL) or an OAuth application whose
one-hour access token is refreshed on ``expired_token``; the rotated pair is
saved through the credential store before the new access token is sent.

One event costs as few requests as it safely can. Look-ups run first (a
contact by e-mail and phone, a record whose create went unanswered); then
every intent is written; then all writes go out as one ``batch`` request
(``halt=1``), later commands naming records made by earlier ones through
``$result[...]``. Because each create's intent is durable before the batch is
sent, a batch whose answer is lost is handled like any lost create: the next
attempt looks each record up by its own key before creating it again.

Bitrix24 keys: a deal carries ``ORIGINATOR_ID`` + ``ORIGIN_ID`` (the ticket's
key), a contact the same when syncd created it, and a timeline comment ends
with a ``[syncd:<key>]`` marker, so each can be found after an unknown outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from syncd.connectors.base import Connector, DeliveryContext, LinkRef
from syncd.connectors.bitrix24_batch import SharedBatches
from syncd.connectors.http import classified, parse_retry_after
from syncd.connectors.throttle import TokenBucket
from syncd.errors import (
    AccessDenied,
    Contended,
    DeliveryError,
    NotFound,
    RateLimited,
    Rejected,
    ServerError,
)
from syncd.logs import redactor
from syncd.mapping import AddNote, Plan, Upsert, UpsertContact, UpsertDeal
from syncd.ticket import normalize_email, normalize_phone

#: Bitrix24 refuses a batch of more commands than this (ERROR_BATCH_LENGTH_EXCEEDED).
BATCH_LIMIT = 50
#: crm.duplicate.findbycomm takes at most this many values per call.
FINDBYCOMM_LIMIT = 20
#: Newest-first pages of a timeline scanned for a note's marker before concluding it is absent.
NOTE_SCAN_PAGES = 10

#: Error codes that mean the credentials (or the plan of the portal) must change.
ACCESS_CODES = frozenset(
    {
        "INVALID_CREDENTIALS",
        "insufficient_scope",
        "invalid_scope",
        "ACCESS_DENIED",
        "invalid_token",
        "expired_token",
        "NO_AUTH_FOUND",
        "user_access_error",
        "PAYMENT_REQUIRED",
        "APPLICATION_NOT_FOUND",
        "authorization_error",
        "PORTAL_DELETED",
        "invalid_grant",
        "invalid_client",
        "invalid_request",
        "unauthorized_client",
    }
)
NOT_FOUND_CODES = frozenset({"NOT_FOUND", "OWNER_NOT_FOUND", "ERROR_METHOD_NOT_FOUND"})
#: Failures on Bitrix24's side, also when reported inside a batch (no HTTP status there).
SERVER_CODES = frozenset({"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"})
#: QUERY_LIMIT_EXCEEDED drains at ~2 requests/s: worth trying again in a second.
QUERY_LIMIT_RETRY = 1.0
#: OVERLOAD_LIMIT is a manual block by Bitrix24 support: do not hammer it.
OVERLOAD_RETRY = 600.0
#: OPERATION_TIME_LIMIT without a known operating_reset_at: the budget is 10 one-minute buckets.
OPERATING_RETRY = 60.0

_RESULT_REF = re.compile(r"\$result\[([^\]]+)\]")


class Bitrix24Settings(BaseModel):
    """``[destinations.<name>]`` with ``kind = "bitrix24"``: a webhook URL or an OAuth app."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Incoming webhook, ``https://<portal>/rest/<user id>/<code>/``; the code is the secret.
    webhook_url: SecretStr | None = None
    #: OAuth application: the portal's address, ``https://<portal>``.
    portal_url: str | None = Field(default=None, pattern=r"^https?://[^/\s]+/?$")
    client_id: str | None = None
    client_secret: SecretStr | None = None
    #: The first pair; after a refresh syncd keeps the rotated pair in its database.
    access_token: SecretStr | None = None
    refresh_token: SecretStr | None = None
    token_url: str = Field(default="https://oauth.bitrix.info/oauth/token/", pattern=r"^https?://")
    #: ORIGINATOR_ID written on deals and contacts that syncd creates, found again by it.
    originator_id: str = Field(default="syncd", min_length=1, max_length=50)
    #: Country assumed for phone numbers typed into the CRM without one.
    default_country: str = Field(default="RU", min_length=2, max_length=2)
    #: Client-side pacing under the portal's leaky bucket (2/s, 50 burst; Enterprise 5/s, 250),
    #: leaving some of the burst to other integrations of the same portal.
    rate_per_second: float = Field(default=2.0, gt=0)
    burst: int = Field(default=40, ge=1)

    @model_validator(mode="after")
    def _one_auth_mode(self) -> Bitrix24Settings:
        oauth = {
            "portal_url": self.portal_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "refresh_token": self.refresh_token,
        }
        if self.webhook_url is not None:
            if any(v is not None for v in (*oauth.values(), self.access_token)):
                raise ValueError("set either webhook_url or the OAuth keys, not both")
            # Never echo the value: the URL holds the secret.
            url = self.webhook_url.get_secret_value()
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("webhook_url must be an http(s) URL")
            if not re.fullmatch(r"/rest/\d+/[^/]+/?", parts.path):
                raise ValueError("webhook_url must look like https://<portal>/rest/<user>/<code>/")
            return self
        missing = [name for name, value in oauth.items() if value is None]
        if len(missing) == len(oauth) and self.access_token is None:
            raise ValueError("set webhook_url, or portal_url + client_id + client_secret + tokens")
        if missing:
            raise ValueError(f"OAuth needs {', '.join(missing)}")
        return self

    @property
    def mode(self) -> Literal["webhook", "oauth"]:
        return "webhook" if self.webhook_url is not None else "oauth"


# --- request building and error classification (pure) ---------------------------------


def php_query(params: Mapping[str, Any]) -> str:
    """Params as a PHP-style query string (``fields[EMAIL][0][VALUE]=...``), for batch commands.

    Bitrix24 parses each batch command with PHP's ``parse_str`` before
    substituting ``$result[...]``, so values are fully percent-encoded.
    """
    pairs: list[tuple[str, str]] = []

    def walk(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{name}[{key}]", item)
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(f"{name}[{index}]", item)
        elif isinstance(value, bool):
            pairs.append((name, "Y" if value else "N"))
        elif value is None:
            pairs.append((name, ""))
        else:
            pairs.append((name, str(value)))

    for key, value in params.items():
        walk(str(key), value)
    return "&".join(f"{quote(k, safe='[]')}={quote(v, safe='')}" for k, v in pairs)


def classify(
    status: int | None,
    code: str,
    description: str,
    *,
    what: str,
    retry_after: float | None = None,
) -> DeliveryError:
    """The one place a Bitrix24 error becomes a syncd error.

    ``status`` is None for a command inside a batch (the batch itself was HTTP 200).
    """
    detail = ": ".join(part for part in (code, description) if part) or f"HTTP {status}"
    text = f"Bitrix24 {what}: {detail}"
    lowered = description.lower()
    if code == "QUERY_LIMIT_EXCEEDED":
        return RateLimited(text, status_code=status, retry_after=retry_after or QUERY_LIMIT_RETRY)
    if code == "OPERATION_TIME_LIMIT":
        return RateLimited(text, status_code=status, retry_after=retry_after or OPERATING_RETRY)
    if code == "OVERLOAD_LIMIT":
        return RateLimited(text, status_code=status, retry_after=max(retry_after or 0, 600.0))
    if code in SERVER_CODES or (status is not None and (status >= 500 or status in (408, 425))):
        return ServerError(text, status_code=status, retry_after=retry_after)
    if code in ACCESS_CODES or lowered.startswith("access denied"):
        return AccessDenied(text, status_code=status)
    if code in NOT_FOUND_CODES or "not found" in lowered:
        return NotFound(text, status_code=status)
    if status in (401, 403):
        return AccessDenied(text, status_code=status)
    if status == 429:
        return RateLimited(text, status_code=status, retry_after=retry_after)
    if status == 404:
        return NotFound(text, status_code=status)
    return Rejected(text, status_code=status)


def split_name(name: str | None) -> dict[str, str]:
    """``NAME`` and ``LAST_NAME`` from one display name: first word, then the rest."""
    words = (name or "").split()
    if not words:
        return {}
    if len(words) == 1:
        return {"NAME": words[0]}
    return {"NAME": words[0], "LAST_NAME": " ".join(words[1:])}


def _as_map(value: Any) -> dict[str, Any]:
    """PHP serialises an empty map as ``[]`` and a 0..n-1 map as a list."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return {}


def _number(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _error_parts(data: Any) -> tuple[str, str] | None:
    if isinstance(data, dict) and "error" in data:
        return str(data.get("error") or ""), str(data.get("error_description") or "")
    return None


def _reset_at(data: Any) -> float | None:
    """``operating_reset_at`` from a response (its ``time`` object, or the top level)."""
    if not isinstance(data, dict):
        return None
    for holder in (data.get("time"), data):
        if isinstance(holder, dict) and isinstance(holder.get("operating_reset_at"), int | float):
            return float(holder["operating_reset_at"])
    return None


# --- the connector ------------------------------------------------------------------------


@dataclass
class _Command:
    name: str
    method: str
    params: dict[str, Any]
    #: Called with the command's result once Bitrix24 confirmed it.
    done: Callable[[Any], Awaitable[None]]


@dataclass
class _Writes:
    """The writes one plan needs, sent together once every intent is durable."""

    commands: list[_Command] = field(default_factory=list)
    #: Plan key -> CRM id, or ``$result[name]`` for a record this batch creates.
    ids: dict[str, str] = field(default_factory=dict)

    def add(
        self,
        name: str,
        method: str,
        params: dict[str, Any],
        done: Callable[[Any], Awaitable[None]],
    ) -> str:
        self.commands.append(_Command(name, method, params, done))
        return f"$result[{name}]"


@dataclass(frozen=True)
class _ContactHit:
    crm_id: str
    #: The contact's e-mails and phones as syncd normalizes them, so updates add only new ones.
    values: frozenset[str]
    #: Whether it has a name already: a found contact's name is filled in, never replaced.
    named: bool = True


class Bitrix24Connector(Connector):
    """Contacts, deals and timeline comments in one Bitrix24 portal."""

    kind = "bitrix24"
    settings_model = Bitrix24Settings
    settings: Bitrix24Settings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self._client = httpx.AsyncClient(
            timeout=self.timeout,
            transport=self.transport,
            headers={"Accept": "application/json", "User-Agent": "syncd"},
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        )
        #: Paces this connector's requests below the portal's leaky bucket.
        self.throttle = TokenBucket(s.rate_per_second, s.burst)
        #: Concurrent deliveries share requests while they wait for the limit.
        self._shared = SharedBatches(
            acquire=self._pace,
            call=partial(self._call, paced=False),
            batch=partial(self._batch, paced=False),
            limit=BATCH_LIMIT,
        )
        if s.webhook_url is not None:
            url = s.webhook_url.get_secret_value()
            self._endpoint = url.rstrip("/") + "/"
            parts = urlsplit(url)
            self._portal = f"{parts.scheme}://{parts.netloc}"
        else:
            assert s.portal_url is not None
            self._portal = s.portal_url.rstrip("/")
            self._endpoint = self._portal + "/rest/"
        self._access: str | None = s.access_token.get_secret_value() if s.access_token else None
        self._refresh_token: str | None = (
            s.refresh_token.get_secret_value() if s.refresh_token else None
        )
        self._seed = token_seed(self._refresh_token) if self._refresh_token else None
        self._loaded = s.mode == "webhook"
        self._auth_lock = asyncio.Lock()
        #: A refused refresh, raised again without asking: the refresh token will not heal.
        self._refused: AccessDenied | None = None
        #: Last ``operating_reset_at`` seen per method, for an OPERATION_TIME_LIMIT without one.
        self._operating_reset: dict[str, float] = {}
        redactor.add(self._secrets())

    # --- secrets and transport -------------------------------------------------------

    def _secrets(self) -> list[str]:
        s = self.settings
        found = [self._access or "", self._refresh_token or ""]
        if s.client_secret is not None:
            found.append(s.client_secret.get_secret_value())
        if s.webhook_url is not None:
            url = s.webhook_url.get_secret_value()
            found.append(url)
            found.append(url.rstrip("/"))
            found.append(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
        return [v for v in found if v]

    def _scrub(self, text: str) -> str:
        for secret in sorted(self._secrets(), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    @asynccontextmanager
    async def _network(self) -> AsyncIterator[None]:
        """httpx failures as syncd errors, with no URL or token left in their text."""
        try:
            async with classified():
                yield
        except DeliveryError as exc:
            exc.message = self._scrub(exc.message)
            exc.args = (exc.message,)
            raise

    def _error(
        self, status: int | None, code: str, description: str, *, what: str, method: str
    ) -> DeliveryError:
        retry_after: float | None = None
        if code == "OPERATION_TIME_LIMIT":
            reset = self._operating_reset.get(method, 0.0) - time.time()
            retry_after = reset if reset > 0 else None
        error = classify(status, code, self._scrub(description), what=what, retry_after=retry_after)
        if isinstance(error, ServerError) and status is not None and status != 503:
            # A 500 may have run the write before failing: the next attempt must look first.
            error.outcome_unknown = True
        return error

    def _note_time(self, method: str, data: Any) -> None:
        reset = _reset_at(data)
        if reset is not None:
            self._operating_reset[method] = reset

    # --- OAuth tokens --------------------------------------------------------------------

    async def _token(self) -> str:
        """The access token to send, loading the stored pair on first use."""
        if not self._loaded:
            async with self._auth_lock:
                if not self._loaded:
                    await self._load_tokens()
        if self._access is None:
            await self._refresh(None)
        assert self._access is not None
        return self._access

    async def _load_tokens(self) -> None:
        stored = await self.credentials.load() if self.credentials is not None else None
        # A stored pair wins over the config, unless the config holds a newer seed:
        # the operator re-authorized the app and pasted fresh tokens.
        if stored and stored.get("refresh_token") and stored.get("seed") in (None, self._seed):
            self._access = str(stored["access_token"]) if stored.get("access_token") else None
            self._refresh_token = str(stored["refresh_token"])
            redactor.add(self._secrets())
        self._loaded = True

    async def _refresh(self, stale: str | None) -> None:
        """Trade the refresh token for a new pair, once, however many requests saw it expire."""
        async with self._auth_lock:
            if self._access is not None and self._access != stale:
                return  # another request refreshed while this one waited
            if self._refused is not None:
                raise AccessDenied(self._refused.message, status_code=self._refused.status_code)
            s = self.settings
            if self._refresh_token is None or s.client_secret is None:
                raise AccessDenied("Bitrix24 OAuth: the access token expired and no refresh token")
            params = {
                "grant_type": "refresh_token",
                "client_id": s.client_id or "",
                "client_secret": s.client_secret.get_secret_value(),
                "refresh_token": self._refresh_token,
            }
            async with self._network():
                response = await self._client.get(s.token_url, params=params)
            data = _json(response)
            problem = _error_parts(data)
            if problem is None and response.status_code < 400 and not isinstance(data, dict):
                raise ServerError(
                    f"Bitrix24 OAuth refresh: HTTP {response.status_code} without JSON",
                    status_code=response.status_code,
                )
            if response.status_code >= 400 or problem is not None or not isinstance(data, dict):
                code, description = problem or ("", "")
                status = response.status_code
                error = classify(
                    status if status >= 400 else None,
                    code,
                    self._scrub(description),
                    what="OAuth refresh",
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                )
                if not error.retriable or status < 400:
                    # A refused refresh never heals (invalid_grant: the token was used or revoked).
                    error = AccessDenied(
                        f"Bitrix24 OAuth refresh refused: {code or f'HTTP {status}'}"
                        + (f": {self._scrub(description)}" if description else "")
                        + "; authorize the application again and put the new tokens in the config",
                        status_code=status,
                    )
                    self._refused = error
                raise error
            access, refresh = data.get("access_token"), data.get("refresh_token")
            if not isinstance(access, str) or not isinstance(refresh, str):
                raise ServerError("Bitrix24 OAuth refresh answered without a token pair")
            expires_in = data.get("expires_in")
            saved: dict[str, Any] = {
                "access_token": access,
                "refresh_token": refresh,
                "expires_at": time.time() + float(expires_in)
                if isinstance(expires_in, int | float)
                else None,
                "seed": self._seed,
            }
            redactor.add([access, refresh])
            # Durable first: the old refresh token is spent, a crash now must not lose the new one.
            if self.credentials is not None:
                await self.credentials.save(saved)
            self._access, self._refresh_token = access, refresh

    # --- calls -------------------------------------------------------------------------------

    async def _call(
        self, method: str, params: Mapping[str, Any], *, paced: bool = True
    ) -> dict[str, Any]:
        """One REST request; the whole envelope on success, a DeliveryError otherwise.

        ``paced=False``: the caller has already waited for the rate limit.
        """
        refreshed = False
        while True:
            body = dict(params)
            token: str | None = None
            if self.settings.mode == "oauth":
                token = await self._token()
                body["auth"] = token
            suffix = ".json" if self.settings.mode == "webhook" else ""
            if paced or refreshed:
                await self.throttle.acquire()
            async with self._network():
                response = await self._client.post(self._endpoint + method + suffix, json=body)
            data = _json(response)
            problem = _error_parts(data)
            if response.is_success and problem is None and isinstance(data, dict):
                self._note_time(method, data)
                return data
            status = response.status_code
            code, description = problem or ("", "")
            if code == "expired_token" and token is not None and not refreshed:
                await self._refresh(token)
                refreshed = True
                continue
            if code == "QUERY_LIMIT_EXCEEDED":
                self.throttle.exhaust()
            if code == "OPERATION_TIME_LIMIT":
                self._note_time(method, data)
            if problem is None and response.is_success:
                error: DeliveryError = ServerError(
                    f"Bitrix24 {method}: HTTP {status} without a JSON result", status_code=status
                )
                error.outcome_unknown = True
                raise error
            raise self._error(
                status, code, description or response.reason_phrase, what=method, method=method
            )

    async def _batch(
        self,
        calls: Mapping[str, tuple[str, Mapping[str, Any]]],
        *,
        halt: bool = True,
        paced: bool = True,
    ) -> tuple[dict[str, Any], dict[str, DeliveryError]]:
        """Several commands in one request: their results and their errors, by name."""
        cmd = {name: f"{method}?{php_query(params)}" for name, (method, params) in calls.items()}
        data = await self._call("batch", {"halt": 1 if halt else 0, "cmd": cmd}, paced=paced)
        outer = data.get("result")
        outer = outer if isinstance(outer, dict) else {}
        results = _as_map(outer.get("result"))
        times = _as_map(outer.get("result_time"))
        errors: dict[str, DeliveryError] = {}
        for name, raw in _as_map(outer.get("result_error")).items():
            code, description = _error_parts(raw) or ("", str(raw))
            method = calls[name][0] if name in calls else "batch"
            errors[name] = self._error(None, code, description, what=method, method=method)
        for name, spent in times.items():
            if name in calls:
                self._note_time(calls[name][0], spent)
        return results, errors

    async def _send(self, commands: list[_Command]) -> None:
        """Run writes in order, in as few requests as possible; stop at the first failure.

        Every confirmed command's ``done`` runs (links get recorded) even when a
        later one fails, so the retry does not look up what is already known.
        """
        results: dict[str, Any] = {}
        for start in range(0, len(commands), BATCH_LIMIT):
            chunk = commands[start : start + BATCH_LIMIT]
            for command in chunk:
                command.params = _resolved(command.params, results)
            got, errors = await self._shared.run({c.name: (c.method, c.params) for c in chunk})
            failure: DeliveryError | None = None
            for command in chunk:
                if command.name in errors:
                    failure = failure or errors[command.name]
                elif command.name in got:
                    results[command.name] = got[command.name]
                    await command.done(got[command.name])
            if failure is not None:
                raise failure
            if any(c.name not in got for c in chunk):
                raise ServerError("Bitrix24 batch: some commands were neither run nor refused")

    # --- the plan --------------------------------------------------------------------------

    async def execute(self, plan: Plan, ctx: DeliveryContext) -> None:
        prefetch = getattr(ctx.links, "prefetch", None)
        if prefetch is not None:
            # Every link this plan may read, in one round trip to the store.
            await prefetch(_link_keys(plan))
        writes = _Writes()
        for index, op in enumerate(plan.operations):
            if isinstance(op, UpsertContact):
                await self._plan_contact(op, f"contact{index}", ctx, writes)
            elif isinstance(op, UpsertDeal):
                await self._plan_deal(op, f"deal{index}", ctx, writes)
            else:
                await self._plan_note(op, f"note{index}", ctx, writes)
        if writes.commands:
            await self._send(writes.commands)

    async def _plan_contact(
        self, op: UpsertContact, name: str, ctx: DeliveryContext, writes: _Writes
    ) -> None:
        link = await self._linked_contact(op, ctx)
        hit: _ContactHit | None = None
        if link is not None and link.crm_id is None:
            if link.owner_busy:
                raise _contended("contact", op.key)
            hit = await self._find_contact(op.key, op.emails, op.phones)
        elif link is None:
            # A manager may have typed the client in already: look before creating.
            hit = await self._find_contact(op.key, op.emails, op.phones)
        if hit is not None:
            await ctx.links.record(
                "contact", op.key, hit.crm_id, self.record_url("contact", hit.crm_id)
            )
            link = LinkRef(crm_id=hit.crm_id)

        async def remember(crm_id: str) -> None:
            if op.identities:
                await ctx.links.record_identities("contact", op.identities, crm_id)

        if link is not None and link.crm_id is not None:
            crm_id = link.crm_id
            writes.ids[op.key] = crm_id
            fields = await self._contact_changes(op, hit, ctx)
            if not fields:
                await remember(crm_id)
                return

            async def updated(_result: Any) -> None:
                await remember(crm_id)

            writes.add(
                name, "crm.contact.update", {"id": _number(crm_id), "fields": fields}, updated
            )
            return
        if link is None and not await ctx.links.intend("contact", op.key):
            raise _contended("contact", op.key)

        async def created(result: Any) -> None:
            crm_id = str(result)
            await ctx.links.record("contact", op.key, crm_id, self.record_url("contact", crm_id))
            await remember(crm_id)

        writes.ids[op.key] = writes.add(
            name, "crm.contact.add", {"fields": self._contact_fields(op)}, created
        )

    async def _linked_contact(self, op: UpsertContact, ctx: DeliveryContext) -> LinkRef | None:
        link = await ctx.links.get("contact", op.key)
        if link is not None:
            return link
        for identity in op.identities:
            other = await ctx.links.get("contact", identity)
            if other is not None and other.crm_id is not None:
                # Same person under another key (a new helpdesk id, a changed e-mail).
                await ctx.links.record("contact", op.key, other.crm_id, other.url)
                return other
        return None

    def _contact_fields(self, op: UpsertContact) -> dict[str, Any]:
        fields: dict[str, Any] = split_name(op.name) or {
            "NAME": next(iter((*op.emails, *op.phones)), "Client")
        }
        if op.emails:
            fields["EMAIL"] = [{"VALUE": e, "VALUE_TYPE": "WORK"} for e in op.emails]
        if op.phones:
            fields["PHONE"] = [{"VALUE": p, "VALUE_TYPE": "WORK"} for p in op.phones]
        if op.responsible_id is not None:
            fields["ASSIGNED_BY_ID"] = _number(op.responsible_id)
        fields["ORIGINATOR_ID"] = self.settings.originator_id
        fields["ORIGIN_ID"] = op.key
        fields.update(op.fields)
        return fields

    async def _contact_changes(
        self, op: UpsertContact, hit: _ContactHit | None, ctx: DeliveryContext
    ) -> dict[str, Any]:
        """What an update sends: little, since managers edit contacts too.

        The name only when a contact found by e-mail or phone has none. New
        e-mails and phones only, because Bitrix24 appends every value sent: a
        value is known to be there when the look-up just read it, or when an
        identity link says syncd already sent it to a contact.
        """
        present = hit.values if hit is not None else frozenset()
        fields: dict[str, Any] = {}
        if hit is not None and not hit.named:
            fields.update(split_name(op.name))
        for multi, prefix, values in (("EMAIL", "email", op.emails), ("PHONE", "phone", op.phones)):
            new = []
            for value in values:
                if value in present:
                    continue
                known = await ctx.links.get("contact", f"{prefix}:{value}")
                if known is not None and known.crm_id is not None:
                    continue
                new.append({"VALUE": value, "VALUE_TYPE": "WORK"})
            if new:
                fields[multi] = new
        fields.update(op.fields)
        return fields

    async def _plan_deal(
        self, op: UpsertDeal, name: str, ctx: DeliveryContext, writes: _Writes
    ) -> None:
        link = await ctx.links.get("deal", op.key)
        crm_id = link.crm_id if link is not None else None
        if link is not None and crm_id is None:
            if link.owner_busy:
                raise _contended("deal", op.key)
            found = await self._find_deal(op.key)
            if found is not None:
                crm_id = found
                await ctx.links.record("deal", op.key, crm_id, self.record_url("deal", crm_id))
        if crm_id is not None:
            writes.ids[op.key] = crm_id
            fields = self._deal_changes(op)
            if fields:
                writes.add(
                    name, "crm.deal.update", {"id": _number(crm_id), "fields": fields}, _noop
                )
            return
        contact_id = await self._resolve(op.contact_key, ("contact",), ctx, writes)
        if link is None and not await ctx.links.intend("deal", op.key):
            raise _contended("deal", op.key)

        async def created(result: Any) -> None:
            new_id = str(result)
            await ctx.links.record("deal", op.key, new_id, self.record_url("deal", new_id))

        writes.ids[op.key] = writes.add(
            name, "crm.deal.add", {"fields": self._deal_fields(op, contact_id)}, created
        )

    def _deal_fields(self, op: UpsertDeal, contact_id: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"TITLE": op.title or op.fallback_title or op.key}
        if op.pipeline_id is not None:
            fields["CATEGORY_ID"] = _number(op.pipeline_id)
        if op.stage_id is not None:
            fields["STAGE_ID"] = op.stage_id
        if op.responsible_id is not None:
            fields["ASSIGNED_BY_ID"] = _number(op.responsible_id)
        if contact_id is not None:
            fields["CONTACT_ID"] = _number(contact_id)
        fields["ORIGINATOR_ID"] = self.settings.originator_id
        fields["ORIGIN_ID"] = op.key
        fields.update(op.fields)
        return fields

    @staticmethod
    def _deal_changes(op: UpsertDeal) -> dict[str, Any]:
        """An update leaves the funnel and the contacts alone; the stage moves only when told."""
        fields: dict[str, Any] = {}
        if op.title is not None:
            fields["TITLE"] = op.title
        if op.move_stage and op.stage_id is not None:
            fields["STAGE_ID"] = op.stage_id
        if op.responsible_id is not None:
            fields["ASSIGNED_BY_ID"] = _number(op.responsible_id)
        fields.update(op.fields)
        return fields

    async def _plan_note(
        self, op: AddNote, name: str, ctx: DeliveryContext, writes: _Writes
    ) -> None:
        link = await ctx.links.get("note", op.key)
        if link is not None and link.crm_id is not None:
            return  # written before: a note is never edited
        parent = await self._resolve(op.parent_key, (op.parent_entity,), ctx, writes)
        if parent is None:
            raise Rejected(
                f"note {op.key}: its {op.parent_entity} {op.parent_key} is not in Bitrix24"
            )
        if link is not None:
            if link.owner_busy:
                raise _contended("note", op.key)
            if not parent.startswith("$"):
                found = await self._find_note(op.key, parent, op.parent_entity)
                if found is not None:
                    await ctx.links.record("note", op.key, found, None)
                    return
        elif not await ctx.links.intend("note", op.key):
            raise _contended("note", op.key)

        async def created(result: Any) -> None:
            await ctx.links.record("note", op.key, str(result), None)

        fields = {
            "ENTITY_ID": parent if parent.startswith("$") else _number(parent),
            "ENTITY_TYPE": op.parent_entity,
            "COMMENT": f"{op.text}\n\n{note_marker(op.key)}",
        }
        # Lower-case "fields": this method, unlike the older CRM ones, takes no other spelling.
        writes.add(name, "crm.timeline.comment.add", {"fields": fields}, created)

    async def _resolve(
        self, key: str | None, entities: tuple[str, ...], ctx: DeliveryContext, writes: _Writes
    ) -> str | None:
        """A record's id from this plan (maybe a ``$result`` reference) or from the links."""
        if key is None:
            return None
        if key in writes.ids:
            return writes.ids[key]
        for entity in entities:
            ref = await ctx.links.get(entity, key)
            if ref is not None and ref.crm_id is not None:
                return ref.crm_id
            if ref is not None and ref.owner_busy:
                raise _contended(entity, key)
        return None

    # --- look-ups ------------------------------------------------------------------------------

    async def find(self, op: Upsert, parent_id: str | None) -> LinkRef | None:
        if op.entity == "contact":
            emails = tuple(str(e) for e in op.fields.get("emails") or ())
            phones = tuple(str(p) for p in op.fields.get("phones") or ())
            hit = await self._find_contact(op.external_key, emails, phones)
            return LinkRef(hit.crm_id, self.record_url("contact", hit.crm_id)) if hit else None
        if op.entity == "deal":
            crm_id = await self._find_deal(op.external_key)
            return LinkRef(crm_id, self.record_url("deal", crm_id)) if crm_id else None
        if op.entity == "note" and parent_id is not None:
            entity = str(op.fields.get("parent_entity") or "deal")
            note = await self._find_note(op.external_key, parent_id, entity)
            return LinkRef(note) if note else None
        return None

    async def _find_contact(
        self, key: str, emails: Iterable[str], phones: Iterable[str]
    ) -> _ContactHit | None:
        """The contact syncd created under ``key``, else one whose e-mail or phone is exactly ours.

        crm.duplicate.findbycomm finds candidates (it matches phones loosely);
        each candidate's values are then read and compared after normalizing.
        """
        emails = [e for e in (normalize_email(v) for v in emails) if e]
        phones = [p for p in (self._phone(v) for v in phones) if p]
        select = ["ID", "NAME", "LAST_NAME", "EMAIL", "PHONE"]
        calls: dict[str, tuple[str, Mapping[str, Any]]] = {
            "origin": (
                "crm.contact.list",
                {
                    "filter": {"ORIGINATOR_ID": self.settings.originator_id, "ORIGIN_ID": key},
                    "select": select,
                    "order": {"ID": "ASC"},
                },
            )
        }
        for kind, values in (("EMAIL", emails), ("PHONE", phones)):
            if values:
                calls[kind.lower()] = (
                    "crm.duplicate.findbycomm",
                    {"type": kind, "values": values[:FINDBYCOMM_LIMIT], "entity_type": "CONTACT"},
                )
        results, errors = await self._shared.run(calls)
        if errors:
            raise next(iter(errors.values()))
        origin = results.get("origin")
        if isinstance(origin, list) and origin:
            return self._hit(origin[0])
        candidates: set[int] = set()
        for kind in ("email", "phone"):
            found = _as_map(results.get(kind)).get("CONTACT")
            candidates.update(int(i) for i in (found or []) if str(i).isdigit())
        if not candidates:
            return None
        listed = await self._one(
            "crm.contact.list",
            {"filter": {"@ID": sorted(candidates)}, "select": select, "order": {"ID": "ASC"}},
        )
        rows = [self._hit(row) for row in listed or [] if isinstance(row, dict)]
        for wanted in (set(emails), set(phones)):
            matching = [h for h in rows if h.values & wanted]
            if matching:
                return min(matching, key=lambda h: int(h.crm_id) if h.crm_id.isdigit() else 0)
        return None

    def _phone(self, raw: str) -> str | None:
        return normalize_phone(raw, self.settings.default_country)

    def _hit(self, row: Mapping[str, Any]) -> _ContactHit:
        values: set[str] = set()
        for item in row.get("EMAIL") or []:
            email = (
                normalize_email(str(item.get("VALUE") or "")) if isinstance(item, dict) else None
            )
            if email:
                values.add(email)
        for item in row.get("PHONE") or []:
            phone = self._phone(str(item.get("VALUE") or "")) if isinstance(item, dict) else None
            if phone:
                values.add(phone)
        named = bool(str(row.get("NAME") or "").strip() or str(row.get("LAST_NAME") or "").strip())
        return _ContactHit(str(row.get("ID")), frozenset(values), named)

    async def _pace(self) -> float:
        """Wait for the throttle (looked up each time: tests and reloads may swap it)."""
        return await self.throttle.acquire()

    async def _one(self, method: str, params: Mapping[str, Any]) -> Any:
        """One command's result, through the shared requests."""
        results, errors = await self._shared.run({"one": (method, params)})
        if errors:
            raise next(iter(errors.values()))
        if "one" not in results:
            raise ServerError(f"Bitrix24 {method}: the batch neither ran nor refused it")
        return results["one"]

    async def _find_deal(self, key: str) -> str | None:
        rows = await self._one(
            "crm.deal.list",
            {
                "filter": {"ORIGINATOR_ID": self.settings.originator_id, "ORIGIN_ID": key},
                "select": ["ID"],
                "order": {"ID": "ASC"},
            },
        )
        rows = rows or []
        return str(rows[0]["ID"]) if rows and isinstance(rows[0], dict) else None

    async def _find_note(self, key: str, parent_id: str, entity: str) -> str | None:
        """Newest comments first: the one looked for was written moments ago, if at all."""
        marker = note_marker(key)
        start = 0
        for _ in range(NOTE_SCAN_PAGES):
            data = await self._call(
                "crm.timeline.comment.list",
                {
                    "filter": {"ENTITY_ID": _number(parent_id), "ENTITY_TYPE": entity},
                    "select": ["ID", "COMMENT"],
                    "order": {"ID": "DESC"},
                    "start": start,
                },
            )
            for row in data.get("result") or []:
                if isinstance(row, dict) and marker in str(row.get("COMMENT") or ""):
                    return str(row["ID"])
            following = data.get("next")
            if not isinstance(following, int):
                return None
            start = following
        return None

    # --- the rest of the interface ---------------------------------------------------------

    async def check(self) -> list[str]:
        calls: dict[str, tuple[str, Mapping[str, Any]]] = {
            "profile": ("profile", {}),
            "scope": ("scope", {}),
            "deal": ("crm.deal.fields", {}),
            "contact": ("crm.contact.fields", {}),
        }
        results, errors = await self._batch(calls, halt=False)
        for name in ("deal", "contact"):
            if name in errors:
                raise errors[name]
        lines = []
        profile = results.get("profile")
        if isinstance(profile, dict) and profile.get("ID"):
            who = " ".join(str(profile.get(k) or "") for k in ("NAME", "LAST_NAME")).strip()
            lines.append(
                f"authenticated ({self.settings.mode}) as user {profile['ID']}"
                + (f" ({who})" if who else "")
            )
        else:
            lines.append(f"authenticated ({self.settings.mode})")
        scopes = results.get("scope")
        if isinstance(scopes, list):
            if "crm" not in scopes:
                raise AccessDenied("Bitrix24: the webhook or application lacks the crm scope")
            lines.append(f"scopes: {', '.join(sorted(str(s) for s in scopes))}")
        for name in ("deal", "contact"):
            count = len(_as_map(results.get(name)))
            lines.append(f"crm.{name}: {count} fields readable; crm scope grants write")
        return lines

    def record_url(self, entity: str, crm_id: str) -> str | None:
        if entity not in ("deal", "contact", "lead", "company") or crm_id.startswith("$"):
            return None
        return f"{self._portal}/crm/{entity}/details/{crm_id}/"

    async def aclose(self) -> None:
        await self._shared.aclose()
        await self._client.aclose()


def token_seed(refresh_token: str) -> str:
    """A fingerprint of the configured refresh token, stored beside the pair it led to.

    When the config later holds a different refresh token, the operator
    re-authorized the application: the configured pair then wins over the stored one.
    """
    return hashlib.sha256(refresh_token.encode()).hexdigest()[:16]


def note_marker(key: str) -> str:
    """Written at the end of every comment syncd posts, so a retry can tell it is there."""
    return f"[syncd:{key}]"


def _link_keys(plan: Plan) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for op in plan.operations:
        if isinstance(op, UpsertContact):
            keys += [("contact", k) for k in (op.key, *op.identities)]
            keys += [("contact", f"email:{e}") for e in op.emails]
            keys += [("contact", f"phone:{p}") for p in op.phones]
        elif isinstance(op, UpsertDeal):
            keys.append(("deal", op.key))
            if op.contact_key is not None:
                keys.append(("contact", op.contact_key))
        else:
            keys += [("note", op.key), (op.parent_entity, op.parent_key)]
    return list(dict.fromkeys(keys))


def _contended(entity: str, key: str) -> Contended:
    return Contended(f"{entity} {key} is being created by another delivery", retry_after=1.0)


async def _noop(_result: Any) -> None:
    return None


def _resolved(value: Any, results: Mapping[str, Any]) -> Any:
    """``$result[name]`` replaced by the result of a command already run in an earlier request."""
    if isinstance(value, str):
        match = _RESULT_REF.fullmatch(value)
        if match and match.group(1) in results:
            return results[match.group(1)]
        return value
    if isinstance(value, dict):
        return {k: _resolved(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolved(v, results) for v in value]
    return value


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
