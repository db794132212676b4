"""The ``syncd`` command line."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer

from syncd import logs
from syncd.config import Config, load_config, resolve_store_url
from syncd.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from syncd.intake.service import Intake
    from syncd.monitor.queries import EventFilter
    from syncd.store import Store

T = TypeVar("T")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="syncd keeps a helpdesk and a CRM in sync.",
    pretty_exceptions_enable=False,
)

ConfigOption = typer.Option(..., "--config", "-c", help="Path to the TOML config file.")


def _load_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(f"syncd: the config has {len(exc.problems)} problem(s):", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(2) from None


@app.command("check-config")
def check_config(
    config: Path = ConfigOption,
    ping: bool = typer.Option(
        False,
        "--ping",
        help="Also call each destination, and each polled helpdesk, and check its credentials.",
    ),
) -> None:
    """Validate a config file and print every problem found, each with its key."""
    cfg = _load_or_exit(config)
    typer.echo(
        f"{config}: OK ({len(cfg.sources)} source(s), {len(cfg.destinations)} destination(s), "
        f"store {resolve_store_url(cfg).split('://', 1)[0]})"
    )
    if ping:
        logs.redactor.add(cfg.secret_values())
        failed = asyncio.run(_ping(cfg))
        raise typer.Exit(1 if failed else 0)


async def _ping(cfg: Config) -> int:
    """Call every destination and polled helpdesk once; print what works. Returns failures."""
    from syncd.connectors import registry
    from syncd.connectors.transport import AiohttpTransport
    from syncd.intake import registry as sources

    failed = 0
    for name, dest in cfg.destinations.items():
        connector = registry.build(
            name, dest, timeout=cfg.delivery.request_timeout_seconds, transport=AiohttpTransport()
        )
        label = f"destinations.{name} ({dest.kind})"
        failed += await _checked(label, connector.check, connector.aclose)
    for name, src in cfg.sources.items():
        poller = sources.build(name, src, default_region=cfg.intake.default_country).poller()
        if poller is not None:
            label = f"sources.{name} ({src.kind}) polling"
            failed += await _checked(label, poller.check, poller.aclose)
    return failed


async def _checked(
    label: str,
    check: Callable[[], Awaitable[list[str]]],
    close: Callable[[], Awaitable[None]],
) -> bool:
    """Run one credentials check and print what it verified; True when it failed."""
    from syncd.errors import DeliveryError

    try:
        lines = await check()
    except DeliveryError as exc:
        typer.echo(f"{label}: FAILED: {logs.redactor.clean(str(exc))}")
        return True
    finally:
        await close()
    typer.echo(f"{label}: OK")
    for line in lines:
        typer.echo(f"  {logs.redactor.clean(line)}")
    return False


@app.command()
def migrate(config: Path = ConfigOption) -> None:
    """Create or upgrade the store's schema, keeping its data."""
    from syncd.store import Store

    cfg = _load_or_exit(config)
    store = Store(resolve_store_url(cfg), busy_timeout_ms=cfg.store.busy_timeout_ms)
    try:
        before, after = store.migrate()
    except StoreError as exc:
        typer.echo(f"syncd: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    if before == after:
        typer.echo(f"store already at schema version {after}")
    else:
        typer.echo(f"store migrated from {before or 'empty'} to {after}")


@app.command()
def run(
    config: Path = ConfigOption,
    no_migrate: bool = typer.Option(
        False, "--no-migrate", help="Refuse to start on an old schema."
    ),
) -> None:
    """Run the daemon: intake, dispatcher and scheduler, until SIGTERM or Ctrl-C."""
    from syncd.daemon import serve

    cfg = _load_or_exit(config)
    logs.configure(cfg.logging.level, cfg.logging.format)
    try:
        code = asyncio.run(serve(cfg, migrate=not no_migrate))
    except StoreError as exc:
        typer.echo(f"syncd: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@app.command()
def stats(config: Path = ConfigOption) -> None:
    """Print delivery counts per destination and state, straight from the store."""
    from syncd.retry import outbox
    from syncd.store import Store

    cfg = _load_or_exit(config)
    store = Store(resolve_store_url(cfg), busy_timeout_ms=cfg.store.busy_timeout_ms)
    try:
        store.check_schema()
        with store.read_engine.connect() as conn:
            counts = outbox.counts_by_state(conn)
    except StoreError as exc:
        typer.echo(f"syncd: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    json.dump(counts, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _open_store(cfg: Config) -> Store:
    from syncd.store import Store

    store = Store(resolve_store_url(cfg), busy_timeout_ms=cfg.store.busy_timeout_ms)
    try:
        store.check_schema()
    except StoreError as exc:
        store.close()
        typer.echo(f"syncd: {exc}", err=True)
        raise typer.Exit(1) from None
    return store


async def _with_intake(cfg: Config, work: Callable[[Intake], Awaitable[T]]) -> T:
    from syncd.daemon import build_intake

    store = _open_store(cfg)
    store.start()
    try:
        return await work(build_intake(store, cfg, None))
    finally:
        store.close()


@app.command()
def poll(
    config: Path = ConfigOption,
    source: list[str] = typer.Option([], "--source", "-s", help="Poll only these sources."),
) -> None:
    """Poll the helpdesks once now and store what their webhooks missed."""
    from syncd.daemon import build_poll_runners

    cfg = _load_or_exit(config)
    logs.configure(cfg.logging.level, "console")

    async def _run(intake: Intake) -> int:
        runners = [r for r in build_poll_runners(intake) if not source or r.source in source]
        if not runners:
            typer.echo("no source to poll (none is configured for polling)", err=True)
            return 1
        failed = 0
        for runner in runners:
            try:
                report = await runner.run_once(force=True)
            finally:
                await runner.poller.aclose()
            if report.error:
                failed += 1
                typer.echo(f"{report.source}: failed: {report.error}")
            else:
                typer.echo(
                    f"{report.source}: {report.tickets} changed ticket(s) in "
                    f"{report.pages} page(s), {report.recovered} missed event(s) recovered"
                )
        return 1 if failed else 0

    raise typer.Exit(asyncio.run(_with_intake(cfg, _run)))


@app.command()
def preview(
    payload: Path = typer.Argument(..., help="A webhook body, as the helpdesk would send it."),
    config: Path = ConfigOption,
    source: str | None = typer.Option(None, help="Source name (default: the only one)."),
    destination: str | None = typer.Option(None, help="Only this destination."),
    client: str = typer.Option(
        "unknown", help="Is the client already in the CRM: new, existing, unknown."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Show the plan a payload would produce: the matching rule and why, and every operation."""
    from syncd.preview import preview as run_preview
    from syncd.preview import render_text

    cfg = _load_or_exit(config)
    if source is None:
        if len(cfg.sources) != 1:
            typer.echo(
                f"syncd: say which source with --source ({', '.join(cfg.sources)})", err=True
            )
            raise typer.Exit(2)
        source = next(iter(cfg.sources))
    if client not in ("new", "existing", "unknown"):
        typer.echo("syncd: --client is new, existing or unknown", err=True)
        raise typer.Exit(2)
    result = run_preview(cfg, source, payload.read_bytes(), destination=destination, client=client)  # type: ignore[arg-type]
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else render_text(result))
    failed = "plans" not in result or any("error" in p or not p["matched"] for p in result["plans"])
    raise typer.Exit(1 if failed else 0)


quarantine_app = typer.Typer(no_args_is_help=True, help="Webhooks syncd could not read.")
app.add_typer(quarantine_app, name="quarantine")


@quarantine_app.command("list")
def quarantine_list(
    config: Path = ConfigOption,
    state: str = typer.Option("held", help="held, reingested, discarded or all."),
    limit: int = typer.Option(50),
) -> None:
    """List quarantined webhooks, newest first."""
    from syncd.intake import quarantine

    cfg = _load_or_exit(config)
    store = _open_store(cfg)
    try:
        with store.read_engine.connect() as conn:
            items = quarantine.list_held(conn, state=None if state == "all" else state, limit=limit)
    finally:
        store.close()
    if not items:
        typer.echo("quarantine is empty")
    for item in items:
        when = datetime.fromtimestamp(item.received_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{item.id:>6}  {when}Z  {item.source:<12} {item.state:<10} {item.reason}")


@quarantine_app.command("show")
def quarantine_show(item_id: int, config: Path = ConfigOption) -> None:
    """Print one quarantined webhook: reason, headers and the raw body."""
    from syncd.intake import quarantine

    cfg = _load_or_exit(config)
    store = _open_store(cfg)
    try:
        with store.read_engine.connect() as conn:
            item = quarantine.get(conn, item_id)
    finally:
        store.close()
    if item is None:
        typer.echo(f"no quarantine item {item_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"id: {item.id}\nsource: {item.source}\nstate: {item.state}\nreason: {item.reason}")
    typer.echo(f"headers: {json.dumps(item.headers, ensure_ascii=False)}")
    typer.echo("body:")
    typer.echo(item.body.decode("utf-8", errors="replace"))


@quarantine_app.command("reingest")
def quarantine_reingest(
    item_ids: list[int] = typer.Argument(None, help="Items to re-ingest."),
    all_held: bool = typer.Option(False, "--all", help="Re-ingest every held item."),
    config: Path = ConfigOption,
) -> None:
    """Parse quarantined webhooks again with the current config and store their events."""
    from syncd.intake import quarantine
    from syncd.intake.service import Accepted

    cfg = _load_or_exit(config)

    async def _run(intake: Intake) -> int:
        ids = list(item_ids or [])
        if all_held:
            held = await intake.store.read(lambda c: quarantine.list_held(c, limit=100_000))
            ids.extend(item.id for item in held)
        if not ids:
            typer.echo("nothing to re-ingest: give item ids or --all", err=True)
            return 2
        still_bad = 0
        for item_id in ids:
            try:
                outcome = await intake.reingest(item_id)
            except (KeyError, ValueError) as exc:
                typer.echo(f"{item_id}: {exc}")
                still_bad += 1
                continue
            if isinstance(outcome, Accepted):
                typer.echo(f"{item_id}: stored as event(s) {outcome.event_ids}")
            else:
                still_bad += 1
                typer.echo(f"{item_id}: still unreadable: {outcome.reason}")
        return 1 if still_bad else 0

    raise typer.Exit(asyncio.run(_with_intake(cfg, _run)))


def _filter_from_options(
    state: list[str],
    destination: str | None,
    source: str | None,
    ticket: str | None,
    client: str | None,
    error: str | None,
    since: str | None,
    until: str | None,
    event: int | None = None,
) -> EventFilter:
    from syncd.monitor.queries import EventFilter

    try:
        return EventFilter.from_query(
            {
                "state": state,
                "destination": destination,
                "source": source,
                "ticket": ticket,
                "client": client,
                "error": error,
                "since": since,
                "until": until,
                "event_id": str(event) if event is not None else None,
            }
        )
    except ValueError as exc:
        typer.echo(f"syncd: {exc}", err=True)
        raise typer.Exit(2) from None


StateOption = typer.Option(
    [], "--state", help="delivered, pending, retrying, failed, missing, coalesced (repeatable)."
)
DestinationOption = typer.Option(None, "--destination", help="Only this destination.")
SourceOption = typer.Option(None, "--source", help="Only this source.")
TicketOption = typer.Option(None, "--ticket", help="Only this ticket id.")
ClientOption = typer.Option(None, "--client", help="The client's e-mail or phone.")
ErrorOption = typer.Option(None, "--error", help="Text within the last error.")
SinceOption = typer.Option(None, "--since", help="Received at or after (ISO time, UTC).")
UntilOption = typer.Option(None, "--until", help="Received before (ISO time, UTC).")


@app.command()
def resend(
    config: Path = ConfigOption,
    event: list[int] = typer.Option([], "--event", help="Resend this event's deliveries."),
    state: list[str] = StateOption,
    destination: str | None = DestinationOption,
    source: str | None = SourceOption,
    ticket: str | None = TicketOption,
    client: str | None = ClientOption,
    error: str | None = ErrorOption,
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    """Queue finished deliveries again with a fresh retry window (works with the daemon down).

    Takes the events list's filters: `--state missing --destination bitrix24 --since
    2026-11-24T18:00` resends what was lost in Bitrix24 since 18:00 UTC. Mapping runs
    again with the current config when they are sent, and the links table makes a
    resent delivered event update its CRM records rather than duplicate them. Every
    resend is written to the audit log.
    """
    import getpass
    from dataclasses import replace

    from syncd.monitor import queries
    from syncd.monitor.actions import resend_by_filter_sync

    flt = _filter_from_options(state, destination, source, ticket, client, error, since, until)
    if flt.is_empty() and not event:
        typer.echo(
            "syncd: say what to resend: --event ID and/or a filter such as --state", err=True
        )
        raise typer.Exit(2)
    if not flt.states:
        flt = replace(flt, states=("delivered", "failed", "expired", "coalesced"))
    cfg = _load_or_exit(config)
    store = _open_store(cfg)
    actor = f"cli:{getpass.getuser()}"
    try:
        filters = [replace(flt, event_id=e) for e in event] or [flt]
        with store.read_engine.connect() as conn:
            total = sum(queries.count_deliveries(conn, f) for f in filters)
        if not total:
            typer.echo("nothing matches")
            return
        if not yes and not typer.confirm(f"Resend {total} deliveries?"):
            raise typer.Exit(1)
        count = sum(resend_by_filter_sync(store, f, actor=actor) for f in filters)
    finally:
        store.close()
    typer.echo(f"queued {count} deliveries again")


events_app = typer.Typer(help="Look at events and their deliveries.", no_args_is_help=True)
app.add_typer(events_app, name="events")


@events_app.command("list")
def events_list(
    config: Path = ConfigOption,
    state: list[str] = StateOption,
    destination: str | None = DestinationOption,
    source: str | None = SourceOption,
    ticket: str | None = TicketOption,
    client: str | None = ClientOption,
    error: str | None = ErrorOption,
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    limit: int = typer.Option(50, min=1, max=500),
    before: int | None = typer.Option(None, help="Continue after this cursor (older rows)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List events newest first, one line per event and destination (same filters as the UI)."""
    from syncd.monitor import queries

    flt = _filter_from_options(state, destination, source, ticket, client, error, since, until)
    cfg = _load_or_exit(config)
    store = _open_store(cfg)
    try:
        with store.read_engine.connect() as conn:
            page = queries.list_deliveries(conn, flt, before=before, limit=limit)
    finally:
        store.close()
    for row in page.rows:
        if as_json:
            typer.echo(json.dumps(row.as_json(), ensure_ascii=False))
            continue
        when = queries.iso(row.received_at)
        who = row.client_email or row.client_phone or ""
        err = f"  {row.last_error[:80]}" if row.last_error else ""
        typer.echo(
            f"{row.event_id:>8} {when} {row.source}:{row.ticket_id:<10} {row.kind:<16} "
            f"{row.destination:<12} {row.state:<10} {row.attempts:>2} {who}{err}"
        )
    if not page.rows:
        typer.echo("no events match", err=True)
    elif page.next_cursor is not None and not as_json:
        typer.echo(f"more: --before {page.next_cursor}", err=True)


@app.command()
def status(
    config: Path = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """What a manager asks first: delivered, pending, failed, missing, per destination."""
    from syncd.intake import quarantine
    from syncd.monitor import queries
    from syncd.retry import outbox

    cfg = _load_or_exit(config)
    store = _open_store(cfg)
    try:
        with store.read_engine.connect() as conn:
            ov = queries.overview(conn)
            held = quarantine.count_by_source(conn)
            problems = outbox.destination_statuses(conn)
    finally:
        store.close()
    now = time.time()
    if as_json:
        out = {
            "totals": ov.totals,
            "by_destination_and_source": [
                {"destination": d, "source": s, "counts": c}
                for (d, s), c in sorted(ov.counts.items())
            ],
            "oldest_pending_age_seconds": None
            if ov.oldest_pending_at is None
            else round(now - ov.oldest_pending_at, 1),
            "lag_seconds": ov.lag_seconds,
            "quarantined": held,
            "destination_status": problems,
        }
        typer.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    shown = ("delivered", "pending", "in_flight", "retry_wait", "failed", "expired", "coalesced")
    titles = ("delivered", "pending", "sending", "retrying", "failed", "missing", "coalesced")
    typer.echo(f"{'destination':<14}{'source':<12}" + "".join(f"{t:>11}" for t in titles))
    for (dest, src), counts in sorted(ov.counts.items()):
        typer.echo(f"{dest:<14}{src:<12}" + "".join(f"{counts.get(s, 0):>11}" for s in shown))
    typer.echo(f"{'total':<26}" + "".join(f"{ov.totals.get(s, 0):>11}" for s in shown))
    oldest = "none" if ov.oldest_pending_at is None else f"{now - ov.oldest_pending_at:.0f} s"
    lag = "n/a" if ov.lag_seconds is None else f"{ov.lag_seconds:.1f} s"
    typer.echo(
        f"oldest pending: {oldest}   delivery lag: {lag}   quarantined: {sum(held.values())}"
    )
    for dest, info in sorted(problems.items()):
        typer.echo(f"{dest}: {info.get('problem') or 'paused'}")


@app.command("hash-password")
def hash_password_cmd(
    stdin: bool = typer.Option(False, "--stdin", help="Read the password from standard input."),
) -> None:
    """Print a password hash for `[[monitor.users]] password_hash`."""
    from syncd.monitor.passwords import hash_password

    if stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        typer.echo("syncd: use at least 8 characters", err=True)
        raise typer.Exit(2)
    typer.echo(hash_password(password))


@app.command()
def sink(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8790),
    token: str | None = typer.Option(
        None, envvar="SYNCD_SINK_TOKEN", help="Require this bearer token."
    ),
) -> None:
    """Serve the bundled generic REST receiver (what the demo delivers to)."""
    import uvicorn

    from syncd.emulators.sink import create_sink

    sink_app, _state = create_sink(token)
    uvicorn.run(sink_app, host=host, port=port, log_level="warning")


@app.command()
def demo(
    directory: Path | None = typer.Option(
        None, "--dir", help="Where to keep the demo's files (default: a temp dir)."
    ),
    port: int = typer.Option(8780, help="Port of the syncd HTTP server."),
    tickets: int = typer.Option(40, help="How many sample tickets to send."),
    exit_when_done: bool = typer.Option(
        False, "--exit-when-done", help="Stop once everything is delivered."
    ),
) -> None:
    """Run syncd on a fresh SQLite file against the bundled receiver, fed with sample tickets."""
    from syncd.demo import run_demo

    raise typer.Exit(
        asyncio.run(run_demo(directory, port=port, tickets=tickets, exit_when_done=exit_when_done))
    )


if __name__ == "__main__":  # pragma: no cover
    app()
