"""Generic REST target: any HTTP API that can create, update and find a record.

Two ways to describe the API, per entity (contact, deal, note):

* **The generic form** (the default, used for every entity without its own
  templates): one ``create``/``update``/``lookup`` request template for all
  entities. Strings in it may contain ``$name`` placeholders
  (``string.Template``: no attribute access, so a template cannot reach into
  Python objects); a string that is exactly ``$name`` is replaced by the value
  itself, keeping its JSON type. Placeholders: ``$entity``, ``$external_key``,
  ``$fields`` (the whole dict), ``$parent_id``, ``$id`` (the CRM id, for
  update), ``$idempotency_key``, and every field of the operation by name.

* **Per-entity templates** (``[destinations.<name>.entities.<entity>]``): the
  entity's own path, method, query parameters and JSON body, written as Jinja2
  templates rendered in a sandbox, and a dotted path to the new record's id in
  the answer. A body value that is exactly one ``{{ expression }}`` keeps the
  expression's JSON type, and is left out of the body when the expression is
  undefined (so an update never blanks what this event does not know). The id
  of a record made earlier in the same plan is visible to the next one:
  ``{{ contact.crm_id }}`` in a deal's body, ``{{ deal.crm_id }}`` in a note's.

Templates and id paths are checked when the config is loaded, so a typo is a
config error naming its key, not a failed delivery.
"""

from __future__ import annotations

import json
import re
import string
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import httpx
from jinja2 import (
    StrictUndefined,
    TemplateError,
    TemplateSyntaxError,
    Undefined,
    UndefinedError,
    meta,
)
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from syncd.connectors.base import Created, DeliveryContext, LinkRef, RecordConnector
from syncd.connectors.http import classified, error_for_response
from syncd.connectors.transport import AiohttpTransport, Answer
from syncd.dotted import dig
from syncd.errors import Rejected
from syncd.logs import redactor
from syncd.mapping import Plan, Upsert

_DEFAULT_BODY: dict[str, Any] = {
    "entity": "$entity",
    "external_key": "$external_key",
    "parent_id": "$parent_id",
    "fields": "$fields",
}

#: The entities a plan is made of (see :meth:`Plan.records`).
ENTITIES = ("contact", "deal", "note")
#: What a per-entity template may use.
TEMPLATE_VARIABLES = frozenset(
    {
        "entity",
        "external_key",
        "fields",
        "crm_id",
        "parent_id",
        "idempotency_key",
        "contact",
        "deal",
        "parent",
    }
)
_ID_PATH = re.compile(r"[A-Za-z0-9_$@-]+(\.[A-Za-z0-9_$@-]+)*")
_SINGLE_EXPRESSION = re.compile(r"\s*\{\{(?P<expr>(?:(?!\{\{|\}\}).)*)\}\}\s*", re.DOTALL)


def _finalize(value: Any) -> Any:
    # A missing value renders as nothing, not as the word "None".
    return "" if value is None else value


#: Bodies and query parameters.
_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, finalize=_finalize)
#: Paths: every value put into a path is percent-encoded ("hd:ticket:1" -> "hd%3Aticket%3A1").
_PATH_ENV = SandboxedEnvironment(
    undefined=StrictUndefined,
    autoescape=False,
    finalize=lambda value: quote(str(_finalize(value)), safe=""),
)


class RequestTemplate(BaseModel):
    """The generic form: ``$name`` placeholders, one template for every entity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["GET", "POST", "PUT", "PATCH"] = "POST"
    path: str
    body: dict[str, Any] | None = None


class EntityRequest(BaseModel):
    """One request of one entity, in Jinja2 (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    #: Appended to base_url; values put into it are percent-encoded.
    path: str
    #: Query parameters; a parameter whose value is undefined is left out.
    params: dict[str, str] = Field(default_factory=dict)
    #: The JSON body: a table (or array) whose strings are templates.
    body: dict[str, Any] | list[Any] | None = None
    #: Dotted path to the record's id in the answer; the entity's ``id`` when left out.
    id: str | None = None


class EntityTemplates(BaseModel):
    """``[destinations.<name>.entities.<entity>]``: how one entity is created, updated, found."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    create: EntityRequest
    #: Left out: a record that exists already is not updated.
    update: EntityRequest | None = None
    #: Left out: a record is never looked up, so an unknown outcome may end in a duplicate.
    lookup: EntityRequest | None = None
    #: Dotted path to the new record's id in the create answer (``data.id``, ``result``).
    id: str = "id"


class RestAuth(BaseModel):
    """Credentials sent with every request; put the token in the environment or a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: "bearer": ``Authorization: Bearer <token>``; "header": ``<header>: <token>``.
    type: Literal["bearer", "header"] = "bearer"
    token: SecretStr
    header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$")

    @model_validator(mode="after")
    def _header_for_header_type(self) -> RestAuth:
        if self.type == "header" and self.header is None:
            raise _problems("RestAuth", [(("header",), 'type = "header" needs the header name')])
        if self.type == "bearer" and self.header is not None:
            raise _problems(
                "RestAuth", [(("header",), 'only for type = "header"; bearer uses Authorization')]
            )
        return self

    def as_header(self) -> tuple[str, str]:
        token = self.token.get_secret_value()
        if self.type == "bearer":
            return "Authorization", f"Bearer {token}"
        assert self.header is not None
        return self.header, token


class RestSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(pattern=r"^https?://")
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    auth: RestAuth | None = None
    create: RequestTemplate = RequestTemplate(method="POST", path="/records", body=_DEFAULT_BODY)
    update: RequestTemplate | None = RequestTemplate(
        method="PATCH", path="/records/$id", body=_DEFAULT_BODY
    )
    lookup: RequestTemplate | None = RequestTemplate(
        method="GET", path="/records?entity=$entity&external_key=$external_key"
    )
    #: Dotted path to the new record's id in the create (and lookup) response.
    id_field: str = "id"
    idempotency_header: str = "Idempotency-Key"
    #: Link to a record in the target's own UI, for the monitor; may use $id and $entity.
    record_url: str | None = None
    #: Per-entity templates; an entity left out uses the generic form above.
    entities: dict[str, EntityTemplates] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _templates_compile(self) -> RestSettings:
        problems: list[tuple[tuple[str, ...], str]] = []
        if not _ID_PATH.fullmatch(self.id_field):
            problems.append((("id_field",), _bad_id_path(self.id_field)))
        for entity, templates in self.entities.items():
            if entity not in ENTITIES:
                problems.append(
                    (("entities", entity), f"unknown entity (known: {', '.join(ENTITIES)})")
                )
            if not _ID_PATH.fullmatch(templates.id):
                problems.append((("entities", entity, "id"), _bad_id_path(templates.id)))
            for action in ("create", "update", "lookup"):
                request: EntityRequest | None = getattr(templates, action)
                if request is None:
                    continue
                where = ("entities", entity, action)
                if request.id is not None and not _ID_PATH.fullmatch(request.id):
                    problems.append(((*where, "id"), _bad_id_path(request.id)))
                problems += _check_template(request.path, (*where, "path"), path=True)
                for name, value in request.params.items():
                    problems += _check_template(value, (*where, "params", name))
                problems += _check_body(request.body, (*where, "body"))
        if problems:
            raise _problems("RestSettings", problems)
        return self


def _bad_id_path(value: str) -> str:
    return (
        f"{value!r} is not a dotted path to the id in the answer "
        "(like id, data.id, result or data.0.id)"
    )


def _problems(title: str, problems: list[tuple[tuple[str, ...], str]]) -> ValidationError:
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(type=PydanticCustomError("template", message), loc=loc, input=None)
            for loc, message in problems
        ],
    )


def _check_body(value: Any, where: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
    if isinstance(value, str):
        return _check_template(value, where)
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _check_body(v, (*where, str(k)))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _check_body(v, (*where, str(i)))]
    return []


def _check_template(
    source: str, where: tuple[str, ...], *, path: bool = False
) -> list[tuple[tuple[str, ...], str]]:
    env = _PATH_ENV if path else _ENV
    single = None if path else _SINGLE_EXPRESSION.fullmatch(source)
    try:
        if single is not None:
            env.compile_expression(single.group("expr"))
        else:
            env.from_string(source)
        used = meta.find_undeclared_variables(env.parse(source))
    except TemplateSyntaxError as exc:
        return [(where, f"template {source!r} does not compile: {exc.message}")]
    unknown = sorted(used - TEMPLATE_VARIABLES)
    if unknown:
        known = ", ".join(sorted(TEMPLATE_VARIABLES))
        return [(where, f"template {source!r} uses unknown {', '.join(unknown)} (known: {known})")]
    return []


@lru_cache(maxsize=1024)
def _template(source: str, path: bool) -> Any:
    return (_PATH_ENV if path else _ENV).from_string(source)


@lru_cache(maxsize=1024)
def _expression(source: str) -> Any:
    return _ENV.compile_expression(source, undefined_to_none=False)


class _Omit:
    """A body value whose expression is undefined: the key is left out."""


_OMIT = _Omit()


def _render_value(value: Any, variables: dict[str, Any], where: str) -> Any:
    if isinstance(value, str):
        try:
            single = _SINGLE_EXPRESSION.fullmatch(value)
            if single is not None:
                try:
                    result = _expression(single.group("expr"))(**variables)
                except UndefinedError:
                    return _OMIT  # e.g. fields.emails[0] for a client without e-mail
                if isinstance(result, Undefined):
                    return _OMIT
                return _plain(result)
            return str(_template(value, False).render(variables))
        except TemplateError as exc:
            raise Rejected(f"{where}: template {value!r} does not render: {exc}") from None
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            rendered = _render_value(item, variables, f"{where}.{key}")
            if not isinstance(rendered, _Omit):
                out[str(key)] = rendered
        return out
    if isinstance(value, list):
        items = [_render_value(v, variables, f"{where}.{i}") for i, v in enumerate(value)]
        return [v for v in items if not isinstance(v, _Omit)]
    return value


def _plain(value: Any) -> Any:
    """Tuples and other sequences from a template as JSON arrays."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _render(value: Any, variables: dict[str, Any]) -> Any:
    """The generic form's ``$name`` substitution."""
    if isinstance(value, str):
        if value.startswith("$") and value[1:].isidentifier() and value[1:] in variables:
            return variables[value[1:]]
        flat = {k: v for k, v in variables.items() if isinstance(v, str | int | float)}
        return string.Template(value).safe_substitute(flat)
    if isinstance(value, dict):
        return {k: _render(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, variables) for v in value]
    return value


#: A response, from either path (see :meth:`RestConnector._request`).
_Response = httpx.Response | Answer


@lru_cache(maxsize=4096)
def _merge_url(base: httpx.URL, path: str) -> str:
    """``path`` under ``base_url``, exactly as ``httpx.AsyncClient`` joins them."""
    url = httpx.URL(path)
    if url.is_relative_url:
        return str(base.copy_with(raw_path=base.raw_path + url.raw_path.lstrip(b"/")))
    return str(url)


#: The records this delivery has resolved so far, by entity: what ``{{ contact.crm_id }}``
#: reads. Set per ``execute``; each delivery runs in its own task, so its own context.
_RELATED: ContextVar[dict[str, dict[str, Any]] | None] = ContextVar("rest_related", default=None)


class RestConnector(RecordConnector):
    kind = "rest"
    settings_model = RestSettings
    settings: RestSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        headers = {k: v.get_secret_value() for k, v in self.settings.headers.items()}
        if self.settings.auth is not None:
            name, value = self.settings.auth.as_header()
            headers[name] = value
            token = self.settings.auth.token.get_secret_value()
            redactor.add([value, token] if token else [value])
        self._client = httpx.AsyncClient(
            base_url=self.settings.base_url,
            headers=headers,
            timeout=self.timeout,
            transport=self.transport,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
        )
        # Every request is built here, once, the way httpx builds it (its default
        # headers, then the configured ones). With the daemon's aiohttp transport it
        # is sent through aiohttp directly, skipping httpx's request and response
        # objects (about half the CPU of a delivery's request); with any other
        # transport (respx, tests) it goes through the httpx client above.
        self._base_url = self._client.base_url
        self._headers = dict(self._client.headers.multi_items())
        self._idempotency_header = self.settings.idempotency_header.lower()
        self._aiohttp = self.transport if isinstance(self.transport, AiohttpTransport) else None
        self._aiohttp_timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout, sock_read=self.timeout
        )

    # --- the plan ---------------------------------------------------------------

    async def execute(self, plan: Plan, ctx: DeliveryContext) -> None:
        token = _RELATED.set({})
        try:
            await super().execute(plan, ctx)
        finally:
            _RELATED.reset(token)

    async def _apply(
        self, op: Upsert, parent_id: str | None, key: str, ctx: DeliveryContext
    ) -> str:
        crm_id = await super()._apply(op, parent_id, key, ctx)
        related = _RELATED.get()
        if related is not None:
            related[op.entity] = {"crm_id": crm_id, "external_key": op.external_key}
        return crm_id

    # --- the generic form ----------------------------------------------------------

    def _variables(self, op: Upsert, parent_id: str | None, **extra: Any) -> dict[str, Any]:
        variables: dict[str, Any] = {str(k): v for k, v in op.fields.items()}
        variables.update(
            entity=op.entity,
            external_key=op.external_key,
            fields=dict(op.fields),
            parent_id=parent_id,
        )
        variables.update(extra)
        return variables

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        idempotency_key: str | None = None,
    ) -> _Response:
        """One request: what ``self._client.request(method, path, params=, json=, headers=)``
        sends, built without httpx's models; transport failures classified."""
        url = _merge_url(self._base_url, path)
        if params:
            url = str(httpx.URL(url).copy_merge_params(params))
        headers = dict(self._headers)
        if idempotency_key:
            headers[self._idempotency_header] = idempotency_key
        content: bytes | None = None
        if body is not None:
            # httpx's own JSON encoding (httpx._content.encode_json).
            content = json.dumps(
                body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode("utf-8")
            headers.setdefault("content-type", "application/json")
        async with classified():
            if self._aiohttp is not None:
                return await self._aiohttp.send(
                    method, url, list(headers.items()), content, self._aiohttp_timeout
                )
            return await self._client.request(method, url, content=content, headers=headers)

    async def _send(
        self, template: RequestTemplate, variables: dict[str, Any], idempotency_key: str | None
    ) -> _Response:
        path = template.path
        if "$" in path:
            url_vars = {
                k: quote(str(v), safe="") for k, v in variables.items() if isinstance(v, str | int)
            }
            path = string.Template(path).safe_substitute(url_vars)
        body = _render(template.body, variables) if template.body is not None else None
        return await self._request(
            template.method, path, body=body, idempotency_key=idempotency_key
        )

    # --- per-entity templates -------------------------------------------------------

    def _context(
        self,
        op: Upsert,
        parent_id: str | None,
        *,
        crm_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """What a per-entity template sees: this record, its parent, the plan's other records."""
        related = dict(_RELATED.get() or {})
        nobody: dict[str, Any] = {"crm_id": None, "external_key": None}
        parent = {"crm_id": parent_id, "external_key": op.parent}
        if op.parent is not None:
            # The parent may come from the links table rather than this plan.
            if op.entity == "deal":
                related.setdefault("contact", parent)
            elif op.entity == "note" and related.get("contact", {}).get("external_key") != (
                op.parent
            ):
                related.setdefault("deal", parent)
        return {
            "entity": op.entity,
            "external_key": op.external_key,
            "fields": dict(op.fields),
            "crm_id": crm_id,
            "parent_id": parent_id,
            "idempotency_key": idempotency_key,
            "contact": related.get("contact", nobody),
            "deal": related.get("deal", nobody),
            "parent": parent if op.parent is not None else nobody,
        }

    async def _send_entity(
        self,
        entity: str,
        action: str,
        request: EntityRequest,
        variables: dict[str, Any],
        idempotency_key: str | None,
    ) -> _Response:
        where = f"destinations.{self.name}.entities.{entity}.{action}"
        try:
            path = str(_template(request.path, True).render(variables))
        except TemplateError as exc:
            raise Rejected(f"{where}.path: template does not render: {exc}") from None
        params = _render_value(dict(request.params), variables, f"{where}.params")
        body = (
            _render_value(request.body, variables, f"{where}.body")
            if request.body is not None
            else None
        )
        return await self._request(
            request.method,
            path,
            params={k: str(v) for k, v in params.items()} or None,
            body=body,
            idempotency_key=idempotency_key,
        )

    # --- RecordConnector ------------------------------------------------------------

    def _url_for(self, entity: str, crm_id: str) -> str | None:
        if self.settings.record_url is None:
            return None
        return string.Template(self.settings.record_url).safe_substitute(id=crm_id, entity=entity)

    async def create(self, op: Upsert, parent_id: str | None, idempotency_key: str) -> Created:
        templates = self.settings.entities.get(op.entity)
        if templates is not None:
            variables = self._context(op, parent_id, idempotency_key=idempotency_key)
            response = await self._send_entity(
                op.entity, "create", templates.create, variables, idempotency_key
            )
            id_path = templates.create.id or templates.id
        else:
            variables = self._variables(op, parent_id, idempotency_key=idempotency_key)
            response = await self._send(self.settings.create, variables, idempotency_key)
            id_path = self.settings.id_field
        error = error_for_response(response)
        if error is not None:
            raise error
        crm_id = dig(_json(response), id_path)
        if crm_id is None or isinstance(crm_id, dict | list):
            raise Rejected(
                f"{op.entity} create answered HTTP {response.status_code} without {id_path!r}",
                status_code=response.status_code,
            )
        return Created(crm_id=str(crm_id), url=self._url_for(op.entity, str(crm_id)))

    async def update(
        self, op: Upsert, crm_id: str, parent_id: str | None, idempotency_key: str
    ) -> None:
        templates = self.settings.entities.get(op.entity)
        if templates is not None:
            if templates.update is None:
                return
            variables = self._context(op, parent_id, crm_id=crm_id, idempotency_key=idempotency_key)
            response = await self._send_entity(
                op.entity, "update", templates.update, variables, idempotency_key
            )
        else:
            if self.settings.update is None:
                return
            variables = self._variables(op, parent_id, id=crm_id, idempotency_key=idempotency_key)
            response = await self._send(self.settings.update, variables, idempotency_key)
        error = error_for_response(response)
        if error is not None:
            raise error

    async def find(self, op: Upsert, parent_id: str | None) -> LinkRef | None:
        templates = self.settings.entities.get(op.entity)
        if templates is not None:
            if templates.lookup is None:
                return None
            response = await self._send_entity(
                op.entity, "lookup", templates.lookup, self._context(op, parent_id), None
            )
            explicit = templates.lookup.id
            id_path = explicit or templates.id
        else:
            if self.settings.lookup is None:
                return None
            response = await self._send(self.settings.lookup, self._variables(op, parent_id), None)
            explicit = None
            id_path = self.settings.id_field
        if response.status_code in (404, 204):
            return None
        error = error_for_response(response)
        if error is not None:
            raise error
        data = _json(response)
        if explicit is None and isinstance(data, list):
            # A list of matches without a path into it: the first one.
            data = data[0] if data else None
        crm_id = dig(data, id_path) if data is not None else None
        if crm_id is None or isinstance(crm_id, dict | list):
            return None
        return LinkRef(crm_id=str(crm_id), url=self._url_for(op.entity, str(crm_id)))

    async def check(self) -> list[str]:
        """Ask a lookup endpoint for a key that cannot exist: any answer but an error is fine."""
        probe = Upsert(entity="deal", external_key="syncd-ping-0")
        deal = self.settings.entities.get("deal")
        if deal is not None and deal.lookup is not None:
            response = await self._send_entity(
                "deal", "lookup", deal.lookup, self._context(probe, None), None
            )
        elif deal is None and self.settings.lookup is not None:
            response = await self._send(self.settings.lookup, self._variables(probe, None), None)
        else:
            return ["no lookup template for deals: nothing to call"]
        if response.status_code not in (200, 204, 404):
            error = error_for_response(response)
            if error is not None:
                raise error
        return [f"lookup answered HTTP {response.status_code}"]

    async def aclose(self) -> None:
        await self._client.aclose()


def _json(response: _Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
