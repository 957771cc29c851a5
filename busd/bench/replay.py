"""``busd bench``: ``busd rebuild`` and ``busd verify`` over the catch-up stream, next to a
no-work consumer on nats-py's stock ``fetch`` (the target: a replay at least as fast).

Each replay runs as a child process on a copy of the catalog the catch-up wrote, as an
operator's would: files unchanged since their check are not read again. ``--recheck`` runs
read every file, as a replay with no catalog to reuse does.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from typing import Any

from busd.bench.measure import Ctx, median, summary, wait_exit
from busd.errors import BusdError

# rebuild: "rebuilt …: N events to sequence S in X.XXs (R ev/s); outcomes {…}; files checked
# C, reused U"; verify: "replayed N events to sequence S in X.XXs (R ev/s; files checked C,
# reused U); compared with …"
_LINE = re.compile(
    r"([\d,]+) events to sequence [\d,]+ in ([\d.]+)s .*files checked ([\d,]+), reused ([\d,]+)"
)


def _int(text: str) -> int:
    return int(text.replace(",", ""))


async def _replay(ctx: Ctx, command: str, k: int, *flags: str) -> dict[str, Any]:
    """One ``busd <command>`` child on a copy of the catch-up's catalog."""
    assert ctx.stream is not None
    if ctx.catchup_catalog is None or not ctx.catchup_catalog.exists():
        raise BusdError("no catalog from the catch-up section to replay against")
    env = ctx.env
    name = f"{command}{'-recheck' if flags else ''}-{k}"
    config_path, s = env.config(name, ctx.stream, f"busd-{name}")
    s.data_path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ctx.catchup_catalog, s.catalog_path)
    began = time.perf_counter()
    proc = env.spawn(
        [sys.executable, "-m", "busd", command, "--config", str(config_path), *flags],
        f"{name}.log",
    )
    code = await wait_exit(env, proc, 60 + ctx.events / 200, f"busd {command}")
    wall = time.perf_counter() - began
    text = env.log_tail(f"{name}.log", 4000)
    found = _LINE.search(text)
    shutil.rmtree(s.data_path, ignore_errors=True)
    if code != 0 or found is None:
        raise BusdError(f"busd {command} {' '.join(flags)} exited {code}: {text[-500:]}")
    events = _int(found.group(1))
    if events != ctx.events:
        raise BusdError(f"busd {command} replayed {events} of {ctx.events} events")
    return {
        "seconds": float(found.group(2)),
        "rate": events / float(found.group(2)),
        "process_wall_s": wall,
        "files_checked": _int(found.group(3)),
        "files_reused": _int(found.group(4)),
    }


async def _measure(ctx: Ctx, command: str, *flags: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    title = " ".join(("busd", command, *flags))
    for k in range(ctx.runs):
        ctx.tick(f"{title}, run {k + 1}/{ctx.runs}", 0, 1)
        runs.append(await _replay(ctx, command, k, *flags))
        ctx.tick("", 1, None)
    return summary(
        [r["rate"] for r in runs],
        events=ctx.events,
        seconds=round(median([r["seconds"] for r in runs]), 3),
        process_wall_s=round(median([r["process_wall_s"] for r in runs]), 3),
        files_checked=runs[-1]["files_checked"],
        files_reused=runs[-1]["files_reused"],
    )


async def measure_rebuild(ctx: Ctx) -> dict[str, Any]:
    """``busd rebuild`` on a copy of the catch-up's catalog: unchanged files are reused."""
    return await _measure(ctx, "rebuild")


async def measure_rebuild_recheck(ctx: Ctx) -> dict[str, Any]:
    """``busd rebuild --recheck``: every file read again."""
    return await _measure(ctx, "rebuild", "--recheck")


async def measure_verify(ctx: Ctx) -> dict[str, Any]:
    """``busd verify`` against a copy of the catch-up's catalog (no serve running)."""
    return await _measure(ctx, "verify")
