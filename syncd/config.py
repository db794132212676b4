"""The one config file: TOML on disk, pydantic models in memory.

Secrets never live in the file itself: a value may be written as
``${ENV_VAR}``, and any key ``foo_file`` is replaced by ``foo`` holding the
file's contents. Every problem is collected and reported together, each
with its key path and the file name, so one run of ``syncd check-config``
shows everything to fix.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from syncd.errors import ConfigError, ConfigProblem
from syncd.mapping.rules import MappingConfig

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    """The HTTP listener: intake webhooks, the JSON API, health checks."""

    host: str = "127.0.0.1"
    port: int = Field(default=8780, ge=0, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)


class StoreConfig(_Strict):
    url: str = "sqlite:///syncd.db"
    busy_timeout_ms: int = Field(default=5000, ge=0)
    #: "process": webhook events are written by a child process (syncd.intake.writer_process);
    #: "thread": by the daemon's own writer thread.
    intake_writer: Literal["process", "thread"] = "process"


class DeliveryConfig(_Strict):
    """How the dispatcher leases, retries and gives up."""

    concurrency: int = Field(default=16, ge=1, le=1000)
    batch_size: int = Field(default=100, ge=1, le=5000)
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    request_timeout_seconds: float = Field(default=15.0, gt=0)
    lease_seconds: float = Field(default=120.0, gt=0)
    retry_window_seconds: float = Field(default=24 * 3600, gt=0)
    schedule_seconds: list[float] = Field(
        default_factory=lambda: [10.0, 60.0, 300.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0],
        min_length=1,
    )
    jitter: float = Field(default=0.2, ge=0, lt=1)
    max_step_seconds: float = Field(default=8 * 3600, gt=0)
    rate_limited_floor_seconds: float = Field(default=30.0, ge=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    lease_recovery_interval_seconds: float = Field(default=15.0, gt=0)
    #: How often each daemon says it is up (syncd.replicas): replicas on one PostgreSQL
    #: database split each CRM's rate limit, and one of them polls the helpdesks.
    replica_heartbeat_seconds: float = Field(default=2.0, gt=0)
    retention_days: float = Field(default=30.0, gt=0)
    #: Send waiting events of one ticket as one delivery (latest state, every note).
    coalesce: bool = True
    #: Most events one such delivery carries, the first included.
    coalesce_max: int = Field(default=20, ge=1, le=200)

    @model_validator(mode="after")
    def _lease_outlives_request(self) -> DeliveryConfig:
        # A lease that runs out while its request is still in the air lets a
        # second worker send the same thing (svix PR #2181, kombu #337).
        if self.lease_seconds < 2 * self.request_timeout_seconds + 5:
            raise ValueError(
                "lease_seconds must be at least 2 x request_timeout_seconds + 5 "
                f"(got lease_seconds={self.lease_seconds}, "
                f"request_timeout_seconds={self.request_timeout_seconds})"
            )
        return self


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class IntakeConfig(_Strict):
    """Settings shared by every source."""

    #: Country assumed for phone numbers written without one ("8 999 ..." in Russia).
    default_country: str = Field(default="RU", min_length=2, max_length=2)


class MonitorUser(_Strict):
    """A person who logs in to the monitor. ``syncd hash-password`` makes the hash."""

    name: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "admin"] = "viewer"
    password_hash: str

    @model_validator(mode="after")
    def _hash_not_password(self) -> MonitorUser:
        from syncd.monitor.passwords import is_password_hash

        if not is_password_hash(self.password_hash):
            # Never echo the value: it may be a password pasted by mistake.
            raise ValueError(
                "password_hash is not a hash made by `syncd hash-password` "
                "(passwords are never stored in the config in clear)"
            )
        return self


class MonitorToken(_Strict):
    """An API token (``Authorization: Bearer ...``) for scripts and dashboards."""

    name: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "admin"] = "viewer"
    token: SecretStr = Field(min_length=16)


class MonitorConfig(_Strict):
    """The web UI and JSON API: who may log in, in which language."""

    #: "auto" follows the browser's Accept-Language; "en" or "ru" fixes it.
    language: Literal["auto", "en", "ru"] = "auto"
    #: Signs session cookies. Unset: a random key per start (all log in again after a restart).
    session_secret: SecretStr | None = Field(default=None, min_length=16)
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    #: Send cookies only over HTTPS (set when syncd sits behind TLS).
    secure_cookies: bool = False
    #: /metrics without a login, for a Prometheus scraper on a private network.
    public_metrics: bool = True
    #: The overview's counts are at most this old (0: count on every request).
    overview_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    users: list[MonitorUser] = Field(default_factory=list)
    tokens: list[MonitorToken] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> MonitorConfig:
        names = [u.name for u in self.users] + [t.name for t in self.tokens]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"user and token names must be unique; repeated: {', '.join(dupes)}")
        return self


class SourceConfig(BaseModel):
    """A helpdesk feeding ``/hooks/{name}``. The source kind validates everything but ``kind``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = "generic"
    #: Destinations this source feeds; all of them when left out.
    destinations: list[str] | None = None

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def __repr_args__(self) -> Any:
        # Extras are unvalidated and may hold secrets: show only their names.
        yield "kind", self.kind
        yield "keys", sorted(self.model_extra or {})


class DestinationConfig(BaseModel):
    """A CRM target. Only ``kind`` is known here; the connector validates the rest."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str
    #: Rules for this destination only (ids of pipelines and users differ between CRMs).
    mapping: MappingConfig | None = None

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def __repr_args__(self) -> Any:
        yield "kind", self.kind
        yield "keys", sorted(self.model_extra or {})


class Config(_Strict):
    """The whole file. ``[mapping]`` applies to every destination unless it has its own."""

    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    logging: LoggingConfig = LoggingConfig()
    intake: IntakeConfig = IntakeConfig()
    monitor: MonitorConfig = MonitorConfig()
    mapping: MappingConfig = MappingConfig()
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)

    #: Where the file was read from; relative paths in it are resolved against its folder.
    path: Path | None = Field(default=None, exclude=True)

    def mapping_for(self, destination: str) -> MappingConfig:
        own = self.destinations[destination].mapping
        return own if own is not None else self.mapping

    def destinations_for(self, source: str) -> list[str]:
        wanted = self.sources[source].destinations
        return list(self.destinations) if wanted is None else list(wanted)

    def secret_values(self) -> list[str]:
        """Every secret in this config, for the log redactor."""
        found: list[str] = []
        for src in self.sources.values():
            found.extend(_secrets_in(src.settings()))
        for dest in self.destinations.values():
            found.extend(_secrets_in(dest.settings()))
        found.extend(t.token.get_secret_value() for t in self.monitor.tokens)
        if self.monitor.session_secret is not None:
            found.append(self.monitor.session_secret.get_secret_value())
        return [s for s in found if s]


_SECRET_KEY = re.compile(r"(secret|token|password|key|auth|webhook)", re.IGNORECASE)


def _secrets_in(value: Any, key: str = "") -> list[str]:
    if isinstance(value, dict):
        out: list[str] = []
        for k, v in value.items():
            out.extend(_secrets_in(v, k))
        return out
    if isinstance(value, list):
        return [s for item in value for s in _secrets_in(item, key)]
    if isinstance(value, SecretStr):
        return [value.get_secret_value()]
    if isinstance(value, str) and _SECRET_KEY.search(key):
        # "Bearer abc" / "Basic abc": the credential alone may be echoed back, mask it too.
        scheme, _, credential = value.partition(" ")
        return [value, credential] if credential and scheme.isalpha() else [value]
    return []


# --- loading -------------------------------------------------------------------


def _resolve(raw: Any, path: tuple[str, ...], base: Path, problems: list[tuple[str, str]]) -> Any:
    """Expand ``${VAR}`` and ``*_file`` references, recording what cannot be expanded."""
    if isinstance(raw, dict):
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key.endswith("_file") and isinstance(value, str) and len(key) > 5:
                target = key[: -len("_file")]
                if target in raw:
                    problems.append(
                        (_dotted((*path, key)), f"set either {target} or {key}, not both")
                    )
                    continue
                file_path = Path(os.path.expandvars(value))
                if not file_path.is_absolute():
                    file_path = base / file_path
                try:
                    out[target] = file_path.read_text(encoding="utf-8").strip()
                except OSError as exc:
                    problems.append(
                        (_dotted((*path, key)), f"cannot read {file_path}: {exc.strerror}")
                    )
                continue
            out[key] = _resolve(value, (*path, key), base, problems)
        return out
    if isinstance(raw, list):
        return [_resolve(v, (*path, str(i)), base, problems) for i, v in enumerate(raw)]
    if isinstance(raw, str):
        missing = [name for name in _ENV_REF.findall(raw) if name not in os.environ]
        if missing:
            for name in missing:
                problems.append((_dotted(path), f"environment variable {name} is not set"))
            return raw
        return _ENV_REF.sub(lambda m: os.environ[m.group(1)], raw)
    return raw


def _dotted(parts: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in parts)


def parse_config(text: str, file_name: str, base: Path | None = None) -> Config:
    """Parse TOML text into a validated :class:`Config`, or raise :class:`ConfigError`."""
    base = base or Path.cwd()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(file_name, "", f"not valid TOML: {exc}")]) from None

    found: list[tuple[str, str]] = []
    resolved = _resolve(raw, (), base, found)
    problems = [ConfigProblem(file_name, key, msg) for key, msg in found]

    config: Config | None = None
    try:
        config = Config.model_validate(resolved)
    except ValidationError as exc:
        for err in exc.errors():
            key = _dotted(tuple(err["loc"]))
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            elif err["type"] == "missing":
                message = "required key is missing"
            problems.append(ConfigProblem(file_name, key, message))

    if isinstance(resolved, dict):
        problems.extend(_cross_checks(resolved, file_name))
    if config is not None:
        problems.extend(_mapping_checks(config, file_name))
    if problems:
        raise ConfigError(_unique(problems))
    assert config is not None
    return config.model_copy(update={"path": Path(file_name)})


def _cross_checks(raw: dict[str, Any], file_name: str) -> list[ConfigProblem]:
    """Checks that span sections, run on the raw data so they report even when a section fails."""
    from syncd.connectors.registry import validate_destination  # registry imports config
    from syncd.intake.registry import validate_source

    problems: list[ConfigProblem] = []
    sources = raw.get("sources") if isinstance(raw.get("sources"), dict) else {}
    destinations = raw.get("destinations") if isinstance(raw.get("destinations"), dict) else {}
    assert isinstance(sources, dict) and isinstance(destinations, dict)
    known = ", ".join(destinations) or "none"
    for name, src in sources.items():
        wanted = src.get("destinations") if isinstance(src, dict) else None
        for i, dest in enumerate(wanted if isinstance(wanted, list) else []):
            if dest not in destinations:
                problems.append(
                    ConfigProblem(
                        file_name,
                        f"sources.{name}.destinations.{i}",
                        f"no destination named {dest!r} (known: {known})",
                    )
                )
    for name, src_raw in sources.items():
        if not isinstance(src_raw, dict):
            continue
        src_cfg = SourceConfig.model_validate({**src_raw, "destinations": None})
        for key, message in validate_source(src_cfg):
            problems.append(ConfigProblem(file_name, f"sources.{name}.{key}", message))
    for name, dest_raw in destinations.items():
        if not isinstance(dest_raw, dict) or not isinstance(dest_raw.get("kind"), str):
            continue  # the model validation reports these
        for key, message in validate_destination(DestinationConfig.model_validate(dest_raw)):
            problems.append(ConfigProblem(file_name, f"destinations.{name}.{key}", message))
    return problems


def _mapping_checks(config: Config, file_name: str) -> list[ConfigProblem]:
    from syncd.mapping.checks import check_mapping

    problems = [ConfigProblem(file_name, k, m) for k, m in check_mapping(config.mapping)]
    for name, dest in config.destinations.items():
        if dest.mapping is not None:
            found = check_mapping(dest.mapping, prefix=f"destinations.{name}.mapping")
            problems.extend(ConfigProblem(file_name, k, m) for k, m in found)
    return problems


def _unique(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen: set[ConfigProblem] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; relative paths inside resolve against its folder."""
    file_path = Path(path)
    try:
        text = file_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(str(file_path), "", f"cannot read file: {exc.strerror}")]
        ) from None
    config = parse_config(text, str(file_path), base=file_path.resolve().parent)
    return config


def resolve_store_url(config: Config) -> str:
    """A relative SQLite path is taken relative to the config file, not the working directory."""
    url = config.store.url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and config.path is not None:
        rel = url[len(prefix) :]
        if rel and rel != ":memory:":
            return prefix + str((config.path.resolve().parent / rel).resolve())
    return url
