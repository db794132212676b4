"""Finds a connector class by its ``kind``. The core imports this, never a connector.

Built-in kinds are named here by import path and loaded on first use; other
packages add kinds through the ``syncd.connectors`` entry-point group.
"""

from __future__ import annotations

from typing import cast

import httpx
from pydantic import ValidationError

from syncd import plugins
from syncd.config import DestinationConfig
from syncd.connectors.base import Connector, CredentialStore

BUILTIN: dict[str, str] = {
    "rest": "syncd.connectors.rest:RestConnector",
    "bitrix24": "syncd.connectors.bitrix24:Bitrix24Connector",
    "amocrm": "syncd.connectors.amocrm:AmoCrmConnector",
}


def known_kinds() -> list[str]:
    return plugins.known_kinds(BUILTIN, "syncd.connectors")


def connector_class(kind: str) -> type[Connector]:
    return cast(type[Connector], plugins.load_kind(kind, BUILTIN, "syncd.connectors", Connector))


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
        return plugins.validation_problems(exc)
    return []


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
