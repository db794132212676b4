"""Small fakes shared by tests. Fakes here stand in for syncd's own store, never for a CRM."""

from __future__ import annotations

from syncd.connectors.base import LinkRef


class MemoryLinks:
    """An in-memory LinkBook: the links table of one destination, without a database."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], LinkRef] = {}
        self.log: list[str] = []

    async def get(self, entity: str, external_key: str) -> LinkRef | None:
        return self.rows.get((entity, external_key))

    async def intend(self, entity: str, external_key: str) -> bool:
        self.log.append(f"intend {entity}:{external_key}")
        if (entity, external_key) in self.rows:
            return False
        self.rows[(entity, external_key)] = LinkRef(crm_id=None)
        return True

    async def record(self, entity: str, external_key: str, crm_id: str, url: str | None) -> None:
        self.log.append(f"record {entity}:{external_key}={crm_id}")
        self.rows[(entity, external_key)] = LinkRef(crm_id=crm_id, url=url)

    async def record_identities(self, entity: str, keys: tuple[str, ...], crm_id: str) -> None:
        for key in keys:
            self.rows.setdefault((entity, key), LinkRef(crm_id=crm_id))


class MemoryCredentials:
    """An in-memory CredentialStore that keeps every version saved, oldest first."""

    def __init__(self, initial: dict[str, object] | None = None) -> None:
        self.saved: list[dict[str, object]] = [dict(initial)] if initial else []

    async def load(self) -> dict[str, object] | None:
        return dict(self.saved[-1]) if self.saved else None

    async def save(self, data: dict[str, object]) -> None:
        self.saved.append(dict(data))
