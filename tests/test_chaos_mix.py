"""A randomized run that mixes the faults of the other fault tests (issue 11, "How"): kill -9
of the active busd, SIGSTOP past ``ack_wait``, a nats-server restart, an artifact file failing
with EIO (a FUSE artifact root), a file that appears after its event, a committed file deleted
afterwards, all while events flow at a steady pace. After each trial, once everything settled,
the invariants are checked:

- every published event has exactly one outcome in ``events_f`` (committed: they are all
  valid), every sequence of the stream exactly one row;
- every acked event is in every export that should hold it (sampled after each fault against
  the consumer's ack floor, and at the end, when all are acked: ``runs``, ``artifacts`` and a
  configured export over ``data.fills``);
- with a hot standby (the long form): each instance's catalog equals a rebuild (``busd
  verify``), the standby's included.

Each trial has its own seed, printed (``CHAOS_MIX_SEED`` replays a run, ``CHAOS_MIX_TRIALS``
changes the count). Every loop is bounded in count and time; processes and mounts are always
cleaned up; everything listens on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultfs import FaultFS, mounted, usable
from support import Bus, on_jetstream, to_toml, wait_for
from test_chaos import Publisher
from test_cli import free_port

from busd.embedded import EmbeddedServer

FAULTS = ("kill9", "sigstop", "nats", "eio", "late", "deleted")
ACK_WAIT_S = 1
CONSUMER = {
    "max_deliver": 50,
    "ack_wait_s": ACK_WAIT_S,
    "batch_max": 100,
    "stall_s": 120,
    "shutdown_grace_s": 10,
}
FILL_RUNS = {
    "name": "fill_runs",
    "depends_on": ["fills"],
    "sql": "SELECT DISTINCT run_id FROM data.fills",
}
RATE = 100  # events per second


@dataclass
class Instance:
    """One `busd serve` slot (a data dir); restarted into a new process, log and config."""

    bus: Bus
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    spawns: int = 0
    cfg: Path | None = None

    @property
    def logname(self) -> str:
        return f"serve-{self.spawns}.log"

    def start(self) -> None:
        self.spawns += 1
        self.port = free_port()
        self.cfg = self.bus.root / f"busd-{self.spawns}.toml"
        self.cfg.write_text(
            to_toml(self.bus.config_dict(metrics={"listen": f"127.0.0.1:{self.port}"}))
        )
        self.proc = self.bus.spawn("serve", "--config", str(self.cfg), log=self.logname)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.bus.log(self.logname)

    def active(self) -> bool:  # "busd ready" is logged once the instance owns the consumer
        return self.alive() and "busd ready" in self.log()

    def standby(self) -> bool:
        return self.alive() and "standby: following" in self.log() and not self.active()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                return None
        return self.proc.returncode


@dataclass
class Trial:
    index: int
    seed: int
    root: Path
    standby: bool
    rng: random.Random = field(init=False)
    faults: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    specials: list[str] = field(default_factory=list)  # run ids the test published itself
    deleted: list[str] = field(default_factory=list)  # their files were deleted for a while
    self_exits: list[str] = field(default_factory=list)
    samples: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


def _publish_one(bus: Bus, run_id: str, path: str) -> None:
    """One event, with PubAck, retried through an outage (the msg id dedups); bounded."""
    body = bus.event(run_id, [{"name": "fills", "path": path}], event_id=f"{run_id}:final")

    async def go() -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                nc = await nats.connect(
                    servers=bus.servers,
                    connect_timeout=2,
                    max_reconnect_attempts=0,
                    allow_reconnect=False,
                )
                try:
                    await nc.jetstream().publish(
                        "artifacts.chaos",
                        json.dumps(body).encode(),
                        timeout=2,
                        headers={"Nats-Msg-Id": f"{run_id}:final"},
                    )
                    return
                finally:
                    await nc.close()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    asyncio.run(go())


def _write_parquet(path: Path) -> None:
    """Written beside and renamed into place, as a careful producer does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table({"x": [1, 2, 3], "y": ["a", "b", "c"]}), tmp)
    os.replace(tmp, path)


def _consumer_state(bus: Bus) -> tuple[int, int, int, int]:
    """(stream last seq, ack floor, pending, ack pending) of busd's durable consumer."""

    async def go(js: Any) -> tuple[int, int, int, int]:
        stream = await js.stream_info("ARTIFACTS")
        info = await js.consumer_info("ARTIFACTS", "busd")
        return (
            int(stream.state.last_seq),
            int(info.ack_floor.stream_seq or 0),
            int(info.num_pending or 0),
            int(info.num_ack_pending or 0),
        )

    return on_jetstream(bus.servers, go)


def _export_column(bus: Bus, name: str, column: str) -> list[Any]:
    path = bus.data / "exports" / f"{name}.parquet"
    if not path.exists():
        return []
    values: list[Any] = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return values


def _scrape_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class World:
    """A trial's nats-server, FUSE artifact root and one or two busd instances."""

    def __init__(
        self, trial: Trial, server: EmbeddedServer, fs: FaultFS, a: Bus, b: Bus | None
    ) -> None:
        self.t, self.server, self.fs, self.a = trial, server, fs, a
        self.instances = [Instance(a)] + ([Instance(b)] if b is not None else [])
        self.n = 0

    # ---- roles ------------------------------------------------------------------------
    def active(self) -> Instance | None:
        found = [i for i in self.instances if i.active()]
        return found[0] if len(found) == 1 else None

    def settled_roles(self) -> bool:
        if len(self.instances) == 1:
            inst = self.instances[0]
            return inst.active() and _scrape_ok(inst.port)
        roles = sorted("a" if i.active() else "s" if i.standby() else "?" for i in self.instances)
        act = self.active()
        return roles == ["a", "s"] and act is not None and _scrape_ok(act.port)

    def reconcile(self, what: str) -> None:
        """Restart whatever exited (as systemd would) and wait for one active (and one
        standby); bounded."""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for inst in self.instances:
                if inst.proc is not None and inst.proc.poll() is not None:
                    self.t.self_exits.append(f"{what}:rc={inst.proc.returncode}")
                    inst.proc = None
                if inst.proc is None:
                    inst.start()
            if self.settled_roles():
                return
            time.sleep(0.1)
        raise AssertionError(
            f"trial {self.t.index} seed {self.t.seed}: no settled active/standby after {what}"
        )

    # ---- faults -----------------------------------------------------------------------
    def kill9(self) -> None:
        act = self.active()
        assert act is not None and act.proc is not None
        act.proc.kill()
        act.proc.wait(30)
        act.proc = None  # a kill of ours, not an exit of its own
        if len(self.instances) > 1:
            other = next(i for i in self.instances if i is not act)
            wait_for(lambda: "took over the lease" in other.log(), 30, "the standby to take over")
        act.start()
        self.reconcile("kill9")

    def sigstop(self) -> None:
        act = self.active()
        assert act is not None and act.proc is not None
        act.proc.send_signal(signal.SIGSTOP)
        time.sleep(self.t.rng.uniform(ACK_WAIT_S + 0.5, ACK_WAIT_S + 2.0))
        act.proc.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # with a standby, a lost lease makes it exit now
        self.reconcile("sigstop")

    def nats(self) -> None:
        if self.t.rng.random() < 0.5:
            self.server.stop()
        else:
            self.server.kill()
        time.sleep(self.t.rng.uniform(0.5, 2.0))
        self.server.start()
        self.reconcile("nats")

    def eio(self) -> None:
        self.n += 1
        rel = f"eio-{self.n}/fills.parquet"
        run_id = f"eio-{self.t.index}-{self.n}"
        _write_parquet(self.fs.backing / rel)
        self.fs.set(rel, read=errno.EIO)
        _publish_one(self.a, run_id, str(self.fs.path(rel)))
        self.t.specials.append(run_id)
        time.sleep(self.t.rng.uniform(2.0, 5.0))
        self.fs.clear(rel)

    def late(self) -> None:
        self.n += 1
        path = self.a.artifacts / f"late-{self.n}" / "fills.parquet"
        run_id = f"late-{self.t.index}-{self.n}"
        _publish_one(self.a, run_id, str(path))  # the file is not there yet
        self.t.specials.append(run_id)
        time.sleep(self.t.rng.uniform(1.0, 4.0))
        _write_parquet(path)

    def deleted(self) -> None:
        self.n += 1
        path = self.a.artifacts / f"gone-{self.n}" / "fills.parquet"
        run_id = f"gone-{self.t.index}-{self.n}"
        _write_parquet(path)
        _publish_one(self.a, run_id, str(path))
        self.t.specials.append(run_id)
        self.t.deleted.append(run_id)
        wait_for(
            lambda: any(
                run_id in _export_column(i.bus, "artifacts", "run_id")
                for i in self.instances
                if i.active()
            ),
            60,
            "it to commit",
        )
        kept = path.read_bytes()
        path.unlink()
        time.sleep(self.t.rng.uniform(2.0, 6.0))  # events flow and exports refresh meanwhile
        path.write_bytes(kept)

    # ---- invariants ---------------------------------------------------------------------
    def sample_acked_in_exports(self, when: str) -> None:
        """Every sequence at or below the ack floor is in an export of the instance that
        acked it (the union over the instances: the acker may have changed)."""
        try:
            _last, floor, _p, _ap = _consumer_state(self.a)
        except Exception:  # noqa: BLE001 - NATS just restarted: no sample this time
            return
        exported: set[int] = set()
        for inst in self.instances:
            exported.update(int(s) for s in _export_column(inst.bus, "artifacts", "seq"))
        missing = [s for s in range(1, floor + 1) if s not in exported]
        self.t.samples += 1
        if missing:
            self.t.findings.append(
                f"after {when}: acked (floor {floor}) but in no artifacts "
                f"export: {len(missing)} seqs, e.g. {missing[:5]}"
            )


def _settle(world: World, expected: int) -> tuple[int, int]:
    """Wait until every message is acked and the active's export holds every event."""
    t = world.t
    state: tuple[int, int, int, int] = (0, 0, 0, 0)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        try:
            state = _consumer_state(world.a)
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
            continue
        last, floor, pending, ack_pending = state
        if floor == last and pending == 0 and ack_pending == 0:
            break
        time.sleep(0.2)
    else:
        t.findings.append(f"not all acked after 150 s: last/floor/pending/ack_pending {state}")

    def rows(inst: Instance | None) -> int:
        return len(_export_column(inst.bus, "artifacts", "run_id")) if inst else 0

    # all acked: the active's export must hold every event (a refresh may still be landing)
    if not wait_for_bool(lambda: rows(world.active()) >= expected, 30):
        t.findings.append(
            f"all acked, but the active's artifacts export holds "
            f"{rows(world.active())} of {expected} events"
        )
    if len(world.instances) > 1:  # the standby follows up to the ack floor
        standby = next((i for i in world.instances if i.standby()), None)
        if not wait_for_bool(lambda: rows(standby) >= expected, 30):
            t.findings.append(
                f"the standby's artifacts export holds {rows(standby)} of "
                f"{expected} events 30 s after all were acked"
            )
    return state[0], state[1]


def wait_for_bool(predicate: Any, timeout: float) -> bool:
    try:
        wait_for(predicate, timeout)
    except AssertionError:
        return False
    return True


def _check(world: World, ids: list[str], last: int) -> None:
    """With every busd stopped: outcomes in the active's catalog, the exports, verify."""
    t = world.t
    holder = max(
        world.instances,  # the instance that was active last holds everything
        key=lambda i: len(_export_column(i.bus, "artifacts", "run_id")),
    )
    bus = holder.bus
    rows = bus.sql("SELECT seq, run_id, outcome, reason FROM catalog.events_f")
    per_seq: dict[int, int] = {}
    per_run: dict[str, list[tuple[str, Any]]] = {}
    for seq, run_id, outcome, reason in rows:
        per_seq[int(seq)] = per_seq.get(int(seq), 0) + 1
        per_run.setdefault(run_id, []).append((outcome, reason))
    doubled_seqs = [s for s, n in per_seq.items() if n != 1]
    absent_seqs = [s for s in range(1, last + 1) if s not in per_seq]
    if doubled_seqs:
        t.findings.append(f"seqs with several rows in events_f: {doubled_seqs[:5]}")
    if absent_seqs:
        t.findings.append(f"seqs with no outcome: {len(absent_seqs)}, e.g. {absent_seqs[:5]}")
    lost = [r for r in ids if not any(o == "committed" for o, _ in per_run.get(r, []))]
    doubled = [r for r in ids if sum(o == "committed" for o, _ in per_run.get(r, [])) > 1]
    other = sorted({(r, o, why) for r in ids for o, why in per_run.get(r, []) if o != "committed"})
    if lost:
        t.findings.append(f"not committed: {len(lost)}, e.g. {lost[:5]}")
    if doubled:
        t.findings.append(f"committed twice: {len(doubled)}, e.g. {doubled[:5]}")
    if other:
        t.findings.append(f"valid events with another outcome: {len(other)}, e.g. {other[:3]}")
    wanted = set(ids)
    for name, allowed_absent in (
        ("runs", set()),
        ("artifacts", set()),
        # a file deleted for a while may still be left out of
        # data.fills until the next sweep finds it back
        ("fill_runs", set(t.deleted)),
    ):
        have = set(_export_column(bus, name, "run_id"))
        absent = sorted(wanted - have - allowed_absent)
        if absent:
            t.findings.append(f"export {name} lacks {len(absent)} acked events, e.g. {absent[:5]}")
    for n, inst in enumerate(world.instances):
        if inst.cfg is None:
            continue
        out = inst.bus.cli("verify", "--config", str(inst.cfg), timeout=300)
        if out.returncode != 0:
            role = "holder" if inst is holder else "standby"
            tail = (out.stdout + out.stderr).strip().splitlines()[-6:]
            t.findings.append(f"busd verify failed on instance {n} ({role}): {tail}")


def run_trial(t: Trial, nfaults: tuple[int, int]) -> int:
    """One trial in a world of its own; returns how many events it published."""
    k = t.rng.randint(*nfaults)
    t.faults = (
        t.rng.sample(FAULTS, k) if k <= len(FAULTS) else [t.rng.choice(FAULTS) for _ in range(k)]
    )
    server = EmbeddedServer("127.0.0.1", 0, t.root / "nats-store")
    server.start()
    world: World | None = None
    try:
        backing = t.root / "slow"
        backing.mkdir(parents=True)
        with mounted(backing, t.root / "mnt", t.root / "faultfs.log") as fs:
            over: dict[str, Any] = {
                "consumer": CONSUMER,
                "verify": {"file_wait_s": 30},
                "exports": [FILL_RUNS],
            }
            if t.standby:
                over["ha"] = {"enabled": True, "lease_ttl_s": 2}
            a = Bus(t.root / "a", server, overrides=over)
            a.artifacts.mkdir(parents=True)
            roots = {"artifact_roots": [str(a.artifacts), str(fs.mountpoint)]}
            a.overrides = {**over, **roots}
            b = None
            if t.standby:
                b = Bus(t.root / "b", server, overrides={**over, **roots})
                b.root.mkdir(parents=True)
            a.init()
            world = World(t, server, fs, a, b)
            world.instances[0].start()
            first = world.instances[0]
            wait_for(
                lambda: (
                    first.active() or (first.proc is not None and first.proc.poll() is not None)
                ),
                60,
                "the first busd ready",
            )
            assert first.active(), first.log()[-2000:]
            world.reconcile("start")
            total = RATE * (4 * k + 2)
            with Publisher(a, total, rate_per_s=RATE, prefix=f"t{t.index}") as pub:
                wait_for(lambda: pub.acked >= RATE, 60, "events flowing")
                for fault in t.faults:
                    time.sleep(t.rng.uniform(0.3, 1.5))
                    world.reconcile(f"before {fault}")  # a lease may have moved meanwhile
                    getattr(world, fault)()
                    world.sample_acked_in_exports(fault)
            if pub.acked != total:
                t.findings.append(f"publisher gave up: {pub.acked}/{total} published")
            ids = pub.ids + t.specials
            last, _floor = _settle(world, len(ids))
            world.sample_acked_in_exports("settle")
            # the standby first: stopping the active first would hand it the lease and stop
            # it in the middle of its backfill
            for inst in sorted(world.instances, key=lambda i: i.active()):
                rc = inst.stop()
                if rc != 0:
                    t.findings.append(
                        f"busd exited {rc} on SIGTERM: {inst.log().strip().splitlines()[-3:]}"
                    )
            _check(world, ids, last)
            return len(ids)
    finally:
        if world is not None:
            for inst in world.instances:
                if inst.proc is not None and inst.proc.poll() is None:
                    inst.proc.kill()
                    inst.proc.wait(30)
        server.stop()


@pytest.mark.timeout(3600)
@pytest.mark.parametrize(
    ("trials", "nfaults", "standby"),
    [
        pytest.param(2, (3, 3), False, id="short"),
        pytest.param(30, (3, 6), True, id="long", marks=pytest.mark.slow),
    ],
)
def test_randomized_fault_mix_keeps_the_invariants(
    tmp_path: Path, trials: int, nfaults: tuple[int, int], standby: bool
) -> None:
    why = usable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE is needed here: {why}")
        pytest.skip(f"FUSE unavailable: {why}")
    trials = int(os.environ.get("CHAOS_MIX_TRIALS", trials))
    base = int(os.environ.get("CHAOS_MIX_SEED", random.SystemRandom().randrange(1 << 30)))
    print(
        f"\nchaos mix: base seed {base} (CHAOS_MIX_SEED={base} replays it), {trials} trials, "
        f"standby {'yes' if standby else 'no'}"
    )
    started = time.monotonic()
    all_findings: list[str] = []
    fault_counts: dict[str, int] = {}
    events = 0
    for i in range(trials):
        t = Trial(i, base + i, tmp_path / f"trial{i}", standby)
        t0 = time.monotonic()
        n = run_trial(t, nfaults)
        events += n
        for f in t.faults:
            fault_counts[f] = fault_counts.get(f, 0) + 1
        all_findings.extend(f"trial {i} seed {t.seed}: {f}" for f in t.findings)
        print(
            f"trial {i} seed {t.seed}: faults {t.faults}, {n} events, {t.samples} ack-floor "
            f"samples, self-exits {t.self_exits or 'none'}, findings "
            f"{t.findings or 'none'} ({time.monotonic() - t0:.0f}s)"
        )
    print(
        f"chaos mix summary: {trials} trials, faults {dict(sorted(fault_counts.items()))}, "
        f"{events} events, {len(all_findings)} findings, "
        f"{time.monotonic() - started:.0f}s"
    )
    assert not all_findings, "\n".join(all_findings)
