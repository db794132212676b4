"""Every exception syncd raises, in one place.

Delivery errors are classified exactly once, where a connector meets the
network, into *retriable* and *permanent*; everything above that boundary
(the retry policy, the dispatcher, the monitor) only looks at the class.
"""

from __future__ import annotations

from dataclasses import dataclass


class SyncdError(Exception):
    """Base of every error syncd raises on purpose."""


# --- configuration -----------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file, pinned to its key path."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class ConfigError(SyncdError):
    """The config file cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --- store -------------------------------------------------------------------


class StoreError(SyncdError):
    """The database cannot be reached or is not at the expected schema version."""


class StoreLockedError(StoreError):
    """Another syncd process already owns this SQLite file."""


# --- intake ------------------------------------------------------------------


class IntakeError(SyncdError):
    """A webhook was refused; ``status_code`` is what the sender gets back."""

    status_code = 400

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnknownSource(IntakeError):
    status_code = 404


class AuthenticationFailed(IntakeError):
    status_code = 401


class PayloadTooLarge(IntakeError):
    status_code = 413


class InvalidPayload(IntakeError):
    status_code = 422


class StoreUnavailable(IntakeError):
    """The webhook could not be stored just now (the writer process is restarting)."""

    status_code = 503


# --- mapping -----------------------------------------------------------------


class MappingError(SyncdError):
    """The event could not be turned into a plan (bad template, missing field)."""


# --- delivery ----------------------------------------------------------------


class DeliveryError(SyncdError):
    """A delivery attempt did not succeed.

    ``status_code`` is the HTTP status when the CRM answered at all;
    ``retry_after`` is how long the CRM asked us to wait, in seconds.
    """

    retriable: bool = True
    #: True when the request may have reached the CRM (timeout after sending,
    #: connection dropped mid-response): the next attempt must look before it creates.
    outcome_unknown: bool = False
    #: The same failed request as another delivery's error (a shared Bitrix24 batch):
    #: the circuit breaker counts the request once, not once per delivery in it.
    echo: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after
        super().__init__(message)


class RetriableError(DeliveryError):
    """Worth trying again later: the CRM or the network is having a bad moment."""


class TransportError(RetriableError):
    """No usable answer: connection refused, reset or timed out."""

    outcome_unknown = True


class RateLimited(RetriableError):
    """The CRM said "too many requests" (HTTP 429 or its own equivalent)."""


class Contended(RetriableError):
    """Another delivery is creating the same record right now; wait a moment, then look it up."""


class ServerError(RetriableError):
    """The CRM failed on its side (HTTP 5xx)."""


class PermanentError(DeliveryError):
    """Retrying the same request cannot help; a human has to look."""

    retriable = False


class Rejected(PermanentError):
    """The CRM refused the data (validation error, HTTP 400/422)."""


class NotFound(PermanentError):
    """The CRM entity or endpoint does not exist (HTTP 404)."""


class AccessDenied(PermanentError):
    """Credentials are wrong or lack a permission (HTTP 401/403)."""
