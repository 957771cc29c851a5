"""Migration commands: ``busd import files|catalog``, ``busd orphans`` (docs/reference/commands.md).

Only the command-line glue; the work is in :mod:`busd.migrate` and :mod:`busd.orphans`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from busd import config, model
from busd.cli.options import ConfigOpt, JsonOpt, guarded, nats_for, settings

if TYPE_CHECKING:  # imported when a command runs: they load pyarrow, DuckDB and nats-py
    from busd import migrate

ProducerOpt = Annotated[
    str | None,
    typer.Option(
        "--producer",
        help=f"Producer name (subject artifacts.<producer>); default {model.IMPORT_PRODUCER}.",
    ),
]


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A bar on stderr, so that stdout keeps only the result."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=max(total, 1))

        yield update


def run_import(
    s: config.Settings,
    plan_of: Callable[[Callable[[str, int, int], None]], migrate.Plan],
    as_json: bool,
) -> None:
    from busd import migrate, source

    with progress_bar() as progress:
        plan = plan_of(progress)

        async def go() -> migrate.Report:
            async with nats_for(s) as nc:
                await source.ensure_stream(nc, s)  # a first import may come before busd init
                return await migrate.publish(nc, plan, progress=progress)

        report = asyncio.run(go()) if plan.events else plan.report
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
        return
    typer.echo(
        f"published {report.published:,} events ({report.published_artifacts:,} "
        f"artifacts); already there: {report.already_there:,} events, "
        f"{report.already_there_artifacts:,} artifacts; skipped: {len(report.skipped):,}"
    )
    for what, why in report.skipped:
        typer.echo(f"  skipped {what}: {why}")


def register(app: typer.Typer) -> None:
    importer = typer.Typer(
        help="Register what existed before the bus, as ordinary events.", no_args_is_help=True
    )
    app.add_typer(importer, name="import")

    @importer.command("files")
    @guarded
    def import_files(
        roots: Annotated[
            list[Path] | None,
            typer.Argument(help="Folders to scan, inside the artifact roots (default: the roots)."),
        ] = None,
        producer: ProducerOpt = None,
        kind: Annotated[str, typer.Option("--kind", help="The runs' kind.")] = "imported",
        status: Annotated[str, typer.Option("--status", help="The runs' status.")] = "succeeded",
        min_age_s: Annotated[
            float,
            typer.Option(
                "--min-age", help="Leave out files changed less than this many seconds ago."
            ),
        ] = 60.0,
        config_path: ConfigOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Parquet files under the roots: one run per folder, an artifact per file."""
        from busd import migrate

        s = settings(config_path)
        run_import(
            s,
            lambda progress: migrate.plan_files(
                s,
                roots,
                producer=producer or migrate.DEFAULT_PRODUCER,
                kind=kind,
                status=status,
                min_age_s=min_age_s,
                progress=progress,
            ),
            as_json,
        )

    @importer.command("catalog")
    @guarded
    def import_catalog(
        legacy: Annotated[Path, typer.Argument(help="The legacy DuckDB catalog (read only).")],
        map_path: Annotated[
            Path,
            typer.Option("--map", help="TOML: legacy tables and columns for each event field."),
        ],
        producer: ProducerOpt = None,
        config_path: ConfigOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """The runs and artifacts of a legacy catalog: one event per run."""
        from busd.legacy import load_map, plan_catalog

        s = settings(config_path)
        mapping = load_map(map_path, producer=producer)
        run_import(
            s, lambda progress: plan_catalog(s, legacy, mapping, map_path, progress), as_json
        )

    @app.command()
    @guarded
    def orphans(
        roots: Annotated[
            list[Path] | None,
            typer.Argument(help="Folders to scan, inside the artifact roots (default: the roots)."),
        ] = None,
        config_path: ConfigOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Parquet files no committed event names, by folder; committed files now gone."""
        from busd.orphans import find

        s = settings(config_path)
        report = find(s, roots)
        if as_json:
            typer.echo(json.dumps(report.as_dict()))
            return
        if not report.export_found:
            typer.echo("no artifacts export yet: every file counts as an orphan")
        typer.echo(
            f"{report.orphan_count:,} orphans in {len(report.orphans):,} folders "
            f"({report.scanned:,} Parquet files scanned, {report.committed:,} committed "
            f"artifacts as of sequence {report.catalog_seq:,})"
        )
        for folder, files in sorted(report.orphans.items()):
            typer.echo(f"  {folder}/: {len(files):,}")
            for path in files:
                typer.echo(f"    {path}")
        typer.echo(f"{len(report.gone):,} committed artifacts whose file is gone or unreadable")
        for g in report.gone:
            typer.echo(f"  {g.name} of {g.run_id}: {g.path}: {g.problem}")
