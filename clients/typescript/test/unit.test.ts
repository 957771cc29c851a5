/** No bus needed: events, identifiers, files, modes, the outbox format, failing fast. */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFile, readdir, writeFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { describe, it } from "node:test";

import {
  ArtifactBusConfigError,
  BusUnavailableError,
  InvalidEventError,
  REASONS,
  buildEvent,
  checkTraceparent,
  defaultEventId,
  describeArtifact,
  encodeEvent,
  flushOutbox,
  isReason,
  listOutbox,
  readOutbox,
  resolveBus,
  resolveMode,
  submitArtifact,
  submitArtifacts,
  waitForCommit,
} from "../src/index.js";
import { FIVE, THREE, scratch, timed } from "./helpers.js";

const sha = async (file: string) => createHash("sha256").update(await readFile(file)).digest("hex");

/** A port nothing listens on (bound, then closed). */
async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** A server that accepts connections and never says a word (a hung NATS, a black hole). */
async function silentServer(): Promise<{ url: string; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => { sockets.add(s); s.on("error", () => undefined); });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: `nats://127.0.0.1:${port}`,
    close: () => new Promise<void>((resolve) => { for (const s of sockets) s.destroy(); server.close(() => resolve()); }),
  };
}

describe("events", () => {
  it("describes a file: absolute path, bytes, SHA-256 and the Parquet footer's row count", async () => {
    const a = await describeArtifact({ name: "fills", path: FIVE });
    assert.deepEqual(a, { name: "fills", path: FIVE, rows: 5, bytes: (await readFile(FIVE)).length, sha256: await sha(FIVE) });
    const b = await describeArtifact({ name: "x", path: path.relative(process.cwd(), THREE) });
    assert.equal(b.path, THREE);
    assert.equal(b.rows, 3);
    // with a root, a relative path is read there and sent as written (busd anchors it)
    const c = await describeArtifact({ name: "x", path: "three.parquet" }, path.dirname(THREE));
    assert.equal(c.path, "three.parquet");
    assert.equal(c.rows, 3);
  });

  it("builds the event busd's Python producer builds: same fields, order and default id", async () => {
    const event = await buildEvent({ runId: "sim-1", kind: "simulation", producer: "lab.ts",
      artifacts: [{ name: "fills", path: FIVE }, { name: "positions", path: THREE }] });
    const fp = `fills=${await sha(FIVE)};positions=${await sha(THREE)};`;
    const id = `sim-1:${createHash("sha256").update(fp).digest("hex").slice(0, 16)}`;
    assert.equal(event.event_id, id);
    assert.equal(defaultEventId("sim-1", event.artifacts), id);
    assert.equal(event.schema_version, 1);
    assert.deepEqual(event.run, { run_id: "sim-1", kind: "simulation", status: "succeeded" });
    const text = encodeEvent(event);
    assert.ok(text.startsWith('{"schema_version":1,"run":{"run_id":"sim-1","kind":"simulation","status":"succeeded"},"artifacts":[{"name":"fills","path":'), text);
    assert.ok(text.endsWith(`"event_id":"${id}","producer":"lab.ts"}`), text);
    assert.deepEqual(JSON.parse(text), event);
    // optional run fields, nulls left out
    const full = await buildEvent({ runId: "sim-2", kind: "k", producer: "p", status: null,
      startedAt: new Date("2026-11-28T10:00:00Z"), params: { seed: 7 }, codeVersion: "abc",
      parentRunId: "sim-1", eventId: "sim-2:final", artifacts: [{ name: "f", path: THREE, meta: { a: 1 } }] });
    assert.deepEqual(full.run, { run_id: "sim-2", kind: "k", started_at: "2026-11-28T10:00:00.000Z",
      params: { seed: 7 }, code_version: "abc", parent_run_id: "sim-1" });
    assert.equal(full.event_id, "sim-2:final");
    assert.deepEqual(full.artifacts[0]?.meta, { a: 1 });
  });

  it("refuses what busd would reject, before anything is sent", async () => {
    const ok = { runId: "r", kind: "k", producer: "lab.ts" };
    const cases: [string, Parameters<typeof buildEvent>[0], RegExp][] = [
      ["run id", { ...ok, runId: "has space", artifacts: [{ name: "f", path: THREE }] }, /run id/],
      ["no artifacts", { ...ok, artifacts: [] }, /1 to 1000/],
      ["1001 artifacts", { ...ok, artifacts: Array.from({ length: 1001 }, (_, i) => ({ name: `f${i}`, path: THREE })) }, /1001 given/],
      ["twice", { ...ok, artifacts: [{ name: "f", path: THREE }, { name: "f", path: FIVE }] }, /appears twice/],
      ["producer", { ...ok, producer: "a..b", artifacts: [{ name: "f", path: THREE }] }, /producer/],
      ["no producer", { runId: "r", kind: "k", env: {}, artifacts: [{ name: "f", path: THREE }] }, /ARTIFACT_BUS_PRODUCER/],
      ["missing file", { ...ok, artifacts: [{ name: "f", path: "/nonexistent/f.parquet" }] }, /cannot read .*ENOENT/],
      ["event id", { ...ok, eventId: "x".repeat(201), artifacts: [{ name: "f", path: THREE }] }, /event id/],
    ];
    for (const [what, opts, message] of cases) {
      await assert.rejects(buildEvent(opts), (err: Error) => err instanceof InvalidEventError && message.test(err.message), what);
    }
    const dir = await scratch();
    const notParquet = path.join(dir, "f.parquet");
    await writeFile(notParquet, "id,x\n1,2\n");
    await assert.rejects(buildEvent({ ...ok, artifacts: [{ name: "f", path: notParquet }] }), /not a Parquet file/);
  });

  it("takes the producer from ARTIFACT_BUS_PRODUCER", async () => {
    const event = await buildEvent({ runId: "r", kind: "k", env: { ARTIFACT_BUS_PRODUCER: "lab.env" },
      artifacts: [{ name: "f", path: THREE }] });
    assert.equal(event.producer, "lab.env");
  });
});

describe("reasons", () => {
  it("is the contract's closed set", () => {
    assert.deepEqual([...REASONS].sort(), ["checksum_mismatch", "event_id_conflict", "file_missing",
      "file_unreadable", "malformed", "not_parquet", "path_outside_roots", "poison", "producer_mismatch",
      "rows_mismatch", "schema", "size_mismatch", "too_large", "unsupported_version"]);
    assert.ok(isReason("rows_mismatch"));
    assert.ok(!isReason("timeout"));
  });
});

describe("configuration", () => {
  it("reads NATS_URL, ARTIFACT_BUS_MODE and ARTIFACT_BUS_OUTBOX; a call's options win", () => {
    const env = { NATS_URL: "nats://a:1,nats://b:2", ARTIFACT_BUS_MODE: "best_effort", ARTIFACT_BUS_OUTBOX: "/o",
      ARTIFACT_BUS_CONNECT_TIMEOUT_MS: "1500" };
    assert.deepEqual(resolveBus({ env }).servers, ["nats://a:1", "nats://b:2"]);
    assert.equal(resolveBus({ env }).connectTimeoutMs, 1500);
    assert.equal(resolveBus({ env: {} }).url, "nats://127.0.0.1:4222");
    assert.equal(resolveBus({ env, servers: "nats://c:3" }).url, "nats://c:3");
    assert.equal(resolveMode({ env }).mode, "best_effort");
    assert.equal(resolveMode({ env }).outbox, "/o");
    assert.equal(resolveMode({ env, mode: "required" }).mode, "required");
    assert.equal(resolveMode({ env: {} }).mode, "required");
    assert.throws(() => resolveMode({ env: { ARTIFACT_BUS_MODE: "maybe" } }),
      (e: Error) => e instanceof ArtifactBusConfigError && /ARTIFACT_BUS_MODE=maybe/.test(e.message));
    assert.throws(() => resolveMode({ env: {}, mode: "best_effort" }), /ARTIFACT_BUS_OUTBOX/);
    assert.throws(() => resolveBus({ env: { ARTIFACT_BUS_CONNECT_TIMEOUT_MS: "soon" } }), /ARTIFACT_BUS_CONNECT_TIMEOUT_MS/);
  });

  it("checks a traceparent as busd reads it", () => {
    const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert.equal(checkTraceparent(undefined), undefined);
    assert.equal(checkTraceparent(" "), undefined);
    assert.equal(checkTraceparent(` ${tp} `), tp);
    assert.equal(checkTraceparent(`cc${tp.slice(2)}-later`), `cc${tp.slice(2)}-later`);
    for (const bad of [tp.toUpperCase(), `ff${tp.slice(2)}`, `${tp}-x`, `00-${"0".repeat(32)}-00f067aa0ba902b7-01`]) {
      assert.throws(() => checkTraceparent(bad), (e: Error) => e instanceof ArtifactBusConfigError && /W3C/.test(e.message));
    }
  });

  it("takes an inbox prefix from the options or ARTIFACT_BUS_INBOX_PREFIX, and checks it", () => {
    const env = { ARTIFACT_BUS_INBOX_PREFIX: "_INBOX_lab-simulation" };
    assert.equal(resolveBus({ env: {} }).inboxPrefix, undefined);
    assert.equal(resolveBus({ env }).inboxPrefix, "_INBOX_lab-simulation");
    assert.equal(resolveBus({ env, inboxPrefix: "_INBOX_other" }).inboxPrefix, "_INBOX_other");
    assert.throws(() => resolveBus({ env: {}, inboxPrefix: "_INBOX.>" }),
      (e: Error) => e instanceof ArtifactBusConfigError && /inboxPrefix "_INBOX\.>"/.test(e.message));
    assert.throws(() => resolveBus({ env: { ARTIFACT_BUS_INBOX_PREFIX: "a b" } }), /ARTIFACT_BUS_INBOX_PREFIX/);
  });
});

describe("NATS unreachable", () => {
  it("required mode throws within the connect timeout, naming the URL (refused)", async () => {
    const url = `nats://127.0.0.1:${await closedPort()}`;
    const r = await timed(submitArtifact({ runId: "r1", kind: "k", producer: "lab.ts", name: "f", path: THREE,
      servers: url, connectTimeoutMs: 2000, mode: "required", env: {} }));
    assert.ok(r.error instanceof BusUnavailableError, String(r.error));
    assert.match((r.error as Error).message, new RegExp(`cannot reach NATS at ${url}`));
    assert.equal((r.error as BusUnavailableError).url, url);
    assert.ok(r.seconds < 3, `took ${r.seconds}s`);
  });

  it("required mode throws within the connect timeout when the server never answers", async () => {
    const silent = await silentServer();
    try {
      const r = await timed(submitArtifacts({ runId: "r1", kind: "k", producer: "lab.ts", artifacts: [{ name: "f", path: THREE }],
        servers: silent.url, connectTimeoutMs: 1500, env: {} }));
      assert.ok(r.error instanceof BusUnavailableError, String(r.error));
      assert.match((r.error as Error).message, new RegExp(silent.url));
      assert.ok(r.seconds >= 1.4 && r.seconds < 3.5, `took ${r.seconds}s`);
      const w = await timed(waitForCommit({ seq: 1, servers: silent.url, connectTimeoutMs: 1000, env: {} }));
      assert.ok(w.error instanceof BusUnavailableError && w.seconds < 2.5, String(w.error));
    } finally {
      await silent.close();
    }
  });

  it("best_effort keeps the event in the outbox (busd's format) and returns normally", async () => {
    const silent = await silentServer();
    const outbox = path.join(await scratch(), "outbox");
    const lines: string[] = [];
    try {
      const r = await timed(submitArtifacts({ runId: "r2", kind: "k", producer: "lab.ts",
        artifacts: [{ name: "f", path: THREE }, { name: "g", path: FIVE }], waitForCommit: true,
        env: { NATS_URL: silent.url, ARTIFACT_BUS_MODE: "best_effort", ARTIFACT_BUS_OUTBOX: outbox,
          ARTIFACT_BUS_CONNECT_TIMEOUT_MS: "1000" }, log: (l) => lines.push(l) }));
      assert.equal(r.error, undefined);
      assert.ok(r.seconds < 2.5, `took ${r.seconds}s`);
      const result = r.value!;
      assert.equal(result.state, "outbox");
      if (result.state !== "outbox") return;
      assert.match(result.error, new RegExp(`cannot reach NATS at ${silent.url}`));
      assert.match(lines.join("\n"), /kept in the outbox/);
      const files = await listOutbox(outbox);
      assert.deepEqual(files, [result.path]);
      assert.match(path.basename(result.path), /^\d{20}-r2_[0-9a-f]{16}\.json$/);
      const raw = JSON.parse(await readFile(result.path, "utf8"));
      assert.deepEqual(Object.keys(raw), ["subject", "headers", "payload"]);
      assert.equal(raw.subject, "artifacts.lab.ts");
      assert.deepEqual(raw.headers, { "Nats-Msg-Id": result.eventId });
      const event = JSON.parse(raw.payload);
      assert.equal(event.event_id, result.eventId);
      assert.deepEqual(event.artifacts.map((a: { name: string; rows: number }) => [a.name, a.rows]), [["f", 3], ["g", 5]]);
      assert.deepEqual(await readOutbox(result.path), raw);
      assert.deepEqual((await readdir(outbox)).filter((n) => n.startsWith(".")), [], "no temporary file left");
      // flushing while NATS is still away: a clear error, and the event stays
      await assert.rejects(flushOutbox(outbox, { servers: silent.url, connectTimeoutMs: 500, env: {} }), BusUnavailableError);
      assert.deepEqual(await listOutbox(outbox), files);
    } finally {
      await silent.close();
    }
  });

  it("an empty or absent outbox flushes nothing without connecting", async () => {
    const dir = await scratch();
    assert.deepEqual(await flushOutbox(path.join(dir, "none"), { servers: "nats://127.0.0.1:1", env: {} }), { sent: 0, seqs: [], duplicates: 0 });
  });

  it("best_effort never hides a bad event in the outbox", async () => {
    const outbox = path.join(await scratch(), "outbox");
    await assert.rejects(submitArtifact({ runId: "bad id", kind: "k", producer: "lab.ts", name: "f", path: THREE,
      mode: "best_effort", outbox, servers: "nats://127.0.0.1:1", env: {} }), InvalidEventError);
    assert.deepEqual(await listOutbox(outbox), []);
  });
});
