"""Password hashes for monitor users: ``scrypt$n$r$p$salt$hash`` (hex).

scrypt comes with Python's hashlib (OpenSSL), is memory-hard, and needs no
extra dependency; the parameters travel with the hash so they can be raised later.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1
_PREFIX = "scrypt"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"{_PREFIX}${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def is_password_hash(value: str) -> bool:
    parts = value.split("$")
    if len(parts) != 6 or parts[0] != _PREFIX:
        return False
    try:
        n, r, p = (int(x) for x in parts[1:4])
        bytes.fromhex(parts[4])
        bytes.fromhex(parts[5])
    except ValueError:
        return False
    return n > 1 and r > 0 and p > 0


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check; a malformed stored hash never matches."""
    if not is_password_hash(stored):
        return False
    _, n, r, p, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(
        password.encode(),
        salt=bytes.fromhex(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(digest) // 2,
        maxmem=128 * int(n) * int(r) * int(p) + 1024 * 1024,
    )
    return hmac.compare_digest(candidate.hex(), digest)
