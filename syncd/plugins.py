"""Finding a class by its ``kind`` name: the mechanism behind both registries.

Built-in kinds are named by import path and loaded on first use; other
packages add kinds through an entry-point group. The core names a kind,
never a module.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points

from pydantic import ValidationError


def known_kinds(builtin: Mapping[str, str], group: str) -> list[str]:
    plugins = {ep.name for ep in entry_points(group=group)}
    return sorted(set(builtin) | plugins)


def load_kind(kind: str, builtin: Mapping[str, str], group: str, base: type) -> type:
    """The class registered for ``kind`` (a subclass of ``base``); KeyError when there is none."""
    target = builtin.get(kind)
    if target is None:
        found = [ep.load() for ep in entry_points(group=group) if ep.name == kind]
        if not found:
            raise KeyError(kind)
        cls = found[0]
    else:
        module_name, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{kind!r} does not name a {base.__name__}")
    return cls


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """Pydantic's errors as (dotted key, readable message), the way check-config shows them."""
    messages = {"extra_forbidden": "unknown key", "missing": "required key is missing"}
    return [
        (".".join(str(p) for p in err["loc"]), messages.get(err["type"], err["msg"]))
        for err in exc.errors()
    ]
