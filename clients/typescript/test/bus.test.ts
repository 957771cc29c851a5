/** Against a real nats-server and a real `busd serve` (started by tests/test_typescript_client.py). */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { describe, it } from "node:test";

import {
  type Reason,
  type SubmitResult,
  buildEvent,
  listOutbox,
  publishEvent,
  submitArtifact,
  submitArtifacts,
  waitForCommit,
} from "../src/index.js";
import { FIVE, SKIP_LIVE, THREE, liveOrSkip, place, query, scratch } from "./helpers.js";

const live = liveOrSkip();
const bus = () => ({ servers: live!.natsUrl, connectTimeoutMs: 5000, commitTimeoutMs: 90_000, env: {} });
const TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const sha = async (file: string) => createHash("sha256").update(await readFile(file)).digest("hex");

interface ArtifactRow { run_id: string; name: string; rows: number; bytes: number; sha256: string; seq: number; event_id: string }

function settledOutcome(r: SubmitResult): string {
  assert.equal(r.state, "settled", JSON.stringify(r));
  return r.state === "settled" ? r.outcome : "";
}

/** The typed reason of a rejection (a compile error if Reason were not the union). */
function rejectedReason(r: SubmitResult): Reason {
  if (r.state === "settled" && r.outcome === "rejected") {
    const reason: Reason = r.reason;
    return reason;
  }
  assert.fail(`not rejected: ${JSON.stringify(r)}`);
}

describe("publishing to busd", { skip: SKIP_LIVE }, () => {
  it("submitArtifact + waitForCommit: committed, and the row is in the exports", async () => {
    const file = await place(FIVE, live!.root, "ts-run-1/fills.parquet");
    const r = await submitArtifact({ ...bus(), runId: "ts-run-1", kind: "simulation", producer: "lab.ts",
      name: "fills", path: file, params: { seed: 7 }, waitForCommit: true, traceparent: TP });
    assert.equal(settledOutcome(r), "committed");
    assert.ok(r.state === "settled" && r.seq >= 1 && !r.duplicate && r.subject === "artifacts.lab.ts");
    assert.match(r.eventId, /^ts-run-1:[0-9a-f]{16}$/);
    // waitForCommit returns once the exports are refreshed: they already hold the row
    const rows = await query<ArtifactRow>("SELECT run_id, name, rows, bytes, sha256, event_id FROM artifacts WHERE run_id = 'ts-run-1'");
    assert.deepEqual(rows, [{ run_id: "ts-run-1", name: "fills", rows: 5, bytes: (await readFile(file)).length,
      sha256: await sha(file), event_id: r.eventId }]);
    const runs = await query("SELECT kind, producer, status, params, traceparent FROM runs WHERE run_id = 'ts-run-1'");
    assert.deepEqual(runs, [{ kind: "simulation", producer: "lab.ts", status: "succeeded", params: '{"seed":7}',
      traceparent: TP }]);
  });

  it("submitArtifacts: a slice exporter's 200 files are one atomic event", async () => {
    const files = [];
    for (let i = 0; i < 200; i++) {
      const rel = `ts-slices/part-${String(i).padStart(3, "0")}.parquet`;
      await place(i % 2 ? FIVE : THREE, live!.root, rel);
      files.push({ name: `slice_${i}`, path: rel }); // relative: read from the root, sent as written
    }
    const r = await submitArtifacts({ ...bus(), runId: "ts-slices", kind: "slices", producer: "lab.ts.slices",
      root: live!.root, artifacts: files, waitForCommit: true });
    assert.equal(settledOutcome(r), "committed");
    const got = await query<{ n: number; total: number; seqs: number }>(
      "SELECT count(*) AS n, sum(rows) AS total, count(DISTINCT seq) AS seqs FROM artifacts WHERE run_id = 'ts-slices'");
    assert.deepEqual(got, [{ n: 200, total: 100 * 3 + 100 * 5, seqs: 1 }]);
  });

  it("the same files again: JetStream drops the retry, same sequence, no second row", async () => {
    const file = await place(THREE, live!.root, "ts-run-2/fills.parquet");
    const opts = { ...bus(), runId: "ts-run-2", kind: "simulation", producer: "lab.ts", name: "fills", path: file };
    const first = await submitArtifact(opts);
    assert.ok(first.state === "stored" && !first.duplicate, JSON.stringify(first));
    const again = await submitArtifact({ ...opts, waitForCommit: true });
    assert.ok(again.state === "settled" && again.duplicate && again.outcome === "committed", JSON.stringify(again));
    assert.equal(again.seq, first.seq);
    assert.equal(again.eventId, first.eventId);
    const n = await query<{ n: number }>("SELECT count(*) AS n FROM artifacts WHERE run_id = 'ts-run-2'");
    assert.deepEqual(n, [{ n: 1 }]);
  });

  it("waitForCommit on its own, for a sequence stored earlier", async () => {
    const file = await place(THREE, live!.root, "ts-run-3/fills.parquet");
    const stored = await submitArtifact({ ...bus(), runId: "ts-run-3", kind: "k", producer: "lab.ts", name: "fills", path: file });
    assert.equal(stored.state, "stored");
    if (stored.state !== "stored") return;
    const outcome = await waitForCommit({ ...bus(), seq: stored.seq, timeoutMs: 90_000 });
    assert.deepEqual(outcome, { outcome: "committed", seq: stored.seq, eventId: stored.eventId });
  });

  it("a file outside busd's artifact roots: rejected, reason typed path_outside_roots", async () => {
    const outside = await place(THREE, await scratch(), "elsewhere/fills.parquet");
    const r = await submitArtifact({ ...bus(), runId: "ts-outside", kind: "k", producer: "lab.ts", name: "fills",
      path: outside, waitForCommit: true });
    assert.equal(rejectedReason(r), "path_outside_roots");
    assert.ok(r.state === "settled" && r.outcome === "rejected" && (r.detail ?? "").length > 0, JSON.stringify(r));
  });

  it("one bad file rejects the whole event: none of its artifacts is committed", async () => {
    const good = await place(FIVE, live!.root, "ts-atomic/fills.parquet");
    const outside = await place(FIVE, await scratch(), "positions.parquet");
    const r = await submitArtifacts({ ...bus(), runId: "ts-atomic", kind: "k", producer: "lab.ts",
      artifacts: [{ name: "fills", path: good }, { name: "positions", path: outside }], waitForCommit: true });
    assert.equal(rejectedReason(r), "path_outside_roots");
    assert.deepEqual(await query("SELECT name FROM artifacts WHERE run_id = 'ts-atomic'"), []);
  });

  it("wrong row counts in a hand-built event: rejected, reason typed rows_mismatch", async () => {
    const file = await place(FIVE, live!.root, "ts-rows/fills.parquet");
    const event = await buildEvent({ runId: "ts-rows", kind: "k", producer: "lab.ts", artifacts: [{ name: "fills", path: file }] });
    event.artifacts[0].rows = 6;
    event.event_id = "ts-rows:wrong-rows";
    const r = await publishEvent(event, { ...bus(), waitForCommit: true });
    assert.equal(rejectedReason(r), "rows_mismatch");
  });

  it("best_effort with the bus up publishes and leaves the outbox empty", async () => {
    const outbox = path.join(await scratch(), "outbox");
    const file = await place(THREE, live!.root, "ts-run-4/fills.parquet");
    const r = await submitArtifact({ runId: "ts-run-4", kind: "k", producer: "lab.ts", name: "fills", path: file,
      env: { NATS_URL: live!.natsUrl, ARTIFACT_BUS_MODE: "best_effort", ARTIFACT_BUS_OUTBOX: outbox },
      waitForCommit: true, commitTimeoutMs: 90_000 });
    assert.equal(settledOutcome(r), "committed");
    assert.deepEqual(await listOutbox(outbox), []);
  });
});
