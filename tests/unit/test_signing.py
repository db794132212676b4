"""Standard Webhooks verification: ``{id}.{timestamp}.{body}``, base64 HMAC-SHA256, 5 minutes."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from syncd.errors import AuthenticationFailed
from syncd.intake.signing import (
    sign_standard_webhook,
    standard_webhooks_key,
    verify_standard_webhook,
)

KEY = b"a raw key of at least 24 bytes!!"
MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
TS = 1_674_087_231
BODY = b'{"type":"ticket.created","data":{"ticket_id":"42"}}'


def headers(signature: str, msg_id: str = MSG_ID, ts: int | str = TS) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def expected_signature(key: bytes, msg_id: str, ts: int, body: bytes) -> str:
    """Computed here from the spec, not with the code under test."""
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def test_signature_matches_the_spec() -> None:
    assert sign_standard_webhook(KEY, MSG_ID, TS, BODY) == expected_signature(KEY, MSG_ID, TS, BODY)


def test_valid_request_returns_its_id() -> None:
    sig = expected_signature(KEY, MSG_ID, TS, BODY)
    assert verify_standard_webhook(KEY, headers(sig), BODY, now=TS) == MSG_ID


def test_whsec_secret_is_base64_after_the_prefix() -> None:
    secret = "whsec_" + base64.b64encode(KEY).decode()
    key = standard_webhooks_key(secret)
    assert key == KEY
    sig = expected_signature(KEY, MSG_ID, TS, BODY)
    assert verify_standard_webhook(key, headers(sig), BODY, now=TS) == MSG_ID
    # Used as plain text, the same secret is a different key and must not verify.
    with pytest.raises(AuthenticationFailed):
        verify_standard_webhook(secret.encode(), headers(sig), BODY, now=TS)


def test_malformed_whsec_secret_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="base64"):
        standard_webhooks_key("whsec_not base64!")


def test_plain_secret_is_used_as_its_bytes() -> None:
    assert standard_webhooks_key("shared-secret") == b"shared-secret"


def test_one_valid_signature_among_several_is_enough() -> None:
    """During key rotation the sender signs with old and new keys."""
    old = expected_signature(b"the old key, now retired......", MSG_ID, TS, BODY)
    new = expected_signature(KEY, MSG_ID, TS, BODY)
    listed = f"v1a,c29tZSBlZDI1NTE5IHNpZ25hdHVyZQ== {old} {new}"
    assert verify_standard_webhook(KEY, headers(listed), BODY, now=TS) == MSG_ID


def test_only_other_keys_signatures_are_refused() -> None:
    old = expected_signature(b"the old key, now retired......", MSG_ID, TS, BODY)
    with pytest.raises(AuthenticationFailed, match="does not match"):
        verify_standard_webhook(KEY, headers(f"{old} {old}"), BODY, now=TS)


def test_signature_without_version_prefix_is_refused() -> None:
    bare = expected_signature(KEY, MSG_ID, TS, BODY).removeprefix("v1,")
    with pytest.raises(AuthenticationFailed):
        verify_standard_webhook(KEY, headers(bare), BODY, now=TS)


def test_tampered_body_is_refused() -> None:
    sig = expected_signature(KEY, MSG_ID, TS, BODY)
    with pytest.raises(AuthenticationFailed, match="does not match"):
        verify_standard_webhook(KEY, headers(sig), BODY.replace(b"42", b"43"), now=TS)


def test_signature_covers_the_id_and_timestamp() -> None:
    sig = expected_signature(KEY, MSG_ID, TS, BODY)
    with pytest.raises(AuthenticationFailed, match="does not match"):
        verify_standard_webhook(KEY, headers(sig, msg_id="msg_other"), BODY, now=TS)
    with pytest.raises(AuthenticationFailed, match="does not match"):
        verify_standard_webhook(KEY, headers(sig, ts=TS + 1), BODY, now=TS)


@pytest.mark.parametrize("offset", [-301, 301])
def test_stale_or_future_timestamp_is_refused(offset: int) -> None:
    ts = TS + offset
    sig = expected_signature(KEY, MSG_ID, ts, BODY)
    with pytest.raises(AuthenticationFailed, match="tolerance is 300 s"):
        verify_standard_webhook(KEY, headers(sig, ts=ts), BODY, now=TS)


@pytest.mark.parametrize("offset", [-300, 300])
def test_timestamp_at_the_tolerance_is_accepted(offset: int) -> None:
    ts = TS + offset
    sig = expected_signature(KEY, MSG_ID, ts, BODY)
    assert verify_standard_webhook(KEY, headers(sig, ts=ts), BODY, now=TS) == MSG_ID


def test_tolerance_is_a_parameter() -> None:
    sig = expected_signature(KEY, MSG_ID, TS, BODY)
    with pytest.raises(AuthenticationFailed):
        verify_standard_webhook(KEY, headers(sig), BODY, now=TS + 31, tolerance=30)


def test_timestamp_must_be_unix_seconds() -> None:
    sig = expected_signature(KEY, MSG_ID, TS, BODY)
    with pytest.raises(AuthenticationFailed, match="unix seconds"):
        verify_standard_webhook(KEY, headers(sig, ts="2023-01-19T00:13:51Z"), BODY, now=TS)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_headers_are_refused(missing: str) -> None:
    sig = expected_signature(KEY, MSG_ID, TS, BODY)
    partial = {k: v for k, v in headers(sig).items() if k != missing}
    with pytest.raises(AuthenticationFailed, match="missing"):
        verify_standard_webhook(KEY, partial, BODY, now=TS)
