"""The performance targets (issue 15), each next to the figure this run measured.

A target the run did not measure (its section skipped, failed, or too short for it) says so
rather than pass. The figures are the sections' own; this module only reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

NAIVE_RATIO = 25.0  # catch-up, full checks, at least this many times the naive peer
CPU_US = 60.0  # CPU per event in catch-up, busd and its file-check workers together
LAG_S = 1.0  # live: lag back to 0 within this of the publisher stopping


@dataclass(frozen=True)
class Target:
    target: str
    figure: str
    met: str  # "yes", "no", or "n/a" (not measured in this run)


def _ok(res: dict[str, Any], key: str) -> dict[str, Any] | None:
    section = res.get(key)
    return section if isinstance(section, dict) and section.get("status") == "ok" else None


def _why_not(res: dict[str, Any], key: str) -> str:
    section = res.get(key) or {}
    return str(section.get("why") or section.get("error") or "not run")


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def targets(report: dict[str, Any]) -> list[Target]:
    res: dict[str, Any] = report.get("sections", {})
    ratio: dict[str, Any] = report.get("ratios", {})
    out: list[Target] = []

    def missing(title: str, key: str) -> None:
        out.append(Target(title, _why_not(res, key), "n/a"))

    title = f"catch-up ≥ {NAIVE_RATIO:.0f}× the naive peer, every file checked"
    over = ratio.get("busd_over_naive")
    if over:
        out.append(Target(title, f"{over:.1f}×", _met(over >= NAIVE_RATIO)))
    else:
        missing(title, "catchup" if not _ok(res, "catchup") else "naive")

    title = f"catch-up CPU per event, busd + file-check workers ≤ {CPU_US:.0f} µs"
    catchup = _ok(res, "catchup")
    if catchup:
        busd, workers = catchup["cpu_us_per_event"], catchup["workers_cpu_us_per_event"]
        out.append(
            Target(
                title,
                f"{busd + workers:.0f} µs ({busd:.0f} busd + {workers:.0f} workers)",
                _met(busd + workers <= CPU_US),
            )
        )
    else:
        missing(title, "catchup")

    for key, name in (("rebuild", "busd rebuild"), ("verify", "busd verify")):
        title = f"{name} ≥ a no-work consumer on nats-py's stock fetch"
        over = ratio.get(f"{key}_over_stock")
        if over:
            out.append(Target(title, f"{over:.2f}×", _met(over >= 1.0)))
        else:
            missing(title, key if not _ok(res, key) else "stock")

    out.extend(_soak(res))

    title = f"live: lag back to 0 within {LAG_S:.0f} s of the publisher stopping"
    live = _ok(res, "live")
    lag = (live or {}).get("max", {}).get("lag_zero_after_stop_s")
    if isinstance(lag, int | float):
        out.append(Target(title, f"{lag:.2f} s", _met(lag <= LAG_S)))
    else:
        missing(title, "live")

    out.extend(_artifacts(res))
    return out


def _soak(res: dict[str, Any]) -> list[Target]:
    soak = _ok(res, "soak")
    flat_title = "RSS of busd + workers flat within 10 % from 1M to 5M events"
    total_title = "RSS of busd + workers under 400 MiB in the soak"
    if soak is None:
        why = _why_not(res, "soak")
        return [Target(flat_title, why, "n/a"), Target(total_title, why, "n/a")]
    pct, start, n = soak["flat_growth_pct"], soak["flat_from_events"], soak["events"]
    reach = f"{start:,} → {n:,} events"
    if pct is None:
        flat = Target(flat_title, f"too few samples ({reach})", "n/a")
    else:
        figure = (
            f"{pct:+.1f} % ({soak['flat_base_mb']:.0f} → {soak['flat_end_mb']:.0f} MiB, {reach})"
        )
        # met or not only over the range the target names; a shorter soak only shows a trend
        full = start >= 1_000_000 and n >= 5_000_000
        flat = Target(flat_title, figure, _met(pct <= soak["flat_target_pct"]) if full else "n/a")
    peak = soak["peak_total_mb"]
    total = Target(
        total_title,
        f"peak {peak:.0f} MiB over {n:,} events",
        _met(peak < soak["total_target_mb"]),
    )
    return [flat, total]


def _artifacts(res: dict[str, Any]) -> list[Target]:
    titles = (
        "10M artifacts: refresh after a 5,000-event batch ≤ 100 ms",
        "10M artifacts: busd query point lookup ≤ 100 ms",
        "10M artifacts: the first refresh after a restart rewrites only what changed",
    )
    r = _ok(res, "artifacts")
    if r is None:
        why = _why_not(res, "artifacts")
        return [Target(t, why, "n/a") for t in titles]
    at = f"at {r['artifacts']:,} artifacts"
    full = r["artifacts"] >= 10_000_000
    limit = r["target_ms"]
    refresh, lookup = r["after_batch_ms"], r["lookups"]["artifact"]["ms"]

    def met(ms: float) -> str:
        return _met(ms <= limit) if full else "n/a"

    restart = r["restart"]
    written, there = sum(restart["parts_rewritten"].values()), sum(restart["parts"].values())
    return [
        Target(titles[0], f"{refresh:.0f} ms {at}", met(refresh)),
        Target(titles[1], f"{lookup:.0f} ms {at}", met(lookup)),
        Target(
            titles[2],
            f"{written} of {there} parts, {restart['ms']:.0f} ms {at}",
            _met(written < there) if full else "n/a",
        ),
    ]


def as_dicts(found: list[Target]) -> list[dict[str, str]]:
    return [asdict(t) for t in found]
