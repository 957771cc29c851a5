"""OpenLineage run events (docs/lineage.md), received from a real `busd serve` on a real HTTP
endpoint (a small server of this test on 127.0.0.1) and on a NATS subject, each checked
against the OpenLineage spec's JSON Schemas (vendored in tests/openlineage-spec/, as neither
openlineage-python nor openlineage-integration-common ships them). A lineage endpoint that
hangs costs no ack: the events are dropped and counted instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pytest
import referencing
from support import Bus, ack_floor, committed_batch, wait_for

from busd.daemon.core import Daemon
from busd.lineage import PRODUCER, Lineage, build_event, run_uuid, state_of
from busd.metrics import Metrics

SPEC = Path(__file__).resolve().parent / "openlineage-spec"
RUN_EVENT = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# ---- the spec's schemas ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry() -> referencing.Registry[Any]:
    resources = []
    for path in sorted(SPEC.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        resources.append((schema["$id"], referencing.Resource.from_contents(schema)))
    return referencing.Registry().with_resources(resources)


def check(event: dict[str, Any], registry: referencing.Registry[Any]) -> None:
    """The event against the RunEvent schema, and each facet against the schema its
    ``_schemaURL`` names (formats too: uuid, date-time as the checker knows them)."""

    def validate(instance: Any, ref: str) -> None:
        base, _, _ = ref.partition("#")
        assert base in {r for r in registry}, f"{ref}: not vendored in {SPEC.name}/ (README)"
        jsonschema.Draft202012Validator(
            {"$ref": ref},
            registry=registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        ).validate(instance)

    validate(event, RUN_EVENT)
    assert event["schemaURL"] == RUN_EVENT
    dt.datetime.fromisoformat(event["eventTime"])  # the format checker may not know date-time
    facets = [*event["run"].get("facets", {}).values(), *event["job"].get("facets", {}).values()]
    for dataset in event.get("outputs", []):
        facets += [*dataset.get("facets", {}).values(), *dataset.get("outputFacets", {}).values()]
    assert facets
    for facet in facets:
        assert facet["_producer"] == PRODUCER
        validate(facet, facet["_schemaURL"])


# ---- a real HTTP endpoint -------------------------------------------------------------------
@dataclass
class Receiver:
    """POSTed bodies, as an OpenLineage backend receives them; ``gate`` holds each request
    until it is set (a backend that hangs)."""

    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(b) for b in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()
    got.gate.set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.arrived.set()
            got.gate.wait(60)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.bodies.append(body)
            got.headers.append(dict(self.headers))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    got.url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/lineage"
    try:
        yield got
    finally:
        got.gate.set()
        server.shutdown()
        server.server_close()


def runs(bus: Bus) -> list[dict[str, Any]]:
    """A parent with two artifacts, a child of it that failed (with a traceparent), a run whose
    parent busd never saw, and a rejected event (no lineage)."""
    return [
        bus.event(
            "lin-parent",
            [
                {"name": "fills", "path": str(bus.parquet("lin-parent/fills.parquet", 4))},
                {"name": "pos", "path": str(bus.parquet("lin-parent/pos.parquet", 2))},
            ],
            run={"run_id": "lin-parent", "kind": "backtest", "status": "succeeded"},
        ),
        bus.event(
            "lin-child",
            [{"name": "report", "path": str(bus.parquet("lin-child/report.parquet", 1))}],
            run={
                "run_id": "lin-child",
                "kind": "report",
                "status": "failed",
                "parent_run_id": "lin-parent",
                "finished_at": "2026-11-28T10:05:00Z",
            },
        ),
        bus.event(
            "lin-orphan",
            run={"run_id": "lin-orphan", "kind": "sim", "parent_run_id": "elsewhere-1"},
        ),
        bus.event("lin-bad", [{"name": "f", "path": "missing.parquet"}]),
    ]


def test_a_run_event_per_committed_run_over_http(
    bus: Bus, receiver: Receiver, registry: referencing.Registry[Any]
) -> None:
    cfg = bus.write_config(
        lineage={"url": receiver.url, "namespace": "lab", "api_key": "k-123"},
        consumer={"batch_max": 2},  # the parent and its child may come in two batches
    )
    bus.init()
    bus.publish(runs(bus), headers=[None, {"traceparent": TP}, None, None])
    served = bus.spawn("serve", "--config", str(cfg), "--drain")
    assert served.wait(90) == 0, bus.log()

    events = {e["run"]["runId"]: e for e in receiver.events()}
    assert len(receiver.bodies) == 3, bus.log()  # the rejected event has none
    for event in events.values():
        check(event, registry)
    assert {h.get("Authorization") for h in receiver.headers} == {"Bearer k-123"}

    parent = events[run_uuid("lab", "lin-parent")]
    assert parent["eventType"] == "COMPLETE"
    assert parent["job"] == {"namespace": "lab", "name": "backtest", "facets": {}}
    assert parent["inputs"] == []
    outputs = {o["name"]: o for o in parent["outputs"]}
    fills = str((bus.artifacts / "lin-parent" / "fills.parquet").resolve())
    assert set(outputs) == {fills, str((bus.artifacts / "lin-parent" / "pos.parquet").resolve())}
    assert outputs[fills]["namespace"] == "file"
    assert outputs[fills]["outputFacets"]["outputStatistics"]["rowCount"] == 4
    assert [f["name"] for f in outputs[fills]["facets"]["schema"]["fields"]] == ["x", "y"]
    assert "parent" not in parent["run"]["facets"]

    child = events[run_uuid("lab", "lin-child")]
    assert child["eventType"] == "FAIL"
    assert child["eventTime"].startswith("2026-11-28T10:05:00")
    assert child["run"]["facets"]["parent"]["run"]["runId"] == parent["run"]["runId"]
    parent_job = child["run"]["facets"]["parent"]["job"]
    assert (parent_job["namespace"], parent_job["name"]) == ("lab", "backtest")
    tags = {t["key"]: t["value"] for t in child["run"]["facets"]["tags"]["tags"]}
    assert tags["busd.run_id"] == "lin-child" and tags["traceparent"] == TP

    orphan = events[run_uuid("lab", "lin-orphan")]
    assert orphan["run"]["facets"]["parent"]["run"]["runId"] == run_uuid("lab", "elsewhere-1")
    assert orphan["run"]["facets"]["parent"]["job"]["name"] == "unknown"


def serve_in_process(bus: Bus, metrics: Metrics, **over: Any) -> Daemon:
    return Daemon(bus.settings(**over), drain=True, metrics=metrics)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_hanging_endpoint_costs_no_ack_its_events_are_dropped_and_counted(
    bus: Bus, receiver: Receiver
) -> None:
    receiver.gate.clear()  # every POST hangs until the end of the test
    metrics = Metrics()
    bus.init()
    bus.publish([bus.event(f"hang-{i}") for i in range(4)])
    daemon = serve_in_process(
        bus,
        metrics,
        lineage={"url": receiver.url, "queue_max": 1, "timeout_s": 30},
        consumer={"batch_max": 1, "commit_max": 1},  # one run per commit
    )

    async def go() -> None:
        served = asyncio.ensure_future(daemon.run())
        try:
            for _ in range(300):  # bounded: 300 looks, 0.1 s apart
                acked = await asyncio.to_thread(ack_floor, bus)  # a redelivery may ack twice
                if (acked == 4 and receiver.arrived.is_set()) or served.done():
                    break
                await asyncio.sleep(0.1)
            # every event acked while the lineage endpoint still holds the first request
            assert await asyncio.to_thread(ack_floor, bus) == 4
            assert receiver.arrived.is_set() and not receiver.bodies
            # a queue of one: the first waits, later ones find it full and are dropped
            assert sample(metrics, "busd_lineage_events_total", outcome="dropped") >= 1
        finally:
            receiver.gate.set()
            await asyncio.wait_for(served, 60)

    asyncio.run(go())
    outcomes = {
        o: sample(metrics, "busd_lineage_events_total", outcome=o)
        for o in ("sent", "failed", "dropped")
    }
    assert sum(outcomes.values()) == 4, outcomes
    assert outcomes["sent"] == len(receiver.bodies) >= 1, outcomes


def test_run_events_on_a_nats_subject(bus: Bus, registry: referencing.Registry[Any]) -> None:
    bus.init()
    bus.publish(runs(bus)[:2])

    async def go() -> list[dict[str, Any]]:
        nc = await nats.connect(servers=bus.servers)
        got: list[dict[str, Any]] = []
        try:
            sub = await nc.subscribe("lineage.busd")
            await nc.flush()
            await serve_in_process(bus, Metrics(), lineage={"subject": "lineage.busd"}).run()
            for _ in range(2):
                msg = await sub.next_msg(timeout=10)
                got.append(json.loads(msg.data))
        finally:
            await nc.close()
        return got

    events = asyncio.run(go())
    for event in events:
        check(event, registry)
    assert {e["job"]["name"] for e in events} == {"backtest", "report"}
    assert {e["job"]["namespace"] for e in events} == {"busd"}


def test_run_states_and_ids() -> None:
    assert [state_of(s) for s in (None, "succeeded", "FAILED", " cancelled", "partial")] == [
        "COMPLETE",
        "COMPLETE",
        "FAIL",
        "ABORT",
        "OTHER",
    ]
    assert uuid.UUID(run_uuid("busd", "r-1")).version == 5
    assert run_uuid("busd", "r-1") == run_uuid("busd", "r-1") != run_uuid("other", "r-1")


@pytest.mark.parametrize(
    "spoil",
    [
        lambda e: e.pop("producer"),
        lambda e: e["run"].update(runId="run-1"),  # not a UUID
        lambda e: e["outputs"][0]["outputFacets"]["outputStatistics"].update(rowCount="4"),
        lambda e: e["run"]["facets"]["parent"]["job"].pop("name"),
        lambda e: e["run"]["facets"]["tags"].pop("_schemaURL"),
    ],
)
def test_the_schema_check_catches_a_broken_event(
    registry: referencing.Registry[Any], spoil: Any
) -> None:
    """The check above is not vacuous: the spec's schemas refuse what they should."""
    at = dt.datetime(2026, 11, 28, 10, tzinfo=dt.UTC)
    run = {
        "seq": 7, "run_id": "r-1", "kind": "sim", "producer": "lab", "status": None,
        "finished_at": None, "published_at": at, "code_version": None, "parent_run_id": "p-1",
        "event_id": "r-1:7", "traceparent": None,
    }  # fmt: skip
    artifact = {
        "path": "/data/r-1/fills.parquet", "rows": 4, "bytes": 100, "sha256": "a" * 64,
        "columns": '[{"name": "x", "type": "int64"}]',
    }  # fmt: skip
    event = build_event(run, [artifact], "busd", "sim")
    check(event, registry)
    spoil(event)
    with pytest.raises(jsonschema.ValidationError):
        check(event, registry)


def test_a_failure_to_build_events_is_counted_and_the_sender_goes_on(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lineage never ends the daemon: a batch whose events cannot be built is counted failed,
    and the next one is sent."""
    metrics = Metrics()
    sent: list[bytes] = []

    async def publish(subject: str, body: bytes) -> None:
        sent.append(body)

    lineage = Lineage(
        bus.settings(lineage={"subject": "lineage.x"}).lineage, metrics, publish=publish
    )
    calls = {"n": 0}
    build = lineage._build

    def flaky(runs: Any, artifacts: Any) -> list[bytes]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return build(runs, artifacts)

    monkeypatch.setattr(lineage, "_build", flaky)

    async def go() -> None:
        task = asyncio.ensure_future(lineage.run())
        try:
            lineage.offer(committed_batch(1, "r1"))
            lineage.offer(committed_batch(2, "r2"))
            for _ in range(300):  # bounded: 30 s (the client's first import is slow)
                if lineage.pending() == 0:
                    break
                await asyncio.sleep(0.1)
            assert not task.done()
        finally:
            task.cancel()
            lineage.close()

    asyncio.run(go())
    assert sample(metrics, "busd_lineage_events_total", outcome="failed") == 1
    assert sample(metrics, "busd_lineage_events_total", outcome="sent") == len(sent) == 1


def test_a_stop_does_not_wait_for_a_lineage_request_that_hangs(
    bus: Bus, receiver: Receiver
) -> None:
    """SIGTERM while the lineage endpoint holds a request (``timeout_s`` 60): the stop
    leaves the lineage thread behind after ``shutdown_grace_s`` (3 here) and exits 0. Before,
    it waited for the request with no bound (a reviewer's endpoint that answered a byte
    every 2 s held busd for minutes)."""
    receiver.gate.clear()  # every POST hangs until the end of the test
    cfg = bus.write_config(
        lineage={"url": receiver.url, "timeout_s": 60}, consumer={"shutdown_grace_s": 3}
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: "busd ready" in bus.log(), 60, "busd ready")
        bus.publish([bus.event("held-by-lineage")])
        wait_for(receiver.arrived.is_set, 60, "the lineage request")
        proc.send_signal(signal.SIGTERM)
        # well under the request's 60 s: the stop's two grace periods, and busd's own exit
        assert proc.wait(40) == 0, bus.log()[-3000:]
    finally:
        receiver.gate.set()
        bus.reap()
    assert "the lineage thread is stuck in a read; exiting without it" in bus.log()
