"""The small interface every CRM connector implements, and what it is handed.

A connector receives a :class:`~syncd.mapping.Plan` and makes the CRM match
it. It never touches the store: it reads and records links through the
:class:`LinkBook` in its :class:`DeliveryContext`, and it reports failure
only by raising a :class:`~syncd.errors.DeliveryError` subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import httpx
from pydantic import BaseModel

from syncd.connectors.throttle import SlidingWindow, TokenBucket
from syncd.errors import Contended
from syncd.mapping import Plan, Upsert


@dataclass(frozen=True)
class LinkRef:
    """What syncd knows about a CRM record. ``crm_id`` is None while a create is unconfirmed."""

    crm_id: str | None
    url: str | None = None
    #: For an unconfirmed create: another delivery is sending it right now.
    owner_busy: bool = False


@dataclass(frozen=True)
class Created:
    crm_id: str
    url: str | None = None


class LinkBook(Protocol):
    """The connector's view of the links table for one destination."""

    async def get(self, entity: str, external_key: str) -> LinkRef | None: ...

    async def intend(self, entity: str, external_key: str) -> bool:
        """Durably note that a create is about to be sent (before sending it).

        False when another delivery got there first: it is creating the record.
        """

    async def record(
        self, entity: str, external_key: str, crm_id: str, url: str | None
    ) -> None: ...

    async def record_identities(self, entity: str, keys: tuple[str, ...], crm_id: str) -> None:
        """Remember other keys (e-mails, phones) that name the same record."""


class CredentialStore(Protocol):
    """Where a connector keeps tokens it rotates. ``save`` is durable when it returns."""

    async def load(self) -> dict[str, Any] | None: ...

    async def save(self, data: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class DeliveryContext:
    delivery_id: int
    event_id: int
    destination: str
    attempt: int
    links: LinkBook
    #: Distinguishes this database's delivery ids from another install's.
    install_id: str = "0"

    def idempotency_key(self, op_index: int) -> str:
        """Stable across retries of the same delivery, unique per operation."""
        return f"syncd-{self.install_id}-{self.delivery_id}-{op_index}"


class Connector(ABC):
    """One CRM. Subclasses set :attr:`kind` and :attr:`settings_model`."""

    kind: ClassVar[str]
    settings_model: ClassVar[type[BaseModel]]

    def __init__(
        self,
        name: str,
        settings: BaseModel,
        *,
        timeout: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
        credentials: CredentialStore | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.timeout = timeout
        self.transport = transport
        self.credentials = credentials

    @abstractmethod
    async def execute(self, plan: Plan, ctx: DeliveryContext) -> None:
        """Make the CRM match the plan, or raise a DeliveryError."""

    @abstractmethod
    async def find(self, op: Upsert, parent_id: str | None) -> LinkRef | None:
        """Look a record up by its external key (after an unknown outcome)."""

    async def check(self) -> list[str]:
        """Verify credentials and reachability; raise a DeliveryError if broken.

        Returns what was verified, one line each, for ``check-config --ping``.
        """
        return []

    def record_url(self, entity: str, crm_id: str) -> str | None:
        """A link to the record in the CRM's own UI, for the monitor."""
        return None

    def set_share(self, share: float) -> None:
        """Pace at ``share`` of the CRM's rate limit; other replicas of syncd use the rest.

        Applies to the connector's ``throttle`` attribute, when it has one (a
        connector with no client-side pacing has nothing to share).
        """
        throttle = getattr(self, "throttle", None)
        if isinstance(throttle, TokenBucket | SlidingWindow):
            throttle.share(share)

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections."""


class RecordConnector(Connector):
    """A connector that writes one record per operation (see :meth:`Plan.records`).

    It implements the safety rules once for all such connectors: consult the
    links table first; write an intent before every create; when an intent
    without a result is found (a previous try timed out or the daemon died
    mid-request), look the record up before creating it again; and while
    another delivery is creating the same record, wait rather than race it.
    """

    #: Entities looked up in the CRM before being created, even with no intent
    #: (a contact may already exist, typed in by a manager).
    search_before_create: ClassVar[frozenset[str]] = frozenset({"contact"})

    @abstractmethod
    async def create(self, op: Upsert, parent_id: str | None, idempotency_key: str) -> Created: ...

    @abstractmethod
    async def update(
        self, op: Upsert, crm_id: str, parent_id: str | None, idempotency_key: str
    ) -> None: ...

    async def execute(self, plan: Plan, ctx: DeliveryContext) -> None:
        known: dict[str, str] = {}
        records = plan.records()
        prefetch = getattr(ctx.links, "prefetch", None)
        if prefetch is not None:
            keys = [(r.entity, k) for r in records for k in (r.external_key, *r.identities)]
            keys += [
                (e, r.parent) for r in records if r.parent for e in ("deal", "contact", "lead")
            ]
            await prefetch(keys)
        for index, op in enumerate(records):
            parent_id = await self._parent_id(op, known, ctx)
            known[op.external_key] = await self._apply(
                op, parent_id, ctx.idempotency_key(index), ctx
            )

    async def _apply(
        self, op: Upsert, parent_id: str | None, key: str, ctx: DeliveryContext
    ) -> str:
        link = await self._linked(op, ctx)
        if link is not None and link.crm_id is None:
            if link.owner_busy:
                raise Contended(
                    f"{op.entity} {op.external_key} is being created by another delivery",
                    retry_after=1.0,
                )
            found = await self.find(op, parent_id)
            if found is not None and found.crm_id is not None:
                await ctx.links.record(op.entity, op.external_key, found.crm_id, found.url)
                link = found
        elif link is None and op.entity in self.search_before_create:
            found = await self.find(op, parent_id)
            if found is not None and found.crm_id is not None:
                await ctx.links.record(op.entity, op.external_key, found.crm_id, found.url)
                link = found
        if link is not None and link.crm_id is not None:
            if not op.create_only:
                await self.update(op, link.crm_id, parent_id, key)
            await self._remember(op, link.crm_id, ctx)
            return link.crm_id
        if link is None and not await ctx.links.intend(op.entity, op.external_key):
            raise Contended(
                f"{op.entity} {op.external_key} is being created by another delivery",
                retry_after=1.0,
            )
        created = await self.create(op, parent_id, key)
        await ctx.links.record(op.entity, op.external_key, created.crm_id, created.url)
        await self._remember(op, created.crm_id, ctx)
        return created.crm_id

    async def _linked(self, op: Upsert, ctx: DeliveryContext) -> LinkRef | None:
        link = await ctx.links.get(op.entity, op.external_key)
        if link is not None:
            return link
        for identity in op.identities:
            other = await ctx.links.get(op.entity, identity)
            if other is not None and other.crm_id is not None:
                # Same person under another key (a new ticket id, a changed e-mail).
                await ctx.links.record(op.entity, op.external_key, other.crm_id, other.url)
                return other
        return None

    async def _remember(self, op: Upsert, crm_id: str, ctx: DeliveryContext) -> None:
        if op.identities:
            await ctx.links.record_identities(op.entity, op.identities, crm_id)

    async def _parent_id(
        self, op: Upsert, known: dict[str, str], ctx: DeliveryContext
    ) -> str | None:
        if op.parent is None:
            return None
        if op.parent in known:
            return known[op.parent]
        for entity in ("deal", "contact", "lead"):
            ref = await ctx.links.get(entity, op.parent)
            if ref is not None and ref.crm_id is not None:
                return ref.crm_id
        return None
