"""The monitor's JSON API, pages and auth, on real SQLite and PostgreSQL stores.

Data goes in through the real outbox (`enqueue`), then deliveries are moved to
the states a test needs with plain updates, as the dispatcher would leave them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from starlette.middleware.sessions import SessionMiddleware

from syncd.config import Config, parse_config
from syncd.daemon import build_app, build_intake
from syncd.events import IncomingEvent
from syncd.intake.routes import FrontDoor
from syncd.monitor.app import Monitor, build_monitor
from syncd.monitor.metrics import IntakeCounter
from syncd.monitor.passwords import hash_password
from syncd.retry import outbox
from syncd.store import Store
from syncd.store.models import audit, deliveries, links, resend_jobs

ADMIN_PW = "admin-pass-4821"
VIEWER_PW = "viewer-pass-9317"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
_HASHES = {"admin": hash_password(ADMIN_PW), "viewer": hash_password(VIEWER_PW)}

CONFIG = f"""
[monitor]
session_secret = "session-signing-key-for-tests-only"

[sources.hd]
secret = "hook-secret-value"
[sources.zd]
secret = "hook-secret-value-2"

[destinations.b24]
kind = "rest"
base_url = "http://127.0.0.1:9"
[destinations.amo]
kind = "rest"
base_url = "http://127.0.0.1:9"

[[monitor.users]]
name = "anna"
role = "admin"
password_hash = "{_HASHES["admin"]}"
[[monitor.users]]
name = "max"
role = "viewer"
password_hash = "{_HASHES["viewer"]}"
[[monitor.tokens]]
name = "ops-bot"
role = "admin"
token = "{ADMIN_TOKEN}"
[[monitor.tokens]]
name = "grafana"
role = "viewer"
token = "{VIEWER_TOKEN}"
"""

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
NOW = time.time()


class Env:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.config: Config = parse_config(CONFIG, "test.toml")
        self.intake = build_intake(store, self.config, None)
        self.woken = 0
        self.monitor: Monitor = build_monitor(
            store, self.config, intake=self.intake, wake=self._wake
        )
        self.app = build_app(store, self.config, self.intake, monitor=self.monitor)

    def _wake(self) -> None:
        self.woken += 1

    def client(self, headers: dict[str, str] | None = None) -> TestClient:
        return TestClient(self.app, headers=headers or {}, follow_redirects=False)

    def put(
        self,
        ticket: str,
        *,
        source: str = "hd",
        email: str | None = None,
        phone: str | None = None,
        dests: tuple[str, ...] = ("b24",),
        at: float = NOW,
        kind: str = "ticket_updated",
    ) -> int:
        event = IncomingEvent(
            source=source,
            ticket_id=ticket,
            kind=kind,
            payload={"source": source, "ticket_id": ticket, "kind": "ticket_updated"},
            destinations=dests,
            client_email=email,
            client_phone=phone,
        )
        return self.store.write_sync(lambda c: outbox.enqueue(c, event, at)).event_id

    def set_state(self, event_id: int, state: str, **values: Any) -> None:
        self.store.write_sync(
            lambda c: c.execute(
                update(deliveries)
                .where(deliveries.c.event_id == event_id)
                .values(state=state, next_attempt_at=None, finished_at=NOW, **values)
            )
        )

    def states(self) -> dict[int, str]:
        with self.store.read_engine.connect() as c:
            return {r.event_id: r.state for r in c.execute(select(deliveries))}

    def audit_rows(self) -> list[Any]:
        with self.store.read_engine.connect() as c:
            return list(c.execute(select(audit).order_by(audit.c.id)))


@pytest.fixture
def env(store: Store) -> Iterator[Env]:
    yield Env(store)


def login(client: TestClient, user: str, password: str) -> str:
    """Log in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    r = client.post(
        "/login", data={"user": user, "password": password, "csrf": csrf.group(1), "next": "/"}
    )
    assert r.status_code == 303, r.text
    events_page = client.get("/events")
    token = re.search(r'name="csrf" value="([^"]+)"', events_page.text)
    assert token is not None
    return token.group(1)


def ids_of(response: Any) -> list[int]:
    assert response.status_code == 200, response.text
    return [item["event_id"] for item in response.json()["items"]]


# --- access -------------------------------------------------------------------------------


def test_everything_needs_a_login(env: Env) -> None:
    anon = env.client()
    for path in ("/", "/events", "/events/1", "/tickets/hd/1", "/quarantine", "/audit"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
    for path in ("/api/v1/stats", "/api/v1/events", "/api/v1/overview", "/api/v1/audit"):
        assert anon.get(path).status_code == 401, path
    assert anon.post("/api/v1/resend", json={"delivery_ids": [1]}).status_code == 401
    assert (
        env.client({"Authorization": "Bearer not-a-real-token-at-all"})
        .get("/api/v1/stats")
        .status_code
        == 401
    )
    # ops endpoints stay open for probes and scrapers
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/readyz").json()["status"] == "ready"


def test_wrong_password_gets_no_session(env: Env) -> None:
    client = env.client()
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    r = client.post(
        "/login", data={"user": "anna", "password": "wrong", "csrf": csrf.group(1), "next": "/"}
    )
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    assert client.get("/events").status_code == 303
    # an unknown user is refused the same way
    r = client.post("/login", data={"user": "nobody", "password": ADMIN_PW, "csrf": csrf.group(1)})
    assert r.status_code == 401
    assert client.get("/api/v1/stats").status_code == 401


def test_login_without_the_forms_csrf_token_is_refused(env: Env) -> None:
    client = env.client()
    client.get("/login")
    r = client.post("/login", data={"user": "anna", "password": ADMIN_PW, "csrf": "forged"})
    assert r.status_code == 403
    assert client.get("/events").status_code == 303


def test_login_redirect_stays_on_this_site(env: Env) -> None:
    client = env.client()
    page = client.get("/login?next=//evil.example/steal")
    assert 'name="next" value="/"' in page.text


def test_forged_csrf_token_is_refused_and_nothing_is_resent(env: Env) -> None:
    event_id = env.put("T1")
    env.set_state(event_id, "failed")
    client = env.client()
    login(client, "anna", ADMIN_PW)
    [delivery] = [r for r in env.states()]
    r = client.post("/resend/selected", data={"delivery": str(delivery), "csrf": "forged"})
    assert r.status_code == 403
    # the API with the same cookie but no X-CSRF-Token header is refused too
    r = client.post("/api/v1/resend", json={"delivery_ids": [delivery]})
    assert r.status_code == 403
    assert env.states()[event_id] == "failed"


def test_viewer_cannot_resend_and_the_attempt_is_audited(env: Env) -> None:
    event_id = env.put("T1")
    env.set_state(event_id, "expired")
    # a viewer's token
    r = env.client(VIEWER).post("/api/v1/resend", json={"delivery_ids": [1]})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    # a viewer's session: no resend controls, and the form post is refused
    client = env.client()
    csrf = login(client, "max", VIEWER_PW)
    page = client.get("/events").text
    assert 'name="delivery"' not in page and "Resend all matching" not in page
    r = client.post("/resend/selected", data={"delivery": "1", "csrf": csrf})
    assert r.status_code == 403
    assert client.get("/resend/confirm?state=missing").status_code == 403
    assert env.states()[event_id] == "expired"
    denied = [(r.actor, r.action, r.outcome) for r in env.audit_rows()]
    assert ("token:grafana", "resend", "denied") in denied
    assert ("max", "resend", "denied") in denied
    # the audit page shows them, to viewers too
    assert "denied" in client.get("/audit").text


def test_user_removed_from_config_loses_the_session(env: Env, store: Store) -> None:
    client = env.client()
    login(client, "max", VIEWER_PW)
    assert client.get("/events").status_code == 200

    def app_with(config_text: str) -> TestClient:
        config = parse_config(config_text, "test.toml")
        app = build_app(store, config, build_intake(store, config, None))
        return TestClient(app, cookies=client.cookies, follow_redirects=False)

    # the cookie works on a restarted daemon with the same config and signing key...
    assert app_with(CONFIG).get("/events").status_code == 200
    # ...and not on one whose config no longer has "max"
    shrunk = CONFIG.replace('name = "max"', 'name = "maxim"')
    assert app_with(shrunk).get("/events").status_code == 303


# --- filters ------------------------------------------------------------------------------


@pytest.fixture
def filled(env: Env) -> dict[str, int]:
    ids = {
        "ivan_new": env.put("100", email="ivan@example.ru", at=NOW - 7200),
        "ivan_later": env.put("100", at=NOW - 3600),  # a status change without the client
        "olga": env.put("200", phone="+79991234567", at=NOW - 600),
        "zd": env.put("300", source="zd", email="z@example.com", dests=("amo",), at=NOW - 60),
        "both": env.put("400", dests=("b24", "amo"), at=NOW - 30),
    }
    env.set_state(ids["ivan_new"], "delivered")
    env.set_state(ids["ivan_later"], "failed", last_error="HTTP 400: Field STAGE_ID is invalid")
    env.set_state(ids["olga"], "expired", last_error="timed out after 15 s")
    return ids


def test_each_filter_of_the_events_api(env: Env, filled: dict[str, int]) -> None:
    api = env.client(VIEWER)
    get = lambda q: sorted(set(ids_of(api.get(f"/api/v1/events?{q}"))))  # noqa: E731
    f = filled
    assert get("") == sorted(f.values())
    assert get("state=failed") == [f["ivan_later"]]
    assert get("state=missing") == [f["olga"]]  # the product's word for expired
    assert get("state=failed&state=expired") == sorted([f["ivan_later"], f["olga"]])
    assert get("state=failed,expired") == sorted([f["ivan_later"], f["olga"]])
    assert get("state=pending") == sorted([f["zd"], f["both"]])
    assert get("destination=amo") == sorted([f["zd"], f["both"]])
    assert get("source=zd") == [f["zd"]]
    assert get("ticket=100") == sorted([f["ivan_new"], f["ivan_later"]])
    # by e-mail, spelled differently: both events of the ticket, not just the one naming him
    assert get("client=Ivan@Example.RU") == sorted([f["ivan_new"], f["ivan_later"]])
    # by phone, written the way a manager types it
    assert get("client=8 (999) 123-45-67") == [f["olga"]]
    assert get("client=nobody@example.ru") == []
    assert get("error=stage_id") == [f["ivan_later"]]
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW - 700))
    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW - 45))
    assert get(f"since={since}") == sorted([f["olga"], f["zd"], f["both"]])
    assert get(f"since={since}&until={until}") == sorted([f["olga"], f["zd"]])
    assert get("destination=amo&state=pending&source=hd") == [f["both"]]


def test_bad_filters_are_named(env: Env) -> None:
    api = env.client(VIEWER)
    r = api.get("/api/v1/events?state=lost")
    assert r.status_code == 422 and "unknown state 'lost'" in r.json()["detail"]
    r = api.get("/api/v1/events?since=yesterday")
    assert r.status_code == 422 and "not a date/time" in r.json()["detail"]


def test_filters_are_in_the_url_of_the_page(env: Env, filled: dict[str, int]) -> None:
    client = env.client()
    login(client, "max", VIEWER_PW)
    page = client.get("/events?state=missing&destination=b24").text
    assert f"#{filled['olga']}" in page and f"#{filled['zd']}" not in page
    # the filter form shows what is applied, so the link can be shared as it is
    assert '<option value="expired" selected>' in page
    assert "<option selected>b24</option>" in page


def test_pagination_returns_each_event_once(env: Env, store: Store) -> None:
    n = 200_000 if store.url.startswith("sqlite") else 20_000
    rows = [
        {
            "source": "hd",
            "ticket_id": str(i // 3),
            "kind": "ticket_updated",
            "payload": "{}",
            "received_at": NOW + i,
            "recovered_by_poll": False,
        }
        for i in range(n)
    ]
    from syncd.store.models import events

    def _fill(c: Any) -> None:
        c.execute(events.insert(), rows)
        ids = c.execute(select(events.c.id).order_by(events.c.id)).scalars().all()
        c.execute(
            deliveries.insert(),
            [
                {
                    "event_id": i,
                    "destination": "b24",
                    "source": "hd",
                    "ordering_key": f"hd:{i}",
                    "state": "delivered",
                    "attempts": 1,
                    "outcome_unknown": False,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i in ids
            ],
        )

    store.write_sync(_fill)
    api = env.client(VIEWER)
    seen: list[int] = []
    cursor: int | None = None
    pages = 0
    while True:
        q = "limit=500" + (f"&before={cursor}" if cursor else "")
        body = api.get(f"/api/v1/events?{q}").json()
        seen.extend(item["delivery_id"] for item in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == n and len(set(seen)) == n
    assert seen == sorted(seen, reverse=True)
    assert pages == n // 500
    # and back: the previous page of page 2 is page 1
    first = api.get("/api/v1/events?limit=50").json()
    second = api.get(f"/api/v1/events?limit=50&before={first['next_cursor']}").json()
    back = api.get(f"/api/v1/events?limit=50&after={second['prev_cursor']}").json()
    assert [i["delivery_id"] for i in back["items"]] == [i["delivery_id"] for i in first["items"]]


# --- resend -------------------------------------------------------------------------------


def test_resend_by_ids_queues_again_and_audits(env: Env, filled: dict[str, int]) -> None:
    api = env.client(ADMIN)
    with env.store.read_engine.connect() as c:
        failed = c.execute(
            select(deliveries.c.id).where(deliveries.c.event_id == filled["ivan_later"])
        ).scalar_one()
    r = api.post("/api/v1/resend", json={"delivery_ids": [failed]})
    assert r.status_code == 202 and r.json() == {"queued": 1, "requested": 1}
    assert env.states()[filled["ivan_later"]] == "pending"
    with env.store.read_engine.connect() as c:
        row = c.execute(select(deliveries).where(deliveries.c.id == failed)).one()
    assert row.first_failed_at is None and row.finished_at is None  # a fresh window
    assert env.woken == 1
    [entry] = env.audit_rows()
    assert (entry.actor, entry.action, entry.outcome, entry.count) == (
        "token:ops-bot",
        "resend",
        "ok",
        1,
    )


def test_resend_in_flight_deliveries_is_a_no_op(env: Env, filled: dict[str, int]) -> None:
    r = env.client(ADMIN).post(f"/api/v1/events/{filled['zd']}/resend")
    assert r.status_code == 200 and r.json() == {"queued": 0}
    assert env.client(ADMIN).post("/api/v1/events/999999/resend").status_code == 404


def test_resend_by_filter_runs_as_a_job(env: Env, filled: dict[str, int]) -> None:
    # one event loop for the whole test (the job runs on it after the request returns)
    with env.client(ADMIN) as api:
        r = api.post(
            "/api/v1/resend", json={"filter": {"state": "missing,failed", "destination": "b24"}}
        )
        assert r.status_code == 202
        job = r.json()
        assert job["total"] == 2
        assert api.portal is not None
        api.portal.call(env.monitor.jobs.wait)
        status = api.get(job["status_url"]).json()
    assert status["state"] == "done" and status["done"] == 2
    states = env.states()
    assert states[filled["olga"]] == "pending" and states[filled["ivan_later"]] == "pending"
    assert states[filled["ivan_new"]] == "delivered"
    [entry] = [r for r in env.audit_rows() if r.action == "resend_filter"]
    assert entry.count == 2 and '"destination": "b24"' in entry.detail


def test_resend_refuses_an_empty_filter(env: Env) -> None:
    r = env.client(ADMIN).post("/api/v1/resend", json={"filter": {}})
    assert r.status_code == 422 and "everything" in r.json()["detail"]


def test_admin_resends_through_the_pages(env: Env, filled: dict[str, int]) -> None:
    with env.client() as client:
        _resend_through_pages(env, client)
    assert env.states()[filled["olga"]] == "pending"
    with env.store.read_engine.connect() as c:
        assert c.execute(select(resend_jobs.c.actor)).scalar_one() == "anna"


def _resend_through_pages(env: Env, client: TestClient) -> None:
    csrf = login(client, "anna", ADMIN_PW)
    confirm = client.get("/resend/confirm?state=missing")
    assert confirm.status_code == 200
    assert re.search(r'data-testid="resend-count">1<', confirm.text)
    form_filter = re.search(r'name="filter" value="([^"]+)"', confirm.text)
    assert form_filter is not None
    import html

    r = client.post(
        "/resend/filter", data={"csrf": csrf, "filter": html.unescape(form_filter.group(1))}
    )
    assert r.status_code == 303 and r.headers["location"].startswith("/resend/jobs/")
    assert client.portal is not None
    client.portal.call(env.monitor.jobs.wait)
    job_page = client.get(r.headers["location"]).text
    assert "1 of 1" in job_page


def test_stale_running_jobs_are_marked_interrupted(env: Env) -> None:
    from syncd.monitor.actions import interrupt_stale_jobs

    env.store.write_sync(
        lambda c: c.execute(
            resend_jobs.insert().values(
                created_at=NOW, actor="anna", filter="{}", state="running", total=5, done=2
            )
        )
    )
    assert env.store.write_sync(interrupt_stale_jobs) == 1
    job = env.client(VIEWER).get("/api/v1/resend/jobs/1").json()
    assert job["state"] == "interrupted" and job["done"] == 2


# --- trace, detail, overview --------------------------------------------------------------


def test_ticket_trace_shows_where_it_landed(env: Env, filled: dict[str, int]) -> None:
    env.store.write_sync(
        lambda c: c.execute(
            links.insert().values(
                destination="b24",
                entity="deal",
                external_key="hd:100",
                crm_id="77",
                url="https://portal.example/crm/deal/details/77/",
                delivery_id=1,
                created_at=NOW,
                updated_at=NOW,
            )
        )
    )
    body = env.client(VIEWER).get("/api/v1/tickets/hd/100").json()
    assert [e["id"] for e in body["events"]] == [filled["ivan_new"], filled["ivan_later"]]
    assert body["links"][0]["url"] == "https://portal.example/crm/deal/details/77/"
    failed = body["events"][1]["deliveries"][0]
    assert failed["state"] == "failed" and "STAGE_ID" in failed["last_error"]
    client = env.client()
    login(client, "max", VIEWER_PW)
    page = client.get("/tickets/hd/100").text
    assert 'href="https://portal.example/crm/deal/details/77/"' in page
    assert env.client(VIEWER).get("/api/v1/tickets/hd/nope").status_code == 404


def test_overview_counts_by_destination_and_source(env: Env, filled: dict[str, int]) -> None:
    body = env.client(VIEWER).get("/api/v1/overview").json()
    by = {(r["destination"], r["source"]): r["counts"] for r in body["by_destination_and_source"]}
    assert by[("b24", "hd")]["delivered"] == 1 and by[("b24", "hd")]["expired"] == 1
    assert by[("amo", "zd")]["pending"] == 1
    assert body["totals"]["pending"] == 3 and body["totals"]["failed"] == 1
    # finished at NOW: in the chart's 24 hourly buckets once (the last or, across an hour
    # boundary since NOW was taken, the one before it)
    for state in ("delivered", "failed", "expired"):
        assert sum(h[state] for h in body["hourly"]) == 1, state
    assert sum(h["delivered"] for h in body["hourly"][-2:]) == 1
    assert body["oldest_pending_at"] is not None


async def test_the_overview_lists_replicas_once_there_are_several(env: Env) -> None:
    from syncd.replicas import Replicas

    client = env.client()
    login(client, "max", VIEWER_PW)
    first = Replicas(env.store, 2.0)
    await first.beat()
    assert 'data-testid="replicas"' not in client.get("/").text  # one daemon: nothing to say

    second = Replicas(env.store, 2.0)
    await second.beat()
    page = client.get("/").text
    assert 'data-testid="replicas"' in page
    assert page.count(">live<") == 2
    stats = env.client(VIEWER).get("/api/v1/stats").json()
    assert [r["id"] for r in stats["replicas"]] == [first.id, second.id]
    assert all(r["live"] for r in stats["replicas"])


def test_every_page_renders_for_a_viewer_in_both_languages(
    env: Env, filled: dict[str, int]
) -> None:
    client = env.client()
    login(client, "max", VIEWER_PW)
    pages = [
        "/",
        "/events",
        f"/events/{filled['olga']}",
        "/tickets/hd/100",
        "/quarantine",
        "/audit",
        "/events?state=missing",
    ]
    for path in pages:
        r = client.get(path)
        assert r.status_code == 200, path
    ru = client.get("/", headers={"Accept-Language": "ru-RU,ru;q=0.9,en;q=0.5"}).text
    assert "Обзор" in ru and "Доставлено" in ru
    # a choice made with ?lang= sticks for the session
    client.get("/?lang=en")
    assert "Overview" in client.get("/", headers={"Accept-Language": "ru"}).text


def test_every_template_string_has_a_russian_line() -> None:
    from pathlib import Path

    from syncd.monitor import i18n

    folder = Path(i18n.__file__).parent / "templates"
    used: set[str] = set()
    for template in folder.glob("*.html"):
        used.update(re.findall(r'_\("([^"]+)"\)', template.read_text(encoding="utf-8")))
    from syncd.monitor.ui import STATE_LABELS

    used.update(STATE_LABELS.values())
    missing = sorted(s for s in used if s not in i18n.RU)
    assert missing == []


# --- ops ----------------------------------------------------------------------------------


def test_metrics_report_the_store_and_intake(env: Env, filled: dict[str, int]) -> None:
    anon = env.client()
    anon.post("/hooks/hd", content=b"{not json", headers={"X-Syncd-Secret": "hook-secret-value"})
    text = anon.get("/metrics").text
    assert 'syncd_deliveries{destination="b24",state="failed"} 1.0' in text
    assert 'syncd_backlog{destination="amo"} 2.0' in text
    assert 'syncd_intake_requests_total{source="hd",status="422"} 1.0' in text
    assert 'syncd_quarantined{source="hd"} 1.0' in text
    assert "syncd_oldest_pending_age_seconds" in text
    # unknown paths do not become labels
    anon.post("/hooks/made-up-name", content=b"{}")
    assert 'source="made-up-name"' not in anon.get("/metrics").text


def test_readyz_fails_on_an_old_schema(tmp_path: Any) -> None:
    old = Store(f"sqlite:///{tmp_path}/old.db")
    from alembic import command

    from syncd.store import _alembic_config

    with old.write_engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0003")
    old.start()
    try:
        config = parse_config(CONFIG, "test.toml")
        app = build_app(old, config, build_intake(old, config, None))
        r = TestClient(app).get("/readyz")
        assert r.status_code == 503 and "syncd migrate" in r.json()["store"]
    finally:
        old.close()


def test_no_secret_reaches_a_page_or_the_api(env: Env, filled: dict[str, int]) -> None:
    client = env.client()
    login(client, "anna", ADMIN_PW)
    bodies = [client.get(p).text for p in ("/", "/events", "/tickets/hd/100", "/audit")]
    bodies.append(env.client(ADMIN).get("/api/v1/openapi.json").text)
    bodies.append(env.client(ADMIN).get("/api/v1/tickets/hd/100").text)
    for secret in ("hook-secret-value", ADMIN_TOKEN, VIEWER_TOKEN, _HASHES["admin"]):
        assert all(secret not in body for body in bodies)


def test_admin_reingests_a_quarantined_webhook_after_a_config_fix(env: Env, store: Store) -> None:
    body = b'{"ticket": {"number": 501}, "subject": "Broken order"}'
    r = env.client().post(
        "/hooks/hd", content=body, headers={"X-Syncd-Secret": "hook-secret-value"}
    )
    assert r.status_code == 422
    item = r.json()["quarantine_id"]
    listed = env.client(VIEWER).get("/api/v1/quarantine").json()["items"]
    assert [i["id"] for i in listed] == [item] and "ticket_id" in listed[0]["reason"]
    assert env.client(VIEWER).get(f"/api/v1/quarantine/{item}").json()["body"] == body.decode()
    # with the same config it is still unreadable, and that is audited too
    r = env.client(ADMIN).post(f"/api/v1/quarantine/{item}/reingest")
    assert "still unreadable" in r.json()["result"]
    # the admin fixes the field path and restarts: the held body becomes an event
    fixed = CONFIG.replace(
        'secret = "hook-secret-value"\n',
        'secret = "hook-secret-value"\nfields.ticket_id = "ticket.number"\n',
        1,
    )
    config = parse_config(fixed, "test.toml")
    intake = build_intake(store, config, None)
    app = build_app(store, config, intake, monitor=build_monitor(store, config, intake=intake))
    r = TestClient(app, headers=ADMIN).post(f"/api/v1/quarantine/{item}/reingest")
    assert "stored as event(s)" in r.json()["result"]
    assert env.client(VIEWER).get("/api/v1/events?ticket=501").json()["items"]
    outcomes = [(a.action, a.outcome) for a in env.audit_rows()]
    assert outcomes == [("reingest", "error"), ("reingest", "ok")]
    # a viewer may look but not re-ingest
    assert env.client(VIEWER).post(f"/api/v1/quarantine/{item}/reingest").status_code == 403


def test_webhooks_skip_the_monitors_middleware(env: Env) -> None:
    """Webhooks go to a FastAPI app holding only their route, counted, with none of the
    monitor's middleware; everything else, a logged-in browser included, to the web app."""
    front = env.app
    assert isinstance(front, FrontDoor) and isinstance(front.hooks, IntakeCounter)
    hooks = front.hooks.app
    assert isinstance(hooks, FastAPI) and hooks.user_middleware == []
    assert set(hooks.openapi()["paths"]) == {"/hooks/{source_name}"}
    assert any(m.cls is SessionMiddleware for m in front.web.user_middleware)

    browser = env.client()
    login(browser, "anna", ADMIN_PW)
    hook = browser.post(
        "/hooks/hd",
        json={"event": "ticket_created", "ticket_id": "front-1"},
        headers={"X-Syncd-Secret": "hook-secret-value"},
    )
    assert hook.status_code == 202, hook.text
    assert browser.get("/events?ticket=front-1").status_code == 200
    assert env.client(ADMIN).get("/api/v1/events?ticket=front-1").json()["items"]
    assert env.client().get("/hooks/hd").status_code == 405


def test_openapi_describes_the_monitor_api(env: Env) -> None:
    spec = env.client(VIEWER).get("/api/v1/openapi.json").json()
    for path in (
        "/api/v1/stats",
        "/api/v1/overview",
        "/api/v1/events",
        "/api/v1/events/{event_id}",
        "/api/v1/tickets/{source}/{ticket_id}",
        "/api/v1/resend",
        "/api/v1/events/{event_id}/resend",
        "/api/v1/resend/jobs/{job_id}",
        "/api/v1/quarantine",
        "/api/v1/quarantine/{item_id}/reingest",
        "/api/v1/audit",
        "/readyz",
        "/metrics",
        "/hooks/{source_name}",
    ):
        assert path in spec["paths"], path
    names = {p["name"] for p in spec["paths"]["/api/v1/events"]["get"]["parameters"]}
    assert {
        "state",
        "destination",
        "source",
        "ticket",
        "client",
        "error",
        "since",
        "until",
    } <= names


def test_password_guessing_is_slowed_down(env: Env) -> None:
    client = env.client()
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    form = {"user": "anna", "csrf": csrf.group(1), "next": "/"}
    for _ in range(5):
        assert client.post("/login", data={**form, "password": "guess"}).status_code == 401
    # the sixth try is refused before the password is even checked: even the right one
    r = client.post("/login", data={**form, "password": ADMIN_PW})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert client.get("/events").status_code == 303
    # other names are not locked out by it
    assert (
        client.post("/login", data={**form, "user": "max", "password": VIEWER_PW}).status_code
        == 303
    )


def test_pages_forbid_framing_and_foreign_scripts(env: Env) -> None:
    page = env.client().get("/login")
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'none'" in page.headers["Content-Security-Policy"]


async def test_overview_cache_serves_stale_while_it_refreshes(store: Store) -> None:
    from syncd.monitor.app import OverviewCache

    now = [1000.0]
    cache = OverviewCache(store, ttl=5, max_stale=60, clock=lambda: now[0])
    env = Env(store)
    env.put("1")
    first = await cache.get()
    assert first.totals["pending"] == 1
    env.put("2")
    now[0] += 4  # fresh enough: the same figures, no read
    assert (await cache.get()) is first
    now[0] += 2  # stale: answered at once with the old figures, refreshed behind
    assert (await cache.get()) is first
    await cache.wait_for_refresh()
    assert (await cache.get()).totals["pending"] == 2
    now[0] += 120  # too old to show: the caller waits for a fresh count
    env.put("3")
    assert (await cache.get()).totals["pending"] == 3
    # asked for fresh figures, it counts now even within the ttl
    env.put("3b")
    assert (await cache.get(fresh=True)).totals["pending"] == 4
    # ttl 0 always counts
    off = OverviewCache(store, ttl=0)
    env.put("4")
    assert (await off.get()).totals["pending"] == 5
