"""``busd bench``: the command; the measuring and the report are :mod:`busd.bench`."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Annotated

import typer

from busd.bench.report import DEFAULT_EVENTS, QUICK_EVENTS, Ticker, render, run_bench
from busd.cli.options import guarded
from busd.errors import ConfigError, ExitCode


def _sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the bench as Ctrl-C does (asyncio cancels the run; cleanup follows)."""
    signal.raise_signal(signal.SIGINT)


@guarded
def bench(
    events: Annotated[
        int | None, typer.Option("--events", help=f"Events to pre-load (default {DEFAULT_EVENTS}).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help=f"A short run ({QUICK_EVENTS} events, 3 s live phases).")
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    runs: Annotated[
        int | None,
        typer.Option(
            "--runs", help="Repeats of the cheap measurements (default 3, 1 with --quick)."
        ),
    ] = None,
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", help="Use this server instead of an embedded one.")
    ] = None,
    soak: Annotated[
        int,
        typer.Option(
            "--soak", help="Also consume this many events, sampling RSS (5000000: the target)."
        ),
    ] = 0,
    artifacts: Annotated[
        int,
        typer.Option(
            "--artifacts",
            help="Also soak to this many artifacts (100 an event) with partitioned exports, "
            "then time refreshes and point lookups (10000000: the target).",
        ),
    ] = 0,
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            help="Run only these sections, comma-separated (raw, stock, naive, catchup, live, "
            "exports, rebuild, rebuild_recheck, verify, soak, artifacts); the replays need "
            "catchup.",
        ),
    ] = None,
) -> None:
    """Measure busd here: raw limit, stock fetch, naive peer, catch-up, live latency, export
    refresh, rebuild and verify."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from busd.bench.env import BenchEnv
    from busd.bench.measure import Ctx
    from busd.bench.report import sections

    n = events if events is not None else (QUICK_EVENTS if quick else DEFAULT_EVENTS)
    k = runs if runs is not None else (1 if quick else 3)
    if not 100 <= n <= 5_000_000:
        raise ConfigError("--events: between 100 and 5000000")
    if not 1 <= k <= 20:
        raise ConfigError("--runs: between 1 and 20")
    if soak and not 1000 <= soak <= 10_000_000:
        raise ConfigError("--soak: 0, or between 1000 and 10000000")
    if artifacts and not 10_000 <= artifacts <= 20_000_000:
        raise ConfigError("--artifacts: 0, or between 10000 and 20000000")
    keys = [section.key for section in sections()]
    chosen = None if only is None else [k.strip() for k in only.split(",") if k.strip()]
    if chosen is not None and (not chosen or set(chosen) - set(keys)):
        raise ConfigError(f"--only: a comma-separated list of {', '.join(keys)}")
    if nats_url is not None and not nats_url.startswith(("nats://", "tls://")):
        raise ConfigError(f"--nats-url: {nats_url!r} is not a nats:// URL")
    env: BenchEnv = BenchEnv(nats_url or None)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    ticker = Ticker(progress)
    try:
        with progress:
            ctx = Ctx(
                env=env,
                events=n,
                runs=k,
                quick=quick,
                tick=ticker,
                soak=soak,
                samples_path=None if json_path is None else soak_samples(json_path),
                artifacts=artifacts,
                only=chosen,
            )
            report = asyncio.run(run_bench(ctx))
            ticker.finish()
    finally:
        env.close()
        signal.signal(signal.SIGTERM, previous)
    render(report)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    bad = [key for key, s in report.get("sections", {}).items() if s.get("status") == "failed"]
    if bad:
        typer.echo(f"busd: bench: failed: {', '.join(bad)}", err=True)
        raise typer.Exit(int(ExitCode.RUNTIME))


def soak_samples(json_path: Path) -> Path:
    """Where the soak appends its samples as it takes them: beside the report."""
    return json_path.with_name(json_path.name + ".soak.jsonl")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
