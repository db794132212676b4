"""Generic REST target: any HTTP API that can create, update and find a record.

Each operation is a request template. Strings in a template may contain
``$name`` placeholders (``string.Template``: no attribute access, so a
template cannot reach into Python objects); a string that is exactly
``$name`` is replaced by the value itself, keeping its JSON type.

Placeholders: ``$entity``, ``$external_key``, ``$fields`` (the whole dict),
``$parent_id``, ``$id`` (the CRM id, for update), ``$idempotency_key``, and
every field of the operation by name.
"""

from __future__ import annotations

import string
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from syncd.connectors.base import Created, LinkRef, RecordConnector
from syncd.connectors.http import classified, error_for_response
from syncd.errors import Rejected
from syncd.mapping import Upsert

_DEFAULT_BODY: dict[str, Any] = {
    "entity": "$entity",
    "external_key": "$external_key",
    "parent_id": "$parent_id",
    "fields": "$fields",
}


class RequestTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["GET", "POST", "PUT", "PATCH"] = "POST"
    path: str
    body: dict[str, Any] | None = None


class RestSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(pattern=r"^https?://")
    headers: dict[str, SecretStr] = Field(default_factory=dict)
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


def _render(value: Any, variables: dict[str, Any]) -> Any:
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


def _dig(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


class RestConnector(RecordConnector):
    kind = "rest"
    settings_model = RestSettings
    settings: RestSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = httpx.AsyncClient(
            base_url=self.settings.base_url,
            headers={k: v.get_secret_value() for k, v in self.settings.headers.items()},
            timeout=self.timeout,
            transport=self.transport,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
        )

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

    async def _send(
        self, template: RequestTemplate, variables: dict[str, Any], idempotency_key: str | None
    ) -> httpx.Response:
        url_vars = {
            k: quote(str(v), safe="") for k, v in variables.items() if isinstance(v, str | int)
        }
        path = string.Template(template.path).safe_substitute(url_vars)
        headers = {self.settings.idempotency_header: idempotency_key} if idempotency_key else {}
        body = _render(template.body, variables) if template.body is not None else None
        async with classified():
            response = await self._client.request(template.method, path, json=body, headers=headers)
        return response

    def _url_for(self, entity: str, crm_id: str) -> str | None:
        if self.settings.record_url is None:
            return None
        return string.Template(self.settings.record_url).safe_substitute(id=crm_id, entity=entity)

    async def create(self, op: Upsert, parent_id: str | None, idempotency_key: str) -> Created:
        variables = self._variables(op, parent_id, idempotency_key=idempotency_key)
        response = await self._send(self.settings.create, variables, idempotency_key)
        error = error_for_response(response)
        if error is not None:
            raise error
        crm_id = _dig(_json(response), self.settings.id_field)
        if crm_id is None:
            raise Rejected(
                f"create answered HTTP {response.status_code} without {self.settings.id_field!r}",
                status_code=response.status_code,
            )
        return Created(crm_id=str(crm_id), url=self._url_for(op.entity, str(crm_id)))

    async def update(
        self, op: Upsert, crm_id: str, parent_id: str | None, idempotency_key: str
    ) -> None:
        if self.settings.update is None:
            return
        variables = self._variables(op, parent_id, id=crm_id, idempotency_key=idempotency_key)
        response = await self._send(self.settings.update, variables, idempotency_key)
        error = error_for_response(response)
        if error is not None:
            raise error

    async def find(self, op: Upsert, parent_id: str | None) -> LinkRef | None:
        if self.settings.lookup is None:
            return None
        response = await self._send(self.settings.lookup, self._variables(op, parent_id), None)
        if response.status_code in (404, 204):
            return None
        error = error_for_response(response)
        if error is not None:
            raise error
        data = _json(response)
        if isinstance(data, list):
            data = data[0] if data else None
        crm_id = _dig(data, self.settings.id_field) if data is not None else None
        if crm_id is None:
            return None
        return LinkRef(crm_id=str(crm_id), url=self._url_for(op.entity, str(crm_id)))

    async def check(self) -> list[str]:
        """Ask the lookup endpoint for a key that cannot exist: any answer but an error is fine."""
        if self.settings.lookup is None:
            return ["no lookup template: nothing to call"]
        probe = Upsert(entity="deal", external_key="syncd-ping-0")
        response = await self._send(self.settings.lookup, self._variables(probe, None), None)
        if response.status_code not in (200, 204, 404):
            error = error_for_response(response)
            if error is not None:
                raise error
        return [f"lookup answered HTTP {response.status_code}"]

    async def aclose(self) -> None:
        await self._client.aclose()


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
