"""What every request carrying several deliveries needs (Bitrix24 batches, amoCRM bulk writes)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable
from typing import Any

from syncd.errors import DeliveryError


def fail_shared(futures: Iterable[asyncio.Future[Any]], exc: BaseException) -> None:
    """Give every waiting delivery the request's failure.

    Each gets its own copy (its handler may change the text or flags), and all
    but the first are marked ``echo``: one failed request, counted once by the breaker.
    """
    first = True
    for future in futures:
        if future.done():
            continue
        own = copy.copy(exc) if isinstance(exc, DeliveryError) else exc
        if isinstance(own, DeliveryError) and not first:
            own.echo = True
        first = False
        future.set_exception(own)
