/** The same event from busd's Python producer (`busd submit`) and from this package. */

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";

import { buildEvent, encodeEvent, openConnection, publishEvent, resolveBus, submitArtifacts } from "../src/index.js";
import { FIVE, SKIP_LIVE, THREE, busd, liveOrSkip, place, query } from "./helpers.js";

const live = liveOrSkip();

async function pythonSubmit(runId: string, files: Record<string, string>): Promise<Record<string, unknown>> {
  const out = await busd(["submit", "--config", live!.config, "--run-id", runId, "--kind", "simulation",
    "--producer", "lab.cross", "--wait", "--timeout", "90",
    ...Object.entries(files).map(([name, file]) => `${name}=${file}`)]);
  assert.equal(out.code, 0, out.stderr);
  return JSON.parse(out.stdout.trim().split("\n").pop()!) as Record<string, unknown>;
}

const COLUMNS = "name, rows, bytes, sha256, columns, schema_hash, format";

describe("Python and TypeScript producers", { skip: SKIP_LIVE }, () => {
  it("build the same event, byte for byte: the TypeScript copy is a duplicate", async () => {
    const fills = await place(FIVE, live!.root, "xc-same/fills.parquet");
    const positions = await place(THREE, live!.root, "xc-same/positions.parquet");
    const py = await pythonSubmit("xc-same", { fills, positions });
    assert.equal(py.outcome, "committed", JSON.stringify(py));

    const event = await buildEvent({ runId: "xc-same", kind: "simulation", producer: "lab.cross",
      artifacts: [{ name: "fills", path: fills }, { name: "positions", path: positions }] });
    assert.equal(event.event_id, py.event_id);
    const bus = resolveBus({ servers: live!.natsUrl, env: {} });
    const nc = await openConnection(bus);
    try {
      const stored = await (await jetstreamManager(nc)).streams.getMessage("ARTIFACTS", { seq: Number(py.seq) });
      assert.ok(stored, "the Python event is in the stream");
      assert.equal(stored.subject, "artifacts.lab.cross");
      assert.equal(stored.header.get("Nats-Msg-Id"), py.event_id);
      assert.equal(new TextDecoder().decode(stored.data), encodeEvent(event));
    } finally {
      await nc.close();
    }
    const again = await publishEvent(event, { servers: live!.natsUrl, waitForCommit: true, commitTimeoutMs: 90_000, env: {} });
    assert.ok(again.state === "settled" && again.duplicate && again.seq === py.seq && again.outcome === "committed",
      JSON.stringify(again));
    const n = await query<{ n: number }>("SELECT count(*) AS n FROM artifacts WHERE run_id = 'xc-same'");
    assert.deepEqual(n, [{ n: 2 }]);
  });

  it("give the same catalog rows for the same files", async () => {
    const py = await pythonSubmit("xc-py", {
      fills: await place(FIVE, live!.root, "xc-py/fills.parquet"),
      positions: await place(THREE, live!.root, "xc-py/positions.parquet"),
    });
    assert.equal(py.outcome, "committed", JSON.stringify(py));
    const ts = await submitArtifacts({ servers: live!.natsUrl, env: {}, runId: "xc-ts", kind: "simulation",
      producer: "lab.cross", waitForCommit: true, commitTimeoutMs: 90_000, artifacts: [
        { name: "fills", path: await place(FIVE, live!.root, "xc-ts/fills.parquet") },
        { name: "positions", path: await place(THREE, live!.root, "xc-ts/positions.parquet") },
      ] });
    assert.ok(ts.state === "settled" && ts.outcome === "committed", JSON.stringify(ts));
    const of = (run: string) => query(`SELECT ${COLUMNS} FROM artifacts WHERE run_id = '${run}' ORDER BY name`);
    const pyRows = await of("xc-py");
    const tsRows = await of("xc-ts");
    assert.equal(pyRows.length, 2);
    assert.deepEqual(tsRows, pyRows);
    const runOf = (run: string) => query(`SELECT kind, producer, status, params, n_artifacts FROM runs WHERE run_id = '${run}'`);
    assert.deepEqual(await runOf("xc-ts"), await runOf("xc-py"));
    assert.equal((await runOf("xc-ts")).length, 1);
  });
});
