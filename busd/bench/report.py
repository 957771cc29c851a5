"""``busd bench``'s run and report: how fast busd is here, next to what the transport
allows and a naive peer.

One run starts its own ``nats-server`` (free loopback port, temporary store, ``sync_interval:
always``) or uses ``--nats-url``, writes one small real Parquet file per event, publishes the
events (pipelined JetStream publishes) and measures, over that same stream content: the raw
pull limit, a no-work consumer on nats-py's stock ``fetch``, a naive per-message peer, busd
catching up (``serve --drain`` in a child), busd live behind a publisher, export refresh time
on large catalogs, and rebuild and verify on the catalog the catch-up wrote. Figures
are medians of ``--runs`` runs where a run is cheap. Everything is bounded in time and cleaned
up on exit, Ctrl-C included. The heavy imports wait until the command runs, so registering it
costs other commands nothing.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from busd.bench.measure import Ctx

DEFAULT_EVENTS = 50_000
QUICK_EVENTS = 5_000


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    measure: Callable[[Ctx], Awaitable[dict[str, Any]]]


def sections() -> tuple[Section, ...]:
    """The report's sections, in the order they run. Adding one is one line here."""
    from busd.bench import artifacts as artifacts
    from busd.bench import live as live
    from busd.bench import measure as m
    from busd.bench import replay as replay
    from busd.bench import soak as soak

    return (
        Section("raw", "raw limit", m.measure_raw),
        Section("stock", "stock fetch", m.measure_stock),
        Section("naive", "naive peer", m.measure_naive),
        Section("catchup", "busd catch-up", m.measure_catchup),
        Section("live", "busd live", live.measure_live),
        Section("exports", "export refresh", live.measure_exports),
        Section("rebuild", "busd rebuild", replay.measure_rebuild),
        Section("rebuild_recheck", "busd rebuild --recheck", replay.measure_rebuild_recheck),
        Section("verify", "busd verify", replay.measure_verify),
        Section("soak", "RSS soak", soak.measure_soak),
        Section("artifacts", "10M artifacts", artifacts.measure_artifacts),
    )


class Ticker:
    """Progress lines: a new task per phase; ``tick("", n, None)`` advances the current one."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def __call__(self, description: str, advance: float, total: float | None) -> None:
        if description:
            self.finish()
            self.task = self.progress.add_task(description, total=total)
        elif self.task is not None and advance:
            self.progress.advance(self.task, advance)

    def finish(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[-1]
            self.progress.update(
                self.task,
                total=task.total or task.completed or 1,
                completed=task.total or task.completed or 1,
            )
            self.task = None


async def prepare(ctx: Ctx) -> dict[str, Any]:
    """Start the server, write the Parquet pool, publish ``ctx.events`` events once."""
    from busd.bench import env as be

    env = ctx.env
    ctx.tick("starting nats-server" if not env.nats_url else "connecting", 0, None)
    await env.start()
    ctx.tick(f"writing {ctx.events:,} Parquet files", 0, ctx.events)
    started = time.perf_counter()
    stop = threading.Event()
    try:
        ctx.pool = await asyncio.to_thread(
            be.make_pool, env.artifacts, ctx.events, lambda n: ctx.tick("", n, None), stop
        )
    except asyncio.CancelledError:
        stop.set()  # Ctrl-C: the writer threads end at their next file
        raise
    files_s = time.perf_counter() - started
    ctx.stream = env.stream("catchup")
    await env.ensure_stream(ctx.stream)
    ctx.tick(f"publishing {ctx.events:,} events", 0, ctx.events)
    events = (be.event(f"run-{env.tag}-{i:08d}", f) for i, f in enumerate(ctx.pool))
    pub = await be.publish(
        env.nc,
        ctx.stream.subject,
        events,
        window=2000,
        timeout_s=60 + ctx.events / 200,
        tick=lambda n: ctx.tick("", n, None),
    )
    return {
        "files": ctx.events,
        "files_seconds": round(files_s, 3),
        "published": pub.count,
        "publish_seconds": round(pub.seconds, 3),
        "publish_events_per_s": round(pub.rate, 1),
        "publish_window": 2000,
    }


async def run_bench(ctx: Ctx) -> dict[str, Any]:
    from busd.bench import env as be
    from busd.bench import targets

    env = ctx.env
    report: dict[str, Any] = {"date": be.today(), "machine": be.machine()}
    report["load_average"] = {"start": list(os.getloadavg())}
    try:
        report["setup"] = await prepare(ctx)
        report["versions"] = be.versions(env.server_version)
        report["bench"] = {
            "events": ctx.events,
            "runs": ctx.runs,
            "quick": ctx.quick,
            "nats": (
                "embedded nats-server, loopback, JetStream sync_interval: always"
                if env.embedded
                else "user's server (--nats-url); its fsync policy is unknown to the bench"
            ),
        }
        results: dict[str, Any] = {}
        for section in sections():
            if ctx.only is not None and section.key not in ctx.only:
                continue
            try:
                results[section.key] = await section.measure(ctx)
            except Exception as exc:  # noqa: BLE001 - one failed section does not hide the others
                results[section.key] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        report["sections"] = results
        report["ratios"] = ratios(results)
        report["load_average"]["end"] = list(os.getloadavg())
        report["targets"] = targets.as_dicts(targets.targets(report))
        ctx.tick("done", 0, None)
    finally:
        await env.aclose()
    return report


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    def rate(key: str) -> float | None:
        section = results.get(key, {})
        return section.get("events_per_s") if section.get("status") == "ok" else None

    busd, naive, raw, stock = rate("catchup"), rate("naive"), rate("raw"), rate("stock")
    out = {
        "busd_over_naive": round(busd / naive, 2) if busd and naive else None,
        "busd_over_raw": round(busd / raw, 3) if busd and raw else None,
    }
    for key in REPLAYS:  # target: at least 1.0
        replay = rate(key)
        out[f"{key}_over_stock"] = round(replay / stock, 2) if replay and stock else None
    return out


REPLAYS = {
    "rebuild": "busd rebuild",
    "rebuild_recheck": "busd rebuild --recheck",
    "verify": "busd verify",
}


# ---- the printed table --------------------------------------------------------------------
def _n(value: float) -> str:
    return f"{value:,.0f}"


def _s(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.0f} MiB"


def _runs(values: list[float], unit: str = "") -> str:
    return "runs: " + " / ".join(f"{v:,.0f}{unit}" if v >= 10 else f"{v:.3f}{unit}" for v in values)


def rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    res = report.get("sections", {})

    def failed(key: str, title: str) -> bool:
        section = res.get(key, {})
        if section.get("status") == "ok":
            return False
        why = section.get("error") or section.get("why") or "not run"
        status = section.get("status", "not run").replace("_", " ")
        out.append((title, status, why))
        return True

    if not failed("raw", "raw limit: lean pull + ack, no work"):
        r = res["raw"]
        out.append(
            (
                "raw limit: lean pull + ack, no work",
                f"{_n(r['events_per_s'])} ev/s",
                f"{_n(r['events'])} events, batch 500; {_runs(r['runs_events_per_s'])}",
            )
        )
    if not failed("naive", "naive peer: 1 transaction per message"):
        r = res["naive"]
        out.append(
            (
                "naive peer: loads, stat, INSERT, COMMIT, ack",
                f"{_n(r['events_per_s'])} ev/s",
                f"sample of {_n(r['events'])}; {_runs(r['runs_events_per_s'])}",
            )
        )
    if not failed("catchup", "busd catch-up"):
        r = res["catchup"]
        out.append(
            (
                "busd catch-up: serve --drain, full checks",
                f"{_n(r['events_per_s'])} ev/s",
                f"{_n(r['events'])} events in {r['seconds']:.2f} s, CPU "
                f"{r['cpu_us_per_event']:.0f} µs/event + {r['workers_cpu_us_per_event']:.0f} "
                f"in file-check workers, peak RSS {r['peak_rss_mb']:.0f} MiB + "
                f"{r['workers_peak_rss_mb']:.0f} per worker, {r['batches']} transactions, "
                f"{r['export_refreshes']} refreshes; "
                f"{_runs(r['runs_events_per_s'])}",
            )
        )
    if not failed("live", "busd live"):
        for key, title in (("fixed", "busd live @ 1,000 ev/s"), ("max", "busd live @ max rate")):
            p = res["live"][key]
            out.append(
                (
                    title + ": latency p50 / p99 / max",
                    f"{_s(p['latency_p50_s'])} / {_s(p['latency_p99_s'])} / "
                    f"≤ {_s(p['latency_max_le_s'])}",
                    f"{_n(p['published'])} published at {_n(p['publish_events_per_s'])} "
                    f"ev/s in {p['publish_seconds']:.1f} s; lag 0 "
                    f"{_s(p['lag_zero_after_stop_s'])} after the last PubAck; "
                    f"peak lag {_n(p['peak_lag'])}",
                )
            )
        raw = res["live"].get("raw_max")
        if raw:
            out.append(
                (
                    "raw consumer @ max rate (no work)",
                    f"{_n(raw['settled_while_publishing_per_s'])} ev/s while publishing",
                    f"{_n(raw['published'])} published at "
                    f"{_n(raw['publish_events_per_s'])} ev/s; lag 0 "
                    f"{_s(raw['lag_zero_after_stop_s'])} after the last PubAck",
                )
            )
        fast = res["live"]["max"]
        if "settled_while_publishing_per_s" in fast:
            out.append(
                (
                    "busd live @ max rate: settled while publishing",
                    f"{_n(fast['settled_while_publishing_per_s'])} ev/s",
                    "",
                )
            )
        workers = res["live"].get("workers_peak_rss_mb")
        out.append(
            (
                "busd live: peak RSS",
                f"{res['live']['peak_rss_mb']:.0f} MiB",
                (f"+ {workers:.0f} MiB per file-check worker; " if workers else "")
                + "latency from busd_event_latency_seconds buckets (interpolated; max = "
                "bucket bound)",
            )
        )
    if not failed("exports", "export refresh (runs + artifacts)"):
        for size in res["exports"]["sizes"].values():
            ex = size["exports"]
            out.append(
                (
                    f"export refresh, {_n(size['artifacts'])} artifacts",
                    _s(size["seconds"]),
                    f"{_n(size['runs'])} runs; runs.parquet {_s(ex['runs']['seconds'])}, "
                    f"artifacts.parquet {_s(ex['artifacts']['seconds'])}; "
                    f"{_runs(size['runs_seconds'], ' s')}",
                )
            )
            part = size.get("partitioned")
            if part:
                out.append(
                    (
                        f"  partitioned ({_n(part['partition_seqs'])} seqs a part), "
                        f"after {_n(part['batch_artifacts'])} new artifacts",
                        _s(part["after_batch_seconds"]),
                        f"{part['parts_rewritten']} part files rewritten; a whole refresh "
                        f"{_s(part['whole_seconds'])}",
                    )
                )
    _replay_rows(res, failed, out)
    if not failed("soak", "RSS soak: serve --drain"):
        r = res["soak"]
        marks = ", ".join(f"{x['rss_mb']:.0f}" for x in r["samples"])
        totals = ", ".join(f"{x['total_mb']:.0f}" for x in r["samples"])
        out.append(
            (
                f"RSS soak: serve --drain, {_n(r['events'])} events",
                f"{r['rss_growth_mb']:+.0f} MiB",
                f"RSS growth from the first tenth to the end, of which DuckDB's own "
                f"accounting {_mib(r['duckdb_growth_mb'])} (the rest "
                f"{_mib(r['rss_less_duckdb_growth_mb'])}); RSS per tenth {marks} MiB; "
                f"peak {r['peak_rss_mb']:.0f} MiB + {r['peak_worker_rss_mb']:.0f} MiB per "
                f"worker (growth {r['worker_rss_growth_mb']:+.0f}); with all the workers per "
                f"tenth {totals} MiB, peak {r['peak_total_mb']:.0f} (their PSS, shared "
                f"pages counted once: peak {_mb(r.get('peak_total_pss_mb'))}); "
                f"{_n(r['events_per_s'])} ev/s",
            )
        )
    if not failed("artifacts", "artifacts soak: partitioned exports"):
        from busd.bench import artifacts

        out += artifacts.rows(res["artifacts"])
    out += _ratio_rows(report.get("ratios", {}))
    return out


def _ratio_rows(ratio: dict[str, Any]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for key, title in REPLAYS.items():
        over = ratio.get(f"{key}_over_stock")
        out.append(
            (
                f"{title} / stock fetch",
                f"{over:.2f}×" if over else "n/a",
                "target ≥ 1.0 (a replay at least as fast as a no-work stock-fetch consumer)",
            )
        )
    naive, raw = ratio.get("busd_over_naive"), ratio.get("busd_over_raw")
    out.append(("busd / naive (catch-up)", f"{naive:.1f}×" if naive else "n/a", ""))
    out.append(
        (
            "busd / raw (catch-up)",
            f"{raw:.3f} ({raw:.1%})" if raw else "n/a",
            "share of the transport's ceiling busd reaches",
        )
    )
    return out


def _replay_rows(
    res: dict[str, Any], failed: Callable[[str, str], bool], out: list[tuple[str, str, str]]
) -> None:
    """The stock-fetch consumer, then each replay (held against it)."""
    if not failed("stock", "stock fetch: nats-py fetch + ack, no work"):
        r = res["stock"]
        out.append(
            (
                "stock fetch: nats-py fetch + ack, no work",
                f"{_n(r['events_per_s'])} ev/s",
                f"{_n(r['events'])} events, batch {r['batch']}; {_runs(r['runs_events_per_s'])}",
            )
        )
    for key, title in REPLAYS.items():
        if failed(key, title):
            continue
        r = res[key]
        out.append(
            (
                f"{title}: replay",
                f"{_n(r['events_per_s'])} ev/s",
                f"{_n(r['events'])} events in {_s(r['seconds'])} (the process "
                f"{_s(r['process_wall_s'])}); files checked {_n(r['files_checked'])}, "
                f"reused {_n(r['files_reused'])}; {_runs(r['runs_events_per_s'])}",
            )
        )


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    v, m, b = report.get("versions", {}), report["machine"], report.get("bench", {})
    load = report.get("load_average")
    setup = report.get("setup", {})
    table = Table(
        title=f"busd bench, {report['date']}",
        title_justify="left",
        caption=" · ".join(f"{k} {val}" for k, val in v.items()),
        caption_justify="left",
    )
    table.add_column("measure", style="bold")
    table.add_column("result", justify="right")
    table.add_column("details", overflow="fold")
    for row in rows(report):
        table.add_row(*row)
    console = Console(width=max(140, Console().width))
    console.print(
        f"machine: {m['cores']} cores, {m['ram_gb']} GB RAM, {m['cpu_model']}, "
        f"Linux {m['kernel']}, Python {m['python']}"
    )
    if b:
        console.print(f"nats: {b['nats']}")
    if load:  # other work on the machine moves wall times (CPU times less)
        console.print(
            "load average (1, 5, 15 min): "
            + " at the start, ".join(
                "/".join(f"{x:.1f}" for x in load[k]) for k in ("start", "end")
            )
            + " at the end"
        )
    if setup:
        console.print(
            f"setup: {setup['files']:,} Parquet files in {setup['files_seconds']:.1f} s;"
            f" {setup['published']:,} events published (pipelined, window "
            f"{setup['publish_window']}) at {setup['publish_events_per_s']:,.0f} ev/s"
        )
    console.print(table)
    wanted = Table(title="targets (issue 15)", title_justify="left")
    wanted.add_column("target", style="bold")
    wanted.add_column("figure", justify="right")
    wanted.add_column("met")
    for t in report.get("targets", []):
        wanted.add_row(t["target"], t["figure"], t["met"])
    console.print(wanted)
