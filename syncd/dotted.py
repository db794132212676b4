"""Dotted paths into JSON (``ticket.client.email``, ``data.0.id``): one reading for every caller."""

from __future__ import annotations

from typing import Any


def dig(data: Any, dotted: str | None) -> Any:
    """The value at ``dotted`` (list items by index), or None where the path leads nowhere."""
    if not dotted:
        return None
    for part in dotted.split("."):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data
