"""OpenLineage run events for committed runs (docs/lineage.md): a side effect of a commit,
never on the way to an ack.

After each catalog commit the committer hands the batch's rows to :meth:`Lineage.offer`, which
only queues them (bounded: when ``lineage.queue_max`` events already wait, the batch's events
are dropped and counted, so a slow or dead lineage endpoint costs acks nothing). One task
takes them from the queue; on a thread of its own it builds one ``RunEvent`` per committed run
with the ``openlineage-python`` client's generated classes, and sends it: an HTTP POST to
``lineage.url``, or a core publish to ``lineage.subject`` on busd's own NATS connection. Every
event is counted in ``busd_lineage_events_total{outcome}`` (sent, failed, dropped); a failed
one is not retried (at most once per commit, best effort).

The client package is imported only when lineage is configured: importing it costs seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import duckdb

from busd import __version__, log
from busd.catalog.schema import ARTIFACT_LOG_COLUMNS, RUN_LOG_COLUMNS
from busd.config import LineageSettings
from busd.metrics import Metrics
from busd.model import Batch

# the `producer` of every event: a URI naming busd and its version, as the spec asks
PRODUCER = f"https://busd.dev/busd/{__version__}"
FILE_NAMESPACE = "file"  # the OpenLineage naming of a local file system: namespace `file`
UNKNOWN_JOB = "unknown"  # the job of a parent run busd has no record of
_KINDS_KEPT = 100_000  # run_id -> kind remembered, for the parent facet of later runs

# busd's run statuses (free text) as OpenLineage run states; no status at all is a finished
# job (one event per finished job, says the contract), any other status is OTHER.
STATES = {
    "succeeded": "COMPLETE",
    "success": "COMPLETE",
    "successful": "COMPLETE",
    "complete": "COMPLETE",
    "completed": "COMPLETE",
    "done": "COMPLETE",
    "ok": "COMPLETE",
    "failed": "FAIL",
    "failure": "FAIL",
    "error": "FAIL",
    "errored": "FAIL",
    "aborted": "ABORT",
    "cancelled": "ABORT",
    "canceled": "ABORT",
    "killed": "ABORT",
    "running": "RUNNING",
    "started": "START",
}

Row = dict[str, Any]
Publish = Callable[[str, bytes], Awaitable[None]]


def state_of(status: str | None) -> str:
    if status is None:
        return "COMPLETE"
    return STATES.get(status.strip().lower(), "OTHER")


def run_uuid(namespace: str, run_id: str) -> str:
    """The OpenLineage run id (a UUID) of a busd run: the same for the same run, so a parent
    named by ``parent_run_id`` is the run of that parent's own events."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"busd:{namespace}:{run_id}"))


def rows_of(batch: Batch) -> tuple[list[Row], dict[int, list[Row]]]:
    """The committed runs of a batch, and their artifacts by sequence, as dicts by column."""
    runs = [dict(zip((c for c, _ in RUN_LOG_COLUMNS), r, strict=True)) for r in batch.runs]
    artifacts: dict[int, list[Row]] = {}
    for r in batch.artifacts:
        row = dict(zip((c for c, _ in ARTIFACT_LOG_COLUMNS), r, strict=True))
        artifacts.setdefault(row["seq"], []).append(row)
    return runs, artifacts


def build_event(
    run: Row, artifacts: Sequence[Row], namespace: str, parent_kind: str | None
) -> dict[str, Any]:
    """One OpenLineage RunEvent for a committed run, as the JSON object sent."""
    from openlineage.client.event_v2 import Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import (
        dataset_version_dataset,
        output_statistics_output_dataset,
        parent_run,
        schema_dataset,
        tags_run,
    )
    from openlineage.client.serde import Serde

    at: dt.datetime = run["finished_at"] or run["published_at"]
    tags = [
        ("busd.run_id", run["run_id"]),
        ("busd.event_id", run["event_id"]),
        ("busd.seq", str(run["seq"])),
        ("busd.producer", run["producer"]),
        ("busd.status", run["status"]),
        ("busd.code_version", run["code_version"]),
        ("traceparent", run.get("traceparent")),
    ]
    run_facets: dict[str, Any] = {
        "tags": tags_run.TagsRunFacet(
            tags=[
                tags_run.TagsRunFacetFields(key=k, value=v, source="BUSD")
                for k, v in tags
                if v is not None
            ],
            producer=PRODUCER,
        )
    }
    parent = run["parent_run_id"]
    if parent is not None:
        run_facets["parent"] = parent_run.ParentRunFacet(
            run=parent_run.Run(runId=run_uuid(namespace, parent)),
            job=parent_run.Job(namespace=namespace, name=parent_kind or UNKNOWN_JOB),
            producer=PRODUCER,
        )
    outputs = []
    for a in artifacts:
        facets: dict[str, Any] = {
            "schema": schema_dataset.SchemaDatasetFacet(
                fields=[
                    schema_dataset.SchemaDatasetFacetFields(name=c["name"], type=c["type"])
                    for c in json.loads(a["columns"] or "[]")
                ],
                producer=PRODUCER,
            )
        }
        if a["sha256"]:
            facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=a["sha256"], producer=PRODUCER
            )
        stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=a["rows"], size=a["bytes"], fileCount=1, producer=PRODUCER
        )
        outputs.append(
            OutputDataset(
                namespace=FILE_NAMESPACE,
                name=a["path"],
                facets=facets,
                outputFacets={"outputStatistics": stats},
            )
        )
    event = RunEvent(
        eventType=RunState(state_of(run["status"])),
        eventTime=at.isoformat(),
        run=Run(runId=run_uuid(namespace, run["run_id"]), facets=run_facets),
        job=Job(namespace=namespace, name=run["kind"]),
        inputs=[],  # the event names no inputs: the parent run is the lineage it gives
        outputs=outputs,
        producer=PRODUCER,
    )
    out: dict[str, Any] = Serde.to_dict(event)
    return out


class Lineage:
    """Queues committed batches and sends their OpenLineage events from a task of its own."""

    def __init__(
        self,
        settings: LineageSettings,
        metrics: Metrics,
        *,
        publish: Publish | None = None,
        cursor: duckdb.DuckDBPyConnection | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.publish = publish  # with lineage.subject: a core publish on busd's connection
        self.cursor = cursor  # a catalog reader of its own, used on the lineage thread only
        self.log = log.get()
        self._queue: asyncio.Queue[tuple[list[Row], dict[int, list[Row]]]] = asyncio.Queue()
        self._waiting = 0  # events queued, not yet sent
        self._known: OrderedDict[str, str] = OrderedDict()  # run_id -> kind, recent first
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="busd-lineage")
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.settings.url or self.settings.subject)

    def offer(self, rows: Batch) -> None:
        """Queue the events of a committed batch, or drop them all if the queue is full.
        Never waits: called between a commit and its acks."""
        if not self.enabled or not rows.runs:
            return
        n = len(rows.runs)
        if self._waiting + n > self.settings.queue_max:
            self.metrics.lineage_events.labels(outcome="dropped").inc(n)
            if not self._warned:  # once per episode: the endpoint is slower than the bus
                self._warned = True
                self.log.warning(
                    "lineage queue full; dropping events", queued=self._waiting, dropped=n
                )
            return
        self._waiting += n
        self._queue.put_nowait(rows_of(rows))

    def pending(self) -> int:
        return self._waiting

    async def run(self) -> None:
        """Send what is queued, batch after batch, until cancelled."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        while True:
            runs, artifacts = await self._queue.get()
            try:
                events = await loop.run_in_executor(self._thread, self._build, runs, artifacts)
            except Exception as exc:  # noqa: BLE001 - lineage never stops the daemon
                self.metrics.lineage_events.labels(outcome="failed").inc(len(runs))
                self.log.warning("lineage: cannot build events", error=str(exc))
                events = []
            self._waiting -= len(runs) - len(events)  # not built: counted failed already
            for body in events:
                await self._send(loop, body)
                self._waiting -= 1
            if self._waiting == 0:
                self._warned = False

    async def flush(self, timeout_s: float) -> None:
        """At shutdown: give what is queued up to ``timeout_s`` to go out."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._waiting and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    def close(self) -> None:
        """Wait for the lineage thread (a send in flight ends within ``timeout_s``), then
        let go of the catalog: before the catalog's own connection closes. What did not go
        out by then is counted dropped."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        if self._waiting:
            self.metrics.lineage_events.labels(outcome="dropped").inc(self._waiting)
            self.log.warning("lineage events not sent at shutdown", dropped=self._waiting)
            self._waiting = 0
        if self.cursor is not None:
            with contextlib.suppress(duckdb.Error):
                self.cursor.close()
            self.cursor = None

    def _kinds(self, run_ids: list[str]) -> dict[str, str]:
        """The kind of each of these runs the catalog holds (the parent facet's job)."""
        if self.cursor is None:
            return {}
        rows = self.cursor.execute(
            "SELECT run_id, kind FROM catalog.runs_d WHERE run_id IN (SELECT unnest(?::VARCHAR[]))",
            [run_ids],
        ).fetchall()
        return {str(r): str(k) for r, k in rows}

    def _build(self, runs: list[Row], artifacts: dict[int, list[Row]]) -> list[bytes]:
        ns = self.settings.namespace
        for run in runs:  # a parent in the same batch is known before its child
            self._remember(run["run_id"], run["kind"])
        wanted = sorted(
            {r["parent_run_id"] for r in runs if r["parent_run_id"] is not None} - set(self._known)
        )
        if wanted:
            try:
                for run_id, kind in self._kinds(wanted).items():
                    self._remember(run_id, kind)
            except Exception as exc:  # noqa: BLE001 - the parent's job is then "unknown"
                self.log.warning("lineage: cannot read parent runs", error=str(exc))
        out = []
        for run in runs:
            parent = run["parent_run_id"]
            parent_kind = self._known.get(parent) if parent is not None else None
            try:
                event = build_event(run, artifacts.get(run["seq"], []), ns, parent_kind)
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop the rest
                self.metrics.lineage_events.labels(outcome="failed").inc()
                self.log.warning("lineage: cannot build event", seq=run["seq"], error=str(exc))
                continue
            out.append(json.dumps(event, sort_keys=True).encode())
        return out

    def _remember(self, run_id: str, kind: str) -> None:
        self._known[run_id] = kind
        self._known.move_to_end(run_id)
        while len(self._known) > _KINDS_KEPT:
            self._known.popitem(last=False)

    async def _send(self, loop: asyncio.AbstractEventLoop, body: bytes) -> None:
        s = self.settings
        try:
            if s.subject:
                assert self.publish is not None
                await self.publish(s.subject, body)
            else:
                await loop.run_in_executor(self._thread, self._post, body)
        except Exception as exc:  # noqa: BLE001 - counted and logged, never retried
            self.metrics.lineage_events.labels(outcome="failed").inc()
            self.log.warning(
                "lineage: event not sent",
                target=s.subject or s.url,
                error=str(exc) or type(exc).__name__,
            )
            return
        self.metrics.lineage_events.labels(outcome="sent").inc()

    def _post(self, body: bytes) -> None:
        s = self.settings
        request = urllib.request.Request(
            s.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        if s.api_key:
            request.add_header("Authorization", f"Bearer {s.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=s.timeout_s) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            raise ConnectionError(f"HTTP {exc.code} from {s.url}") from None
