"""Webhook signature checks. Every comparison is constant-time.

Standard Webhooks: base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")) in
``webhook-signature`` as space-separated ``v1,<sig>`` entries; the timestamp is
unix seconds and must be within the tolerance in both directions.

Zendesk: base64(HMAC-SHA256(secret, timestamp + body)) in
``X-Zendesk-Webhook-Signature``; the timestamp (ISO-8601) is in
``X-Zendesk-Webhook-Signature-Timestamp``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime

from syncd.errors import AuthenticationFailed


def _b64_hmac(key: bytes, message: bytes) -> bytes:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest())


def standard_webhooks_key(secret: str) -> bytes:
    """``whsec_``-prefixed secrets are base64; anything else is used as its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except binascii.Error:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    return secret.encode()


def sign_standard_webhook(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    return "v1," + _b64_hmac(key, f"{msg_id}.{timestamp}.".encode() + body).decode()


def verify_standard_webhook(
    key: bytes, headers: Mapping[str, str], body: bytes, *, now: float, tolerance: float = 300
) -> str:
    """Check a Standard Webhooks request; returns its ``webhook-id``."""
    msg_id = headers.get("webhook-id", "")
    ts_text = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    if not msg_id or not ts_text or not signatures:
        raise AuthenticationFailed(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    try:
        timestamp = int(ts_text)
    except ValueError:
        raise AuthenticationFailed("webhook-timestamp must be unix seconds") from None
    if abs(now - timestamp) > tolerance:
        raise AuthenticationFailed(
            f"webhook-timestamp is {int(now - timestamp)} s off; "
            f"the tolerance is {int(tolerance)} s"
        )
    expected = sign_standard_webhook(key, msg_id, timestamp, body).encode()
    for entry in signatures.split():
        if hmac.compare_digest(entry.encode(), expected):
            return msg_id
    raise AuthenticationFailed("webhook-signature does not match the body")


def sign_zendesk(secret: str, timestamp: str, body: bytes) -> str:
    return _b64_hmac(secret.encode(), timestamp.encode() + body).decode()


def verify_zendesk(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float, tolerance: float = 300
) -> None:
    signature = headers.get("x-zendesk-webhook-signature", "")
    timestamp = headers.get("x-zendesk-webhook-signature-timestamp", "")
    if not signature or not timestamp:
        raise AuthenticationFailed(
            "missing X-Zendesk-Webhook-Signature or X-Zendesk-Webhook-Signature-Timestamp header"
        )
    try:
        when = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise AuthenticationFailed(
            "X-Zendesk-Webhook-Signature-Timestamp is not ISO-8601"
        ) from None
    if abs(now - when) > tolerance:
        raise AuthenticationFailed(
            f"Zendesk signature timestamp is {int(now - when)} s off; "
            f"the tolerance is {int(tolerance)} s"
        )
    expected = sign_zendesk(secret, timestamp, body)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise AuthenticationFailed("X-Zendesk-Webhook-Signature does not match the body")


def check_shared_secret(given: str, secret: str, what: str) -> None:
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise AuthenticationFailed(f"missing or wrong {what}")
