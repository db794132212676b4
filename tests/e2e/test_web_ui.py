"""The monitor in a real headless Chromium, against a real `syncd run` and the Bitrix24 emulator.

Debian's ``/usr/bin/chromium`` is driven through Playwright's sync API; no browser is
ever downloaded (``scripts/test`` installs the Debian package when it is missing).
One daemon serves the whole module: it delivers to the Bitrix24 emulator and to the
generic REST sink, with a 2-second retry window so "missing" events take seconds to
make. Each test logs in with a fresh browser context (its own cookies).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from syncd.emulators.bitrix24 import Bitrix24State, create_bitrix24_emulator
from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import Faults, SinkState, create_sink

from .harness import API_TOKEN, CRM_TOKEN, Daemon, monitor_users

pytestmark = pytest.mark.e2e

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWER, VIEWER_PASSWORD = "manager", "manager-pass-5521"
ADMIN, ADMIN_PASSWORD = "admin", "admin-pass-8830"
VIEWER_TOKEN = "e2e-viewer-token-4be19c07"
#: Assertions wait this long (ms) for the page to catch up.
UI_TIMEOUT = 10_000

EXTRA = """
[destinations.bitrix24]
kind = "bitrix24"
webhook_url = "{webhook_url}"
rate_per_second = 200
burst = 400
[destinations.bitrix24.mapping.pipelines.support]
id = "2"
initial_stage = "C2:NEW"
[destinations.bitrix24.mapping.pipelines.support.stages]
new = "C2:NEW"
open = "C2:EXECUTING"
solved = "C2:WON"
[[destinations.bitrix24.mapping.rules]]
name = "all"
then.pipeline = "support"

[[monitor.tokens]]
name = "viewer-bot"
role = "viewer"
token = "{viewer_token}"
"""


@dataclass
class World:
    daemon: Daemon
    b24: Bitrix24State
    b24_url: str
    sink: SinkState

    @property
    def url(self) -> str:
        return self.daemon.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/test does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    b24_app, b24 = create_bitrix24_emulator(rate_per_second=500, burst=1000)
    sink_app, sink = create_sink(token=CRM_TOKEN)
    with ServerThread(b24_app) as b24_server, ServerThread(sink_app) as sink_server:
        extra = EXTRA.format(
            webhook_url=b24_server.url + b24.webhook_path(), viewer_token=VIEWER_TOKEN
        ) + monitor_users({VIEWER: ("viewer", VIEWER_PASSWORD), ADMIN: ("admin", ADMIN_PASSWORD)})
        # A 2 s window and a first retry due after it: two failed attempts make an event missing.
        daemon = Daemon(
            tmp_path_factory.mktemp("web-ui"),
            sink_server.url,
            window=2,
            schedule="[5]",
            extra=extra,
        )
        try:
            daemon.start()
            yield World(daemon, b24, b24_server.url, sink)
        finally:
            daemon.stop()


# --- helpers --------------------------------------------------------------------------


def wait_until(what: str, check: Callable[[], T | None], limit: float = 20.0) -> T:
    """Poll ``check`` until it returns something other than None (or fail after ``limit`` s)."""
    deadline = time.monotonic() + limit
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.05)


def api(world: World, path: str, token: str = API_TOKEN) -> Any:
    response = httpx.get(
        f"{world.url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    response.raise_for_status()
    return response.json()


def post_ticket(world: World, ticket: int, email: str) -> int:
    response = world.daemon.post(
        {
            "event": "ticket_created",
            "ticket_id": ticket,
            "subject": f"Order {ticket} has not arrived",
            "status": "new",
            "client": {"id": ticket, "name": f"Client {ticket}", "email": email},
            "comment": {"id": f"{ticket}-0", "text": "Where is my order?"},
        }
    )
    assert response.status_code == 202, response.text
    return int(response.json()["event_id"])


def deliveries(world: World, ticket: int) -> dict[str, dict[str, Any]]:
    """The ticket's deliveries by destination, as the events API lists them."""
    items = api(world, f"/api/v1/events?ticket={ticket}")["items"]
    return {item["destination"]: item for item in items}


def wait_states(world: World, ticket: int, states: dict[str, str]) -> dict[str, dict[str, Any]]:
    def _check() -> dict[str, dict[str, Any]] | None:
        found = deliveries(world, ticket)
        ok = all(found.get(dest, {}).get("state") == state for dest, state in states.items())
        return found if ok else None

    return wait_until(f"ticket {ticket} to reach {states}", _check)


def deals_of(b24: Bitrix24State, ticket: int) -> list[dict[str, Any]]:
    with b24.lock:
        return [
            dict(d) for d in b24.deals.values() if str(d.get("ORIGIN_ID")).endswith(f":{ticket}")
        ]


def log_in(browser: Browser, world: World, user: str, password: str) -> Page:
    page = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 800}).new_page()
    page.set_default_timeout(UI_TIMEOUT)
    page.goto(f"{world.url}/login")
    page.get_by_label("User").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_test_id("who")).to_contain_text(user)
    return page


def filter_events(page: Page, *, state: str = "", destination: str = "", client: str = "") -> None:
    """Fill the events list's filter form as a person would, and submit it."""
    if state:
        page.get_by_label("State").select_option(state)
    if destination:
        page.get_by_label("Destination").select_option(destination)
    if client:
        page.get_by_label("Client e-mail or phone").fill(client)
    page.get_by_role("button", name="Filter").click()


# --- the scenarios ----------------------------------------------------------------------


def test_viewer_finds_a_ticket_by_client_email_and_sees_the_deal(
    world: World, browser: Browser
) -> None:
    post_ticket(world, 9101, "Marta.Sokolova@Example.com")
    post_ticket(world, 9102, "someone.else@example.com")
    for ticket in (9101, 9102):
        wait_states(world, ticket, {"bitrix24": "delivered", "crm": "delivered"})
    [deal] = deals_of(world.b24, 9101)

    page = log_in(browser, world, VIEWER, VIEWER_PASSWORD)
    page.get_by_role("link", name="Events", exact=True).click()
    # Typed the way a manager copies it from a letter: other case, stray spaces.
    filter_events(page, client="  marta.sokolova@EXAMPLE.com ")
    expect(page).to_have_url(re.compile(r"/events\?.*client=.*marta\.sokolova%40EXAMPLE\.com"))
    rows = page.get_by_test_id("event-row")
    expect(rows).to_have_count(2)  # one row per destination, and not the other client's ticket
    expect(rows.get_by_test_id("ticket-link")).to_have_text(["helpdesk 9101"] * 2)

    # The URL is the view: a fresh page opened from it shows the same rows.
    shared = page.context.new_page()
    shared.goto(page.url)
    expect(shared.get_by_test_id("ticket-link")).to_have_text(["helpdesk 9101"] * 2)
    shared.close()

    rows.get_by_test_id("ticket-link").first.click()
    expect(page).to_have_url(f"{world.url}/tickets/helpdesk/9101")
    landed = page.get_by_test_id("landed")
    expect(landed).to_contain_text(deal["ID"])
    # One row per CRM record: the contact once, though it is also linked by its e-mail.
    expect(landed.locator("tbody tr").filter(has_text="bitrix24")).to_have_count(2)
    link = page.get_by_test_id("crm-link-bitrix24-deal")
    expect(link).to_have_attribute("href", f"{world.b24_url}/crm/deal/details/{deal['ID']}/")
    # And the link opens the portal's own page of that deal.
    with page.context.expect_page() as opened:
        link.click()
    portal = opened.value
    portal.wait_for_load_state()
    assert portal.url == f"{world.b24_url}/crm/deal/details/{deal['ID']}/"
    expect(portal.locator("body")).to_contain_text(f'"ORIGIN_ID":"{deal["ORIGIN_ID"]}"')
    page.context.close()


def test_admin_resends_the_missing_events_of_one_destination(
    world: World, browser: Browser
) -> None:
    tickets = (9201, 9202)
    # Both CRMs refuse everything until each event's 2 s retry window has closed.
    world.b24.fail_next(1_000_000, 500)
    with world.sink.lock:
        world.sink.faults = Faults(fail_count=1_000_000, fail_status=500)
    try:
        for ticket in tickets:
            post_ticket(world, ticket, f"client{ticket}@example.com")
        for ticket in tickets:
            wait_states(world, ticket, {"bitrix24": "expired", "crm": "expired"})
    finally:
        world.b24.fail_next(0, 500)
        with world.sink.lock:
            world.sink.faults = Faults()
    assert all(not deals_of(world.b24, t) for t in tickets)

    page = log_in(browser, world, ADMIN, ADMIN_PASSWORD)
    page.goto(f"{world.url}/events")
    # Resending everything is not offered on the unfiltered list, only once a filter is set.
    expect(page.get_by_test_id("event-row").first).to_be_visible()
    expect(page.get_by_test_id("resend-all")).to_have_count(0)
    assert page.request.get(f"{world.url}/resend/confirm").status == 400
    filter_events(page, state="expired", destination="bitrix24")
    expect(page).to_have_url(re.compile(r"state=expired"))
    expect(page).to_have_url(re.compile(r"destination=bitrix24"))
    rows = page.get_by_test_id("event-row")
    expect(rows).to_have_count(2)
    for ticket in tickets:
        row = rows.filter(has_text=f"helpdesk {ticket}")
        expect(row).to_contain_text("bitrix24")
        expect(row).to_contain_text("Missing")

    page.get_by_test_id("resend-all").click()
    expect(page).to_have_url(re.compile(r"/resend/confirm\?"))
    expect(page.get_by_test_id("resend-count")).to_have_text("2")
    page.get_by_test_id("confirm-resend").click()
    expect(page).to_have_url(re.compile(r"/resend/jobs/\d+$"))
    expect(page.get_by_test_id("job-state")).to_have_text("done")
    expect(page.get_by_test_id("job-progress")).to_contain_text("2 of 2")

    for ticket in tickets:
        wait_states(world, ticket, {"bitrix24": "delivered"})
    # Back to the same filter: nothing is missing in Bitrix24 any more...
    page.get_by_test_id("back-to-events").click()
    expect(page).to_have_url(re.compile(r"destination=bitrix24"))
    expect(page.get_by_test_id("no-events")).to_be_visible()
    # ...the two events are delivered there...
    page.goto(f"{world.url}/events?destination=bitrix24&state=delivered")
    for ticket in tickets:
        expect(
            page.get_by_test_id("event-row").filter(has_text=f"helpdesk {ticket}")
        ).to_contain_text("Delivered")
    # ...and the other destination's missing events were left alone.
    page.goto(f"{world.url}/events?state=missing&destination=crm")
    expect(page.get_by_test_id("ticket-link")).to_have_count(2)
    assert {deliveries(world, t)["crm"]["state"] for t in tickets} == {"expired"}
    assert [len(deals_of(world.b24, t)) for t in tickets] == [1, 1]

    # Resending a delivered event updates its deal rather than creating another.
    before = deliveries(world, 9201)["bitrix24"]
    deals_before = len(world.b24.deals)
    page.goto(f"{world.url}/events/{before['event_id']}")
    page.get_by_test_id("resend-bitrix24").click()
    expect(page.get_by_test_id("flash")).to_have_text("1 queued again")
    wait_until(
        "the resent delivery to be delivered again",
        lambda: (
            True
            if (d := deliveries(world, 9201)["bitrix24"])["state"] == "delivered"
            and d["attempts"] > before["attempts"]
            else None
        ),
    )
    assert len(world.b24.deals) == deals_before
    assert max(world.b24.deals_per_origin().values()) == 1

    page.goto(f"{world.url}/audit")
    audit = page.get_by_test_id("audit")
    expect(
        audit.locator("tr").filter(has_text="resend_filter").filter(has_text=ADMIN)
    ).to_contain_text("bitrix24")
    page.context.close()


def test_viewer_cannot_resend(world: World, browser: Browser) -> None:
    event_id = post_ticket(world, 9301, "viewer.case@example.com")
    delivered = wait_states(world, 9301, {"bitrix24": "delivered"})["bitrix24"]

    page = log_in(browser, world, VIEWER, VIEWER_PASSWORD)
    page.goto(f"{world.url}/events")
    expect(page.get_by_test_id("event-row").first).to_be_visible()
    expect(page.get_by_test_id("resend-all")).to_have_count(0)
    expect(page.get_by_test_id("resend-selected")).to_have_count(0)
    expect(page.locator("input[type=checkbox]")).to_have_count(0)
    page.goto(f"{world.url}/events/{event_id}")
    expect(page.get_by_test_id("delivery-bitrix24")).to_be_visible()
    expect(page.get_by_role("button", name="Resend")).to_have_count(0)

    # The API refuses the viewer's session (even with its CSRF token) and the viewer's token.
    csrf = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    by_session = page.request.post(
        f"{world.url}/api/v1/resend",
        data={"delivery_ids": [delivered["delivery_id"]]},
        headers={"X-CSRF-Token": csrf},
    )
    assert by_session.status == 403, by_session.text()
    by_token = httpx.post(
        f"{world.url}/api/v1/events/{event_id}/resend",
        headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
        timeout=10,
    )
    assert by_token.status_code == 403, by_token.text
    # The HTML form is refused too.
    by_form = page.request.post(
        f"{world.url}/resend/selected",
        form={"csrf": csrf, "delivery": str(delivered["delivery_id"])},
    )
    assert by_form.status == 403
    # Nothing was queued again.
    after = deliveries(world, 9301)["bitrix24"]
    assert (after["state"], after["attempts"]) == ("delivered", delivered["attempts"])

    page.get_by_role("link", name="Audit log").click()
    denied = page.get_by_test_id("audit").locator("tr.o-denied")
    expect(denied.filter(has_text=VIEWER).filter(has_text="resend")).not_to_have_count(0)
    expect(denied.filter(has_text="token:viewer-bot")).not_to_have_count(0)
    page.context.close()


def test_wrong_password_gives_no_session(world: World, browser: Browser) -> None:
    context = browser.new_context(locale="en-US")
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT)
    page.goto(f"{world.url}/events?state=failed")
    # Not logged in: the login form, remembering where to go back to.
    expect(page).to_have_url(f"{world.url}/login?next=%2Fevents%3Fstate%3Dfailed")
    page.get_by_label("User").fill(VIEWER)
    page.get_by_label("Password").fill(VIEWER_PASSWORD + "-wrong")
    with page.expect_response(f"{world.url}/login") as answer:
        page.get_by_role("button", name="Log in").click()
    assert answer.value.status == 401
    expect(page.get_by_test_id("login-failed")).to_have_text("Wrong user name or password.")
    expect(page.get_by_test_id("who")).to_have_count(0)

    page.goto(f"{world.url}/events")
    expect(page).to_have_url(f"{world.url}/login?next=%2Fevents")
    assert page.request.get(f"{world.url}/api/v1/stats").status == 401
    context.close()


def test_pages_load_nothing_from_elsewhere(world: World, browser: Browser) -> None:
    """Everything a page needs comes from the daemon itself: it works with no internet."""
    context = browser.new_context(locale="en-US")
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{world.url}/login")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    rules = page.evaluate("[...document.styleSheets].reduce((n, s) => n + s.cssRules.length, 0)")
    assert rules > 0, "the bundled stylesheet did not load"
    assert requested and all(u.startswith(world.url) for u in requested), requested
    context.close()
