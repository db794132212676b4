"""The ``syncd`` command line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import typer

from syncd import logs
from syncd.config import Config, load_config, resolve_store_url
from syncd.errors import ConfigError, StoreError

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
def check_config(config: Path = ConfigOption) -> None:
    """Validate a config file and print every problem found, each with its key."""
    cfg = _load_or_exit(config)
    typer.echo(
        f"{config}: OK ({len(cfg.sources)} source(s), {len(cfg.destinations)} destination(s), "
        f"store {resolve_store_url(cfg).split('://', 1)[0]})"
    )


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
