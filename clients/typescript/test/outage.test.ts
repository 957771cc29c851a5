/**
 * Through a NATS outage, in two phases the Python wrapper runs around stopping and restarting
 * the real nats-server (ARTIFACT_BUS_TEST_PHASE=down, then up), busd serve running throughout.
 * Folders under ARTIFACT_BUS_TEST_WORK: ts-outbox (written here, flushed here), py-outbox
 * (written by `busd submit --outbox`, flushed here), ts-for-busd (written here, flushed by
 * `busd outbox flush` in the wrapper).
 */

import assert from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, it } from "node:test";

import { BusUnavailableError, flushOutbox, listOutbox, submitArtifact, submitArtifacts, waitForCommit } from "../src/index.js";
import { FIVE, LIVE, THREE, liveOrSkip, place, query, timed } from "./helpers.js";

const live = liveOrSkip();
const phase = process.env.ARTIFACT_BUS_TEST_PHASE;
const work = LIVE.work ?? "";
const tsOutbox = path.join(work, "ts-outbox");
const pyOutbox = path.join(work, "py-outbox");
const forBusd = path.join(work, "ts-for-busd");

describe("NATS down", { skip: live && phase === "down" ? false : "phase down of tests/test_typescript_client.py" }, () => {
  it("best_effort keeps the event in the outbox and the job goes on", async () => {
    const file = await place(FIVE, live!.root, "ts-outage/fills.parquet");
    const env = { NATS_URL: live!.natsUrl, ARTIFACT_BUS_MODE: "best_effort", ARTIFACT_BUS_OUTBOX: tsOutbox,
      ARTIFACT_BUS_CONNECT_TIMEOUT_MS: "2000" };
    const r = await timed(submitArtifact({ env, runId: "ts-outage", kind: "k", producer: "lab.ts", name: "fills",
      path: file, waitForCommit: true, log: () => undefined }));
    assert.equal(r.error, undefined, String(r.error));
    assert.ok(r.seconds < 4, `took ${r.seconds}s`);
    assert.equal(r.value?.state, "outbox");
    assert.equal((await listOutbox(tsOutbox)).length, 1);
    // a second event, for `busd outbox flush` to send
    const other = await place(THREE, live!.root, "ts-outage-2/fills.parquet");
    const r2 = await submitArtifacts({ env: { ...env, ARTIFACT_BUS_OUTBOX: forBusd }, runId: "ts-outage-2", kind: "k",
      producer: "lab.ts", artifacts: [{ name: "fills", path: other }], log: () => undefined });
    assert.equal(r2.state, "outbox");
    await writeFile(path.join(work, "event-ids.json"), JSON.stringify({
      "ts-outage": r.value?.eventId, "ts-outage-2": r2.eventId }));
  });

  it("required throws within the connect timeout, naming the URL", async () => {
    const file = await place(FIVE, live!.root, "ts-required/fills.parquet");
    const r = await timed(submitArtifact({ servers: live!.natsUrl, connectTimeoutMs: 2000, mode: "required", env: {},
      runId: "ts-required", kind: "k", producer: "lab.ts", name: "fills", path: file }));
    assert.ok(r.error instanceof BusUnavailableError, String(r.error));
    assert.ok((r.error as Error).message.includes(`cannot reach NATS at ${live!.natsUrl}`), (r.error as Error).message);
    assert.ok(r.seconds < 3.5, `took ${r.seconds}s`);
  });
});

describe("NATS back", { skip: live && phase === "up" ? false : "phase up of tests/test_typescript_client.py" }, () => {
  it("flushOutbox sends the kept event once; it commits; a second flush sends nothing", async () => {
    const ids = JSON.parse(await readFile(path.join(work, "event-ids.json"), "utf8")) as Record<string, string>;
    const bus = { servers: live!.natsUrl, env: {} };
    const first = await flushOutbox(tsOutbox, bus);
    assert.equal(first.sent, 1);
    assert.equal(first.duplicates, 0);
    const outcome = await waitForCommit({ ...bus, seq: first.seqs[0]!, timeoutMs: 90_000 });
    assert.deepEqual(outcome, { outcome: "committed", seq: first.seqs[0], eventId: ids["ts-outage"] });
    assert.deepEqual(await listOutbox(tsOutbox), []);
    assert.deepEqual(await flushOutbox(tsOutbox, bus), { sent: 0, seqs: [], duplicates: 0 });
    assert.deepEqual(await query("SELECT name, rows FROM artifacts WHERE run_id = 'ts-outage'"), [{ name: "fills", rows: 5 }]);
  });

  it("flushOutbox sends what busd submit --outbox kept (the Python format)", async () => {
    const files = await listOutbox(pyOutbox);
    assert.equal(files.length, 1, "the wrapper's busd submit --outbox wrote one event");
    const flushed = await flushOutbox(pyOutbox, { servers: live!.natsUrl, env: {} });
    assert.equal(flushed.sent, 1);
    const outcome = await waitForCommit({ servers: live!.natsUrl, env: {}, seq: flushed.seqs[0]!, timeoutMs: 90_000 });
    assert.equal(outcome.outcome, "committed");
    assert.deepEqual(await query("SELECT name, rows FROM artifacts WHERE run_id = 'py-outage'"), [{ name: "fills", rows: 3 }]);
  });
});
