"""The ``busd`` command line (docs/reference/commands.md). Errors are one line; exit codes named."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from busd import __version__
from busd import events as ev
from busd.cli.options import ConfigOpt, JsonOpt, choose_context, guarded, settings
from busd.errors import BusdError, ConfigError, ExitCode, InvalidEvent

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="busd: the artifact bus. NATS JetStream in, DuckDB catalog and Parquet exports out.",
)


def versions() -> str:
    """busd's version, and those of the nats-server binary, nats-py and duckdb in use."""
    import subprocess
    from importlib import metadata

    import duckdb

    from busd.embedded import server_binary

    try:
        out = subprocess.run(
            [server_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split()
        server = out[-1].lstrip("v") if out else "unknown"
    except (OSError, subprocess.SubprocessError, BusdError):  # a report, not a failure
        server = "not found"
    return (
        f"busd {__version__} (nats-server {server}, nats-py {metadata.version('nats-py')}, "
        f"duckdb {duckdb.__version__})"
    )


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Show the versions.")] = False,
    context: Annotated[
        str | None,
        typer.Option(
            "--context",
            help="The nats CLI context to use (else NATS_CONTEXT, nats.context, the "
            "selected one); busd.toml and the environment override its settings.",
        ),
    ] = None,
) -> None:
    choose_context(context)
    if version:
        typer.echo(versions())
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


@app.command()
@guarded
def serve(
    config_path: ConfigOpt = None,
    drain: Annotated[bool, typer.Option(help="Return once the stream is fully consumed.")] = False,
) -> None:
    """Run the daemon (embedded nats-server when nats.url is empty)."""
    from busd.daemon import serve as run_serve

    s = settings(config_path)
    asyncio.run(run_serve(s, drain=drain, restore_signals=False))


@app.command()
@guarded
def init(config_path: ConfigOpt = None) -> None:
    """Create or update the stream and consumer and migrate the catalog; idempotent."""
    from busd import source
    from busd.catalog import Catalog

    s = settings(config_path)
    catalog = Catalog(s.catalog_path)
    version = catalog.schema_version()
    catalog.close()

    async def go() -> list[str]:
        from busd.cli.options import nats_for

        async with nats_for(s) as nc:
            problems = await source.ensure_stream(nc, s)
            await source.ensure_consumer(nc, s)
        return problems

    problems = asyncio.run(go())
    typer.echo(
        f"stream {s.nats.stream}, consumer {s.nats.consumer}, catalog schema version {version}: ok"
    )
    for problem in problems:
        typer.echo(f"warning: stream {s.nats.stream}: {problem}", err=True)


@app.command()
@guarded
def submit(
    files: Annotated[list[str], typer.Argument(help="NAME=PATH of each Parquet artifact.")],
    run_id: Annotated[str, typer.Option("--run-id", help="The run's id.")],
    kind: Annotated[str, typer.Option("--kind", help="The run's kind.")],
    producer: Annotated[str, typer.Option("--producer", help="Producer name.")] = "busd.submit",
    status: Annotated[str, typer.Option("--status")] = "succeeded",
    event_id: Annotated[str | None, typer.Option("--event-id")] = None,
    params: Annotated[str | None, typer.Option("--params", help="Run params as JSON.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Block until committed.")] = False,
    outbox: Annotated[
        Path | None,
        typer.Option("--outbox", help="Keep the event in this folder when NATS is unreachable."),
    ] = None,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 60.0,
    traceparent: Annotated[
        str | None,
        typer.Option(
            "--traceparent",
            help='The job\'s W3C trace context (e.g. "$TRACEPARENT"), sent as the '
            "traceparent header; busd keeps it with the event's catalog rows.",
        ),
    ] = None,
    config_path: ConfigOpt = None,
) -> None:
    """Publish one artifact event for files a job wrote (exit 3 if rejected with --wait)."""
    from busd.producer import build_event, checked_traceparent, submit_sync

    traceparent = checked_traceparent(traceparent)  # a bad one is a usage error, before work

    s = settings(config_path)
    mapping: dict[str, str] = {}
    for item in files:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"argument {item!r}: expected NAME=PATH")
        mapping[name] = path
    parsed = None
    if params is not None:
        try:
            parsed = json.loads(params)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--params: not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ConfigError("--params: must be a JSON object")
    event = build_event(
        run_id, kind, mapping, producer=producer, status=status, params=parsed, event_id=event_id
    )
    result = submit_sync(
        s,
        event,
        wait=wait,
        timeout_s=timeout_s,
        producer=producer,
        outbox=outbox,
        traceparent=traceparent,
    )
    typer.echo(json.dumps(result))


@app.command()
@guarded
def status(config_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Stream, consumer, lag, last commit and export freshness."""
    from busd import source
    from busd.manifest import read_manifest
    from busd.producer import nats_url

    s = settings(config_path)
    manifest = read_manifest(s.exports_path)

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {"nats": {"url": nats_url(s), "connected": False}}
        # unreachable or refused: one line and exit 1, like every command but serve
        nc = await source.connect(s.nats, nats_url(s), reconnect=False)
        try:
            js = nc.jetstream()
            out["nats"]["connected"] = True
            si = await js.stream_info(s.nats.stream)
            out["stream"] = {
                "name": s.nats.stream,
                "messages": si.state.messages,
                "bytes": si.state.bytes,
                "first_seq": si.state.first_seq,
                "last_seq": si.state.last_seq,
                "problems": source.broken_promises(si, s),
            }
            ci = await js.consumer_info(s.nats.stream, s.nats.consumer)
            out["consumer"] = {
                "name": s.nats.consumer,
                "pending": ci.num_pending,
                "ack_pending": ci.num_ack_pending,
                "redelivered": ci.num_redelivered,
                "delivered_seq": ci.delivered.stream_seq if ci.delivered else None,
                "ack_floor_seq": ci.ack_floor.stream_seq if ci.ack_floor else None,
            }
            if s.ha.enabled:
                from busd.ha.lease import Lease

                lease = Lease(nc, s)
                await lease.open()
                out["ha"] = {"active": await lease.holder(), "bucket": s.ha.bucket}
        except Exception as exc:  # noqa: BLE001 - report what is missing, do not crash
            out["error"] = str(exc) or type(exc).__name__
        finally:
            await nc.close()
        return out

    out = asyncio.run(go())
    now = dt.datetime.now(dt.UTC)
    out["catalog_seq"] = manifest.catalog_seq
    out["exports"] = {
        name: {
            "rows": e.rows,
            "catalog_seq": e.catalog_seq,
            "refreshed_at": e.refreshed_at.isoformat(),
            "age_s": round((now - e.refreshed_at).total_seconds(), 1),
        }
        for name, e in manifest.exports.items()
    }
    missing = manifest.artifacts_missing  # as busd serve last checked
    out["artifacts_missing"] = {
        "count": missing.count,
        "paths": missing.paths,
        "checked_at": missing.checked_at.isoformat() if missing.checked_at else None,
    }
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    for key, value in out.items():
        typer.echo(f"{key}: {json.dumps(value, default=str)}")


@app.command()
@guarded
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the exports (tables named after them).")],
    config_path: ConfigOpt = None,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
) -> None:
    """Read-only SQL over the golden exports; never opens (or locks) the catalog."""
    import duckdb

    from busd.manifest import exports_reader

    con = exports_reader(settings(config_path).exports_path)
    try:
        cur = con.execute(sql)
    except duckdb.Error as exc:
        raise ConfigError(f"query: {str(exc).splitlines()[0]}") from None
    names = [d[0] for d in cur.description or []]
    rows = cur.fetchall()
    if as_json:
        typer.echo(json.dumps([dict(zip(names, r, strict=True)) for r in rows], default=str))
    elif as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(names)
        writer.writerows(rows)
    else:
        typer.echo("\t".join(names))
        for r in rows:
            typer.echo("\t".join("" if v is None else str(v) for v in r))


@app.command()
def schema() -> None:
    """Print the artifact event JSON Schema."""
    typer.echo(ev.json_schema_text(), nl=False)


@app.command()
@guarded
def validate(
    files: Annotated[list[Path], typer.Argument(help="Event JSON files.")],
    subject: Annotated[str | None, typer.Option(help="Check the producer against it.")] = None,
    config_path: ConfigOpt = None,
    files_too: Annotated[
        bool, typer.Option("--files/--no-files", help="Also check the files named.")
    ] = True,
) -> None:
    """Check event files offline with the reasons busd would give (exit 3 if any is bad)."""
    from busd.validate import check_event

    s = settings(config_path)
    bad = 0
    for path in files:
        try:
            payload = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        try:
            event = ev.decode(payload)
            if subject:
                ev.resolve_identity(event, subject, None, ev.payload_sha256(payload))
            if files_too:
                check_event(event, s.roots, s.verify.checksum)
        except InvalidEvent as exc:
            bad += 1
            typer.echo(f"{path}: rejected: {exc.reason.value}: {exc.detail}")
            continue
        typer.echo(f"{path}: ok")
    if bad:
        raise typer.Exit(int(ExitCode.REJECTED))


def build_app() -> typer.Typer:
    """The app with every command registered (the commands of their own modules are
    registered here, once, so that importing them costs the others nothing)."""
    if not _registered:
        from busd.cli import admin, bench, migration

        admin.register(app)
        migration.register(app)
        bench.register(app)
        _registered.append(True)
    return app


_registered: list[bool] = []


def main() -> None:
    """The ``busd`` command: a usage error is one line on stderr and exit 2 (not a panel)."""
    build_app()
    try:
        code = app(standalone_mode=False)
    except Exception as exc:  # noqa: BLE001 - typer vendors click: usage errors by shape
        if getattr(exc, "exit_code", None) == ExitCode.USAGE and hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            path = getattr(ctx, "command_path", "busd") or "busd"
            typer.echo(f"{path}: {exc.format_message()}", err=True)
            sys.exit(int(ExitCode.USAGE))
        if type(exc).__name__ == "Abort":  # Ctrl-C while typer reads input
            typer.echo("busd: interrupted", err=True)
            sys.exit(int(ExitCode.RUNTIME))
        typer.echo(f"busd: unexpected error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(int(ExitCode.RUNTIME))
    _exit(code if isinstance(code, int) else 0)


def _exit(code: int) -> None:
    """Exit; at once when `serve` left a thread behind stuck on a disk that does not answer
    (the interpreter's clean-up would wait for DuckDB's connection, and that thread)."""
    daemon = sys.modules.get("busd.daemon.stop")
    if daemon is not None and daemon.threads_left_behind():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
