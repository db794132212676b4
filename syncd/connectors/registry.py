"""Finds a connector class by its ``kind``. The core imports this, never a connector.

Built-in kinds are named here by import path and loaded on first use; other
packages add kinds through the ``syncd.connectors`` entry-point group.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import httpx
from pydantic import ValidationError

from syncd.config import DestinationConfig
from syncd.connectors.base import Connector, CredentialStore

BUILTIN: dict[str, str] = {
    "rest": "syncd.connectors.rest:RestConnector",
    "bitrix24": "syncd.connectors.bitrix24:Bitrix24Connector",
    "amocrm": "syncd.connectors.amocrm:AmoCrmConnector",
}


def known_kinds() -> list[str]:
    plugins = {ep.name for ep in entry_points(group="syncd.connectors")}
    return sorted(set(BUILTIN) | plugins)


def connector_class(kind: str) -> type[Connector]:
    target = BUILTIN.get(kind)
    if target is None:
        for ep in entry_points(group="syncd.connectors"):
            if ep.name == kind:
                loaded = ep.load()
                assert isinstance(loaded, type) and issubclass(loaded, Connector)
                return loaded
        raise KeyError(kind)
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    assert isinstance(cls, type) and issubclass(cls, Connector)
    return cls


def validate_destination(dest: DestinationConfig) -> list[tuple[str, str]]:
    """Problems with one destination's settings, as (key inside the destination, message)."""
    try:
        cls = connector_class(dest.kind)
    except KeyError:
        return [
            ("kind", f"unknown connector kind {dest.kind!r} (known: {', '.join(known_kinds())})")
        ]
    except ImportError as exc:
        return [("kind", f"connector kind {dest.kind!r} cannot be loaded: {exc}")]
    try:
        cls.settings_model.model_validate(dest.settings())
    except ValidationError as exc:
        return validation_problems(exc)
    return []


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """Pydantic's errors as (dotted key, readable message), the way check-config shows them."""
    messages = {"extra_forbidden": "unknown key", "missing": "required key is missing"}
    return [
        (".".join(str(p) for p in err["loc"]), messages.get(err["type"], err["msg"]))
        for err in exc.errors()
    ]


def build(
    name: str,
    dest: DestinationConfig,
    *,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
    credentials: CredentialStore | None = None,
) -> Connector:
    cls = connector_class(dest.kind)
    settings = cls.settings_model.model_validate(dest.settings())
    return cls(name, settings, timeout=timeout, transport=transport, credentials=credentials)
