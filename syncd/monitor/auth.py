"""Who is asking: a logged-in person (signed session cookie) or a script (bearer token).

The config is the only source of users and roles. A session stores just the
user's name, so removing a user or demoting an admin in the config takes
effect on the next request, not when the cookie expires.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog
from fastapi import Request

from syncd.config import MonitorConfig
from syncd.monitor.passwords import hash_password, verify_password

log = structlog.get_logger("syncd.monitor")

Role = Literal["viewer", "admin"]
#: Checked against when the user name is unknown, so a wrong name costs what a wrong password does.
_DUMMY_HASH = hash_password(secrets.token_hex(16))


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    via: Literal["session", "token", "cli"]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def actor(self) -> str:
        """How the audit log names this principal."""
        return self.name if self.via == "session" else f"{self.via}:{self.name}"


class NotLoggedIn(Exception):
    """No valid session or token: HTML pages redirect to the login form, the API answers 401."""


class Forbidden(Exception):
    """Logged in, but the role does not allow this (a viewer trying a resend)."""

    def __init__(self, principal: Principal, action: str) -> None:
        super().__init__(f"{principal.name} ({principal.role}) may not {action}")
        self.principal = principal
        self.action = action


class TooManyAttempts(Exception):
    """Too many wrong passwords for one name: wait before trying again."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


class CsrfError(Exception):
    """A form or cookie-authenticated API call without the session's CSRF token."""


class LoginThrottle:
    """Slows password guessing: after ``limit`` failures for one name within ``window``
    seconds, that name may not try again until the window has passed.

    Kept in memory on purpose: a restart forgets it, but each replica still caps the
    guesses it takes, and no store write is made for an anonymous request.
    """

    def __init__(
        self, limit: int = 5, window: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: dict[str, list[float]] = {}

    def _recent(self, name: str) -> list[float]:
        cutoff = self._clock() - self.window
        recent = [t for t in self._failures.get(name, []) if t > cutoff]
        if recent:
            self._failures[name] = recent
        else:
            self._failures.pop(name, None)
        return recent

    def retry_after(self, name: str) -> float:
        """Seconds until ``name`` may try again (0: now)."""
        recent = self._recent(name)
        if len(recent) < self.limit:
            return 0.0
        return max(0.0, recent[0] + self.window - self._clock())

    def failed(self, name: str) -> None:
        if len(self._failures) > 10_000:  # a flood of made-up names must not grow memory
            self._failures.clear()
        self._failures.setdefault(name, []).append(self._clock())

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)


class Auth:
    def __init__(self, config: MonitorConfig) -> None:
        self.throttle = LoginThrottle()
        self._users = {u.name: u for u in config.users}
        self._tokens = [(t.token.get_secret_value().encode(), t) for t in config.tokens]
        self.session_seconds = int(config.session_hours * 3600)
        self.has_users = bool(self._users)

    def login(self, name: str, password: str) -> Principal | None:
        """The principal, or None; raises :class:`TooManyAttempts` while a name is locked."""
        name = name[:64]
        wait = self.throttle.retry_after(name)
        if wait > 0:
            log.warning("login_throttled", user=name, retry_after=round(wait))
            raise TooManyAttempts(wait)
        user = self._users.get(name)
        ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
        if user is None or not ok:
            self.throttle.failed(name)
            log.warning("login_failed", user=name)
            return None
        self.throttle.succeeded(name)
        log.info("login", user=name)
        return Principal(user.name, user.role, "session")

    def start_session(self, request: Request, principal: Principal) -> None:
        request.session.clear()
        request.session["user"] = principal.name
        request.session["since"] = time.time()
        request.session["csrf"] = secrets.token_urlsafe(24)

    def principal(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "bearer" and credential:
            given = credential.strip().encode()
            for secret, token in self._tokens:
                if hmac.compare_digest(secret, given):
                    return Principal(token.name, token.role, "token")
            return None
        name = request.session.get("user") if "session" in request.scope else None
        since = request.session.get("since", 0) if name else 0
        if not isinstance(name, str) or time.time() - float(since) > self.session_seconds:
            return None
        user = self._users.get(name)
        if user is None:
            return None
        return Principal(user.name, user.role, "session")

    def require(self, request: Request) -> Principal:
        found = self.principal(request)
        if found is None:
            raise NotLoggedIn()
        return found

    @staticmethod
    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = secrets.token_urlsafe(24)
            request.session["csrf"] = token
        return token

    @staticmethod
    def check_csrf(request: Request, principal: Principal, submitted: str | None) -> None:
        """Token calls carry no cookie, so a forged cross-site request cannot ride on one."""
        if principal.via == "token":
            return
        expected = request.session.get("csrf")
        if not isinstance(expected, str) or not submitted:
            raise CsrfError()
        if not hmac.compare_digest(expected.encode(), submitted.encode()):
            raise CsrfError()
