/** Within busd's shipped NATS permissions (ops/nats/nats-server.conf, started by
 *  tests/test_typescript_client.py): a producer may subscribe only to its own `_INBOX_<user>.>`,
 *  so its PubAck arrives only with `inboxPrefix` set. */

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { submitArtifact } from "../src/index.js";
import { FIXTURES } from "./helpers.js";

const url = process.env.ARTIFACT_BUS_TEST_PERMS_URL;
const password = process.env.ARTIFACT_BUS_TEST_PERMS_PASSWORD;
const SKIP = url && password ? false : "needs the shipped nats-server: run through tests/test_typescript_client.py";

const job = (runId: string, inboxPrefix?: string) => submitArtifact({
  runId, kind: "simulation", producer: "lab.simulation", name: "three", path: "three.parquet",
  root: FIXTURES, servers: url!, user: "lab-simulation", password: password!,
  connectTimeoutMs: 5000, publishTimeoutMs: 3000, env: {},
  ...(inboxPrefix === undefined ? {} : { inboxPrefix }),
});

describe("the shipped permissions", { skip: SKIP }, () => {
  it("store the event of a producer that uses its own inbox prefix", async () => {
    const r = await job("perms-own-inbox", "_INBOX_lab-simulation");
    assert.equal(r.state, "stored", JSON.stringify(r));
    assert.ok(r.state === "stored" && r.seq > 0);
  });

  it("never give a producer on the common _INBOX its PubAck", async () => {
    await assert.rejects(job("perms-common-inbox"), /publish to artifacts\.lab\.simulation .* failed/);
  });
});
