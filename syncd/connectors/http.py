"""Where HTTP meets the error hierarchy: every connector classifies failures here, once."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Protocol

import httpx

from syncd.errors import (
    AccessDenied,
    DeliveryError,
    NotFound,
    RateLimited,
    Rejected,
    ServerError,
    TransportError,
)

_BODY_SNIPPET = 300


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: either a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


class HttpAnswer(Protocol):
    """What classification reads from a response: ``httpx.Response`` or the aiohttp path's."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def error_for_response(response: HttpAnswer) -> DeliveryError | None:
    """None for 2xx; otherwise the DeliveryError this status means."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    snippet = response.text[:_BODY_SNIPPET].strip()
    message = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        return RateLimited(message, status_code=status, retry_after=retry_after)
    if status in (408, 425) or status >= 500:
        return ServerError(message, status_code=status, retry_after=retry_after)
    if status in (401, 403):
        return AccessDenied(message, status_code=status)
    if status in (404, 410):
        return NotFound(message, status_code=status)
    return Rejected(message, status_code=status)


@asynccontextmanager
async def classified() -> AsyncIterator[None]:
    """Turn httpx's transport exceptions into syncd's retriable errors."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        # The request never left: safe to send again without looking first.
        err = TransportError(f"cannot connect: {type(exc).__name__}: {exc}")
        err.outcome_unknown = False
        raise err from None
    except httpx.TimeoutException as exc:
        raise TransportError(f"timed out: {type(exc).__name__}") from None
    except httpx.TransportError as exc:
        raise TransportError(f"connection failed: {type(exc).__name__}: {exc}") from None
