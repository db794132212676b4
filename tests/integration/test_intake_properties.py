"""Arbitrary bytes and arbitrary JSON at every webhook endpoint.

Whatever arrives: never a 5xx, never a crash; with a valid secret, every
request ends up either as stored events or in quarantine; with a wrong one,
nothing is stored at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.intake.signing import sign_standard_webhook, sign_zendesk, standard_webhooks_key
from syncd.store.models import events, quarantine

from .conftest import App

SECRET = "prop-secret-value"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

CONFIG = f"""
[sources.plain]
secret = "{SECRET}"

[sources.signed]
signing = "standard_webhooks"
secret = "{WHSEC}"

[sources.usedesk]
kind = "usedesk"
secret = "{SECRET}"
poll = false

[sources.zendesk]
kind = "zendesk"
signing_secret = "{SECRET}"

[destinations.crm]
kind = "rest"
base_url = "http://127.0.0.1:9"
"""


def _plain(body: bytes, valid: bool) -> dict[str, str]:
    return {"X-Syncd-Secret": SECRET if valid else "wrong"}


# The signature covers the id: sign with the id that is sent.
def _signed_consistent(body: bytes, valid: bool) -> dict[str, str]:
    ts = int(time.time())
    msg_id = f"m{time.monotonic_ns()}"
    sig = sign_standard_webhook(standard_webhooks_key(WHSEC), msg_id, ts, body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sig if valid else "v1,AAAA",
    }


def _zendesk(body: bytes, valid: bool) -> dict[str, str]:
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sig = sign_zendesk(SECRET if valid else "wrong-secret", ts, body)
    return {
        "X-Zendesk-Webhook-Signature": sig,
        "X-Zendesk-Webhook-Signature-Timestamp": ts,
        "X-Zendesk-Webhook-Invocation-Id": f"inv-{time.monotonic_ns()}",
    }


#: (source name, a function giving the auth headers for a body, a URL query for it)
ENDPOINTS: list[tuple[str, Callable[[bytes, bool], dict[str, str]], Callable[[bool], str]]] = [
    ("plain", _plain, lambda valid: ""),
    ("signed", _signed_consistent, lambda valid: ""),
    # Usedesk signs nothing: the channel secret rides in the Redirect URL (or the body)
    ("usedesk", lambda body, valid: {}, lambda valid: f"?token={SECRET if valid else 'wrong'}"),
    ("zendesk", _zendesk, lambda valid: ""),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
ticket_like = st.fixed_dictionaries(
    {},
    optional={
        "ticket_id": st.one_of(st.integers(), st.text(max_size=8), st.none(), json_values),
        "event": st.sampled_from(["ticket_created", "comment_added", "status_changed", "x"])
        | json_values,
        "status": json_values,
        "comment": json_values,
        "client": json_values,
        "tags": json_values,
        "occurred_at": st.one_of(
            st.integers(min_value=-(10**12), max_value=10**12), st.text(max_size=25), json_values
        ),
        "custom_fields": json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    ticket_like.map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    from syncd.config import parse_config
    from syncd.store import Store

    store = Store(f"sqlite:///{tmp_path_factory.mktemp('prop')}/syncd.db")
    store.migrate()
    store.start()
    yield App(parse_config(CONFIG, "test.toml"), store)
    store.close()


def _counts(app: App) -> tuple[int, int]:
    return len(app.rows(events)), len(app.rows(quarantine))


@pytest.mark.parametrize(("source", "auth", "query"), ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, valid=st.booleans())
def test_any_body_is_stored_quarantined_or_refused(
    app: App,
    source: str,
    auth: Callable[[bytes, bool], dict[str, str]],
    query: Callable[[bool], str],
    body: bytes,
    valid: bool,
) -> None:
    before = _counts(app)
    response = app.client.post(
        f"/hooks/{source}{query(valid)}", content=body, headers=auth(body, valid)
    )
    after = _counts(app)
    assert response.status_code < 500, response.text
    data: dict[str, Any] = response.json()
    if not valid:
        assert response.status_code == 401 and after == before
    elif response.status_code == 202:
        # Stored as events; or, for a delivery that carries no ticket event (a Usedesk ping,
        # a Zendesk user event), acknowledged with nothing to store.
        assert after[1] == before[1]
        assert after[0] - before[0] == len(data["event_ids"]) - data["duplicates"]
    else:
        assert response.status_code == 422 and isinstance(data["error"], str) and data["error"]
        assert after == (before[0], before[1] + 1) and data["quarantine_id"]
