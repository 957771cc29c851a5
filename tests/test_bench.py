"""``busd bench``: a quick run reports every section with positive numbers, and an interrupted
run leaves no process and no temporary folder behind. No timing assertions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import BUSD

from busd.bench.live import Hist


def _env(tmp: Path) -> dict[str, str]:
    """No BUSD_* from the caller; temporary folders under ``tmp`` so cleanup can be checked."""
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    return {**env, "TMPDIR": str(tmp), "COLUMNS": "160"}


def _positive(section: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = section.get(key)
        assert isinstance(value, int | float) and value > 0, (key, value, section)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.timeout(240)
def test_quick_bench_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    tmp = tmp_path / "tmp"
    run = subprocess.run(
        [*BUSD, "bench", "--quick", "--soak", "3000", "--json", str(out)],
        cwd=tmp_path,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=210,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["date"]
    _positive(report["machine"], "cores", "ram_gb")
    assert report["machine"]["cpu_model"]
    for name in ("busd", "nats-py", "duckdb", "pyarrow", "nats-server"):
        assert report["versions"][name] not in ("", "?"), name
    assert report["setup"]["published"] == report["bench"]["events"] == 5000

    s = report["sections"]
    assert set(s) == {
        "raw",
        "stock",
        "naive",
        "catchup",
        "live",
        "exports",
        "rebuild",
        "rebuild_recheck",
        "verify",
        "soak",
        "artifacts",
    }
    assert s["artifacts"]["status"] == "skipped"  # opt-in: --artifacts N
    for key in ("raw", "stock", "naive", "catchup"):
        assert s[key]["status"] == "ok", s[key]
        _positive(s[key], "events_per_s", "events")
    _positive(s["catchup"], "seconds", "peak_rss_mb", "cpu_us_per_event", "batches")
    assert s["live"]["status"] == "ok", s["live"]
    _positive(s["live"], "peak_rss_mb")
    for phase in ("fixed", "max"):
        p = s["live"][phase]
        _positive(
            p,
            "published",
            "publish_events_per_s",
            "latency_p50_s",
            "latency_p99_s",
            "latency_max_le_s",
            "lag_zero_after_stop_s",
        )
        assert p["latency_observed"] >= p["published"], p
    _positive(s["live"]["raw_max"], "published", "publish_events_per_s", "lag_zero_after_stop_s")
    assert s["exports"]["status"] == "ok", s["exports"]
    assert set(s["exports"]["sizes"]) == {"10000", "100000"}
    for size in s["exports"]["sizes"].values():
        _positive(size, "seconds", "artifacts", "runs")
    assert s["rebuild"]["status"] == "ok"
    assert s["soak"]["status"] == "ok", s["soak"]
    _positive(s["soak"], "events", "events_per_s", "peak_rss_mb", "peak_worker_rss_mb")
    assert len(s["soak"]["samples"]) == 10
    _positive(s["soak"], "peak_total_mb", "flat_base_mb", "flat_end_mb", "peak_total_pss_mb")
    assert s["soak"]["peak_total_pss_mb"] < s["soak"]["peak_total_mb"]  # shared pages once
    # every sample was kept beside the report as it was taken (a long soak cut short keeps them)
    lines = (tmp_path / "out.json.soak.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines]
    assert kept and kept[-1]["settled"] <= s["soak"]["events"], kept  # 0.1 s apart
    assert max(k["total"] for k in kept) == pytest.approx(s["soak"]["peak_total_mb"], abs=0.1)
    # every target of the issue, with the figure of this run next to it; a quick run is too
    # short to judge the soak's flatness (1M to 5M events) or 10M artifacts
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert all(t["figure"] for t in report["targets"]) and set(met.values()) <= {"yes", "no", "n/a"}
    assert len(met) == 10, met
    assert met["RSS of busd + workers flat within 10 % from 1M to 5M events"] == "n/a"
    assert any(k.startswith("catch-up CPU per event") and v != "n/a" for k, v in met.items())
    for size in s["exports"]["sizes"].values():
        _positive(size["partitioned"], "whole_seconds", "after_batch_seconds", "parts_rewritten")
    for key in ("rebuild", "rebuild_recheck", "verify"):
        assert s[key]["status"] == "ok", s[key]
        _positive(s[key], "events_per_s", "events", "seconds")
    # the replays reuse the checks the catch-up recorded, unless told to read every file
    assert s["rebuild"]["files_reused"] == s["verify"]["files_reused"] == 5000
    assert s["rebuild_recheck"]["files_checked"] == 5000
    _positive(report["ratios"], "busd_over_naive", "busd_over_raw", "rebuild_over_stock")

    assert "busd / naive" in run.stdout and "raw limit" in run.stdout
    assert "busd rebuild / stock fetch" in run.stdout
    assert "targets (issue 15)" in run.stdout
    assert not list(tmp.iterdir()), "the temporary folder was not removed"


@pytest.mark.timeout(120)
def test_interrupted_bench_cleans_up(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    proc = subprocess.Popen(
        [*BUSD, "bench", "--quick"],
        cwd=tmp_path,
        env=_env(tmp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(tmp.glob("busd-bench-*/catchup-0.toml")):  # busd is catching up
            assert proc.poll() is None and time.monotonic() < deadline, "never got going"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-2000:]
    assert "interrupted" in err
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_mentioning(str(tmp))
    assert not list(tmp.iterdir()), "the temporary folder was not removed"


def test_histogram_quantiles_interpolate_inside_buckets() -> None:
    inf = float("inf")
    before = Hist(((0.1, 0.0), (0.5, 0.0), (1.0, 0.0), (inf, 0.0)), 0.0, 0.0)
    after = Hist(((0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (inf, 100.0)), 100.0, 30.0)
    h = after.minus(before)
    assert h.quantile(0.5) == pytest.approx(0.1)
    assert h.quantile(0.7) == pytest.approx(0.3)
    assert h.quantile(0.99) == pytest.approx(0.95)
    assert h.max_bound() == 1.0
    assert Hist(((1.0, 0.0), (inf, 0.0)), 0.0, 0.0).quantile(0.5) is None


def test_a_short_soak_still_names_its_end() -> None:
    """A soak that settles in a few batches has no sample inside its last tenth: the nearest
    one stands for it (the CI failure of a 3,000-event soak), never a sample with workers
    stopping."""
    from busd.bench.soak import Sample, flatness

    def at(settled: int, total: float, workers: int = 2) -> Sample:
        return Sample(settled, 0.0, total, 50.0, None, total, workers)

    samples = [at(0, 180.0), at(1000, 190.0), at(2000, 200.0), at(3000, 90.0, workers=0)]
    flat = flatness(samples, 3000)
    assert flat["flat_base_mb"] == 190.0  # 600 ± 300 -> none; nearest is 1000
    assert flat["flat_end_mb"] == 200.0  # 2700-3000 held only the stopping sample


def test_a_soak_out_of_time_reports_what_it_reached() -> None:
    """A long soak that runs out of time is summarized over the events it reached, saying
    so; one that reached under a tenth of them is an error, not a figure."""
    from busd.bench.soak import Sample, cut_short
    from busd.errors import TimedOut

    samples = [Sample(k * 100_000, k, 250.0 + k, 57.0, None, 364.0 + k, 2) for k in range(1, 44)]
    cut = cut_short(samples, 5_000_000, 3600.0, "ran out of its 3600s at 4,300,000 events")
    assert cut["events"] == 4_300_000 and cut["stopped_early"].startswith("ran out")
    assert cut["samples"][-1]["events"] == 4_300_000
    assert cut["flat_from_events"] == 1_000_000 and cut["flat_end_mb"] >= 364.0 + 39
    with pytest.raises(TimedOut, match="ran out"):
        cut_short(samples[:3], 5_000_000, 60.0, "ran out of its 60s at 300,000 events")
