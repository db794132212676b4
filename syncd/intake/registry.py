"""Finds a helpdesk source class by its ``kind``, as connectors/registry.py does for CRMs."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from pydantic import ValidationError

from syncd.config import SourceConfig
from syncd.connectors.registry import validation_problems
from syncd.intake.base import WebhookSource

BUILTIN: dict[str, str] = {
    "generic": "syncd.intake.generic:GenericSource",
    "usedesk": "syncd.intake.usedesk:UsedeskSource",
    "zendesk": "syncd.intake.zendesk:ZendeskSource",
}


def known_kinds() -> list[str]:
    plugins = {ep.name for ep in entry_points(group="syncd.sources")}
    return sorted(set(BUILTIN) | plugins)


def source_class(kind: str) -> type[WebhookSource]:
    target = BUILTIN.get(kind)
    if target is None:
        for ep in entry_points(group="syncd.sources"):
            if ep.name == kind:
                loaded = ep.load()
                assert isinstance(loaded, type) and issubclass(loaded, WebhookSource)
                return loaded
        raise KeyError(kind)
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    assert isinstance(cls, type) and issubclass(cls, WebhookSource)
    return cls


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
        return validation_problems(exc)
    return []


def build(name: str, src: SourceConfig, *, default_region: str) -> WebhookSource:
    cls = source_class(src.kind)
    settings = cls.settings_model.model_validate(src.settings())
    return cls(name, settings, default_region=default_region)
