"""File-check workers that cannot start are the machine's fault, not the event's (issue 11).

Staged for real, with no hook in busd: busd starts its workers as ``sys.executable -c
WORKER_CODE``, so the test runs a real ``busd serve`` whose ``sys.executable`` is a small
script of the test's, which starts the real interpreter — or, while the test says so, fails
the way a machine does: it exits at once (a worker that crashes as it starts), or it is gone
(the exec fails, as after an upgrade removed the interpreter).

Before the fix, busd fetched, met the dead workers, exited 1 with the message in hand, and
each restart (systemd's) used up a delivery, until a valid event became ``poison``. Now it
fetches nothing until the workers answer, says why, and commits once they can start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import Bus, on_jetstream, wait_for

# busd itself, with ``sys.executable`` (what its workers are started with) set to argv[1]
LAUNCH = (
    "import runpy, sys; sys.executable = sys.argv.pop(1); sys.argv[0] = 'busd'; "
    "runpy.run_module('busd', run_name='__main__', alter_sys=True)"
)
WAITING = "file-check workers cannot start"


class Workers:
    """The interpreter busd starts its workers with, broken and repaired by the test."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "python"
        self.repair()

    def repair(self) -> None:
        self._write(f'exec {sys.executable} "$@"\n')

    def break_(self, how: str) -> None:
        if how == "exec_fails":
            self.path.unlink()
        else:
            self._write('echo "this worker cannot start" >&2\nexit 1\n')

    def _write(self, body: str) -> None:
        tmp = self.path.with_name("python.tmp")
        tmp.write_text("#!/bin/sh\n" + body)
        tmp.chmod(0o755)
        tmp.replace(self.path)


def _serve(bus: Bus, workers: Workers, cfg: Path, log: str, *extra: str) -> subprocess.Popen[str]:
    with open(bus.root / log, "a") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                str(workers.path),
                "serve",
                "--config",
                str(cfg),
                *extra,
            ],
            cwd=bus.root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    bus.procs.append(proc)  # reaped by the fixture if the test fails
    return proc


def _consumer(bus: Bus) -> tuple[int, int]:
    """(messages ever delivered, redelivered) by busd's durable consumer."""

    async def info(js: Any) -> tuple[int, int]:
        ci = await js.consumer_info("ARTIFACTS", "busd")
        return int(ci.delivered.consumer_seq or 0), int(ci.num_redelivered or 0)

    return on_jetstream(bus.url, info)


@pytest.mark.parametrize("how", ["crash_at_start", "exec_fails"])
def test_workers_that_cannot_start_use_up_no_delivery(bus: Bus, how: str) -> None:
    bus.overrides = {"consumer": {"max_deliver": 3}}  # the 2nd delivery would be poison
    bus.init()
    bus.publish([bus.event("good")])
    cfg = bus.write_config()
    workers = Workers(bus.root / "bin")
    workers.break_(how)
    proc = _serve(bus, workers, cfg, "serve.log", "--drain")
    wait_for(
        lambda: proc.poll() is not None or WAITING in bus.log(),
        60,
        "busd to exit or to say it waits for its workers",
    )
    # before: it had fetched the event and exited 1 (or died at start), and each restart
    # by systemd used up a delivery until the event became poison
    assert _consumer(bus) == (0, 0), "busd fetched while its workers could not start"
    assert proc.poll() is None, bus.log()[-3000:]
    # the workers can start again while busd waits: it goes on by itself
    workers.repair()
    assert proc.wait(60) == 0, bus.log()[-3000:]
    assert "file-check workers started" in bus.log()
    assert bus.sql("SELECT run_id, outcome FROM catalog.events_f") == [("good", "committed")]
    assert _consumer(bus) == (1, 0)


def test_workers_that_stop_starting_later_keep_the_event_in_hand(bus: Bus) -> None:
    """Workers that worked, then killed (the OOM killer) while their interpreter cannot be
    started again: the event that comes meanwhile is kept in hand and checked again, not
    rejected and not redelivered (before: busd exited 1, a delivery used up)."""
    bus.overrides = {"consumer": {"max_deliver": 3}}
    bus.init()
    cfg = bus.write_config()
    workers = Workers(bus.root / "bin")
    proc = _serve(bus, workers, cfg, "serve.log")
    bus.publish([bus.event("before")])
    wait_for(lambda: _consumer(bus) == (1, 0) and _acked(bus), 60, "the first event acked")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2, children  # the two workers
    workers.break_("crash_at_start")
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    bus.publish([bus.event("meanwhile")])
    wait_for(
        lambda: proc.poll() is not None or "file-check workers cannot run" in bus.log(),
        60,
        "busd to find its workers cannot run",
    )
    assert proc.poll() is None, bus.log()[-3000:]
    workers.repair()
    wait_for(lambda: _consumer(bus) == (2, 0) and _acked(bus), 60, "the event acked")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, bus.log()[-3000:]
    assert bus.sql("SELECT run_id, outcome FROM catalog.events_f ORDER BY seq") == [
        ("before", "committed"),
        ("meanwhile", "committed"),
    ]


def _acked(bus: Bus) -> bool:
    async def info(js: Any) -> bool:
        ci = await js.consumer_info("ARTIFACTS", "busd")
        return int(ci.num_ack_pending or 0) == 0 and int(ci.num_pending or 0) == 0

    return on_jetstream(bus.url, info)
