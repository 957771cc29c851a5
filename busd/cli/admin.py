"""Operator commands: rebuild, verify, export, rejections, outbox (docs/reference/commands.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from busd.cli.options import (
    ConfigOpt,
    JsonOpt,
    ask_daemon,
    from_catalog,
    guarded,
    nats_for,
    settings,
)
from busd.errors import BusdError, CatalogLocked, ConfigError, ExitCode

RecheckOpt = Annotated[
    bool,
    typer.Option(
        "--recheck",
        help="Read every file again, also those whose identity (device, inode, size, "
        "times) is unchanged since their recorded check.",
    ),
]


@guarded
def rebuild(config_path: ConfigOpt = None, recheck: RecheckOpt = False) -> None:
    """Replay the whole stream into a new catalog, refresh the exports, swap it in."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from busd.replay import rebuild as run_rebuild

    s = settings(config_path)

    async def go() -> Any:
        async with nats_for(s) as nc:
            with Progress(
                TextColumn("replaying"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} seq"),
                TextColumn("{task.fields[rate]:,.0f} ev/s"),
                TimeRemainingColumn(),
                transient=True,
            ) as bar:
                task = bar.add_task("replay", total=0, rate=0.0)

                def progress(done: int, total: int) -> None:
                    elapsed = bar.tasks[0].elapsed or 1e-9
                    bar.update(task, completed=done, total=total, rate=done / elapsed)

                return await run_rebuild(s, nc, progress, recheck=recheck)

    try:
        result = asyncio.run(go())
    except CatalogLocked:
        raise BusdError(
            "refusing to rebuild: a busd serve holds the catalog; stop it first"
        ) from None
    typer.echo(
        f"rebuilt {s.catalog_path}: {result.events:,} events to sequence "
        f"{result.last_seq:,} in {result.seconds:.2f}s ({result.rate:,.0f} ev/s); "
        f"outcomes {json.dumps(result.outcomes)}; {result.files()}"
    )


@guarded
def verify(
    config_path: ConfigOpt = None, as_json: JsonOpt = False, recheck: RecheckOpt = False
) -> None:
    """Replay into a temporary catalog and compare with the live one (exit 0 if equal)."""
    from busd.replay import verify as run_verify

    s = settings(config_path)

    async def go() -> Any:
        poison = await ask_daemon(s, "poison", {})
        async with nats_for(s) as nc:
            return await run_verify(
                s,
                nc,
                poison=None if poison is None else {int(k): v for k, v in poison.items()},
                recheck=recheck,
            )

    report = asyncio.run(go())
    total = sum(report.counts.values())
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "against": report.against,
                    "events": report.replay.events,
                    "last_seq": report.replay.last_seq,
                    "seconds": round(report.replay.seconds, 3),
                    "files_checked": report.replay.files_checked,
                    "files_reused": report.replay.files_reused,
                    "differences": report.counts,
                    "examples": [
                        {"table": d.table, "side": d.side, "row": d.row} for d in report.differences
                    ],
                    "artifacts_missing": [
                        {"name": n, "run_id": r, "path": p, "problem": why}
                        for n, r, p, why in report.missing
                    ],
                },
                default=str,
            )
        )
    else:
        r = report.replay
        typer.echo(
            f"replayed {r.events:,} events to sequence {r.last_seq:,} in {r.seconds:.2f}s "
            f"({r.rate:,.0f} ev/s; {r.files()}); compared with the live {report.against}: "
            + ", ".join(f"{t} {n} differences" for t, n in report.counts.items())
        )
        for d in report.differences:
            typer.echo(f"  {d.table} ({d.side}): {d.row}")
        if report.missing:
            typer.echo(
                f"{len(report.missing):,} committed artifacts whose file is gone or "
                "unreadable (left out of the data views; a rebuild would reject "
                "their events):"
            )
        for name, run_id, path, why in report.missing:
            typer.echo(f"  {name} of {run_id}: {path}: {why}")
    # a vanished file fails verify: the stream and the files no longer rebuild this catalog
    if total or report.missing:
        raise typer.Exit(int(ExitCode.RUNTIME))


@guarded
def export(
    names: Annotated[list[str] | None, typer.Argument(help="Exports (default: all).")] = None,
    config_path: ConfigOpt = None,
) -> None:
    """Refresh exports now, through the running daemon (or directly when none runs)."""
    from busd.catalog import Catalog

    s = settings(config_path)
    answer = asyncio.run(ask_daemon(s, "export", {"names": names or []}, timeout_s=300))
    if answer is None:
        from busd.exports import Exporter

        catalog = Catalog(s.catalog_path)
        try:
            exporter = Exporter.of(catalog.cursor(), s)
            wanted = names or list(exporter.exports)
            unknown = sorted(set(wanted) - set(exporter.exports))
            if unknown:
                raise ConfigError(f"no such export: {', '.join(unknown)}")
            exporter.refresh(wanted)
        finally:
            catalog.close()
        answer = {"refreshed": wanted, "by": "busd export (no daemon running)"}
    typer.echo(json.dumps(answer))


@guarded
def rejections_list(
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    producer: Annotated[str | None, typer.Option(help="Only this producer.")] = None,
    since: Annotated[str | None, typer.Option(help="Published at or after (ISO).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    config_path: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rejected events, oldest first."""
    from busd.daemon import answers

    s = settings(config_path)
    args = {"reason": reason, "producer": producer, "since": since, "limit": limit}
    rows = asyncio.run(ask_daemon(s, "rejections", args))
    if rows is None:
        rows = from_catalog(s, answers.list_rejections, **args)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        typer.echo(f"{r['seq']}\t{r['published_at']}\t{r['subject']}\t{r['reason']}\t{r['detail']}")


@guarded
def rejections_show(seq: int, config_path: ConfigOpt = None) -> None:
    """One rejection: its reason, detail and the original payload."""
    from busd.daemon import answers

    s = settings(config_path)
    row = asyncio.run(ask_daemon(s, "rejection", {"seq": seq}))
    if row is None:
        row = from_catalog(s, answers.get_rejection, seq)
    if not row:
        raise ConfigError(f"no rejection at sequence {seq}")
    typer.echo(json.dumps(row, indent=2))


@guarded
def rejections_retry(seqs: list[int], config_path: ConfigOpt = None) -> None:
    """Re-publish the original payloads to their original subjects (after a fix)."""
    from busd.daemon import answers
    from busd.producer import ArtifactBus

    s = settings(config_path)

    async def go() -> list[dict[str, Any]]:
        out = []
        async with ArtifactBus(s) as bus:
            for seq in seqs:
                row = await ask_daemon(s, "rejection", {"seq": seq})
                if row is None:
                    row = from_catalog(s, answers.get_rejection, seq)
                if not row:
                    raise ConfigError(f"no rejection at sequence {seq}")
                payload = (
                    bytes.fromhex(row["payload_hex"])
                    if row.get("payload_hex")
                    else row["payload"].encode()
                )
                # no Nats-Msg-Id: the duplicate window must not swallow a deliberate retry
                new_seq = await bus.publish_raw(
                    row["subject"], payload, {"Busd-Retry-Of": str(seq)}
                )
                out.append({"retried": seq, "seq": new_seq, "subject": row["subject"]})
        return out

    for line in asyncio.run(go()):
        typer.echo(json.dumps(line))


@guarded
def outbox_flush(folder: Path, config_path: ConfigOpt = None) -> None:
    """Send the events kept in FOLDER, oldest first, without doubles."""
    from busd.producer import ArtifactBus, flush_outbox

    s = settings(config_path)

    async def go() -> list[int]:
        async with ArtifactBus(s) as bus:
            return await flush_outbox(bus, folder)

    sent = asyncio.run(go()) if folder.is_dir() else []
    typer.echo(json.dumps({"sent": len(sent), "seqs": sent}))


def register(app: typer.Typer) -> None:
    rejections = typer.Typer(help="Inspect and retry rejected events.", no_args_is_help=True)
    outbox = typer.Typer(
        help="Events kept on disk while NATS was unreachable.", no_args_is_help=True
    )
    app.add_typer(rejections, name="rejections")
    app.add_typer(outbox, name="outbox")

    app.command()(rebuild)
    app.command()(verify)
    app.command()(export)
    rejections.command("list")(rejections_list)
    rejections.command("show")(rejections_show)
    rejections.command("retry")(rejections_retry)
    outbox.command("flush")(outbox_flush)
