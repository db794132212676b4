"""Finds a helpdesk source class by its ``kind``, as connectors/registry.py does for CRMs."""

from __future__ import annotations

from typing import cast

from pydantic import ValidationError

from syncd import plugins
from syncd.config import SourceConfig
from syncd.intake.base import WebhookSource

BUILTIN: dict[str, str] = {
    "generic": "syncd.intake.generic:GenericSource",
    "usedesk": "syncd.intake.usedesk:UsedeskSource",
    "zendesk": "syncd.intake.zendesk:ZendeskSource",
}


def known_kinds() -> list[str]:
    return plugins.known_kinds(BUILTIN, "syncd.sources")


def source_class(kind: str) -> type[WebhookSource]:
    return cast(
        type[WebhookSource], plugins.load_kind(kind, BUILTIN, "syncd.sources", WebhookSource)
    )


def validate_source(src: SourceConfig) -> list[tuple[str, str]]:
    try:
        cls = source_class(src.kind)
    except KeyError:
        return [("kind", f"unknown source kind {src.kind!r} (known: {', '.join(known_kinds())})")]
    except ImportError as exc:
        return [("kind", f"source kind {src.kind!r} cannot be loaded: {exc}")]
    try:
        cls.settings_model.model_validate(src.settings())
    except ValidationError as exc:
        return plugins.validation_problems(exc)
    return []


def build(name: str, src: SourceConfig, *, default_region: str) -> WebhookSource:
    cls = source_class(src.kind)
    settings = cls.settings_model.model_validate(src.settings())
    return cls(name, settings, default_region=default_region)
