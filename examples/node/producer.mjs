#!/usr/bin/env node
// Publish one busd artifact event from Node.js with the official `nats` client (v2).
//
//   NATS_URL=nats://127.0.0.1:4222 node producer.mjs --run-id sim-42 --kind simulation \
//       [--producer lab.node] [--status succeeded] [--event-id ID] [--rows fills=1042] \
//       [--root DIR] fills=runs/sim-42/fills.parquet positions=/abs/path/positions.parquet
//
// RUN_ID, RUN_KIND, PRODUCER and ARTIFACT_ROOT stand in for the options. Each NAME=PATH names
// one Parquet file the job wrote; its size and SHA-256 go into the event (busd checks both).
// A relative PATH is read from --root / $ARTIFACT_ROOT when given and sent relative (busd
// resolves it against its first artifact root, which should be the same directory); without
// a root it is made absolute from the current directory.
//
// The event goes to subject artifacts.<producer> with Nats-Msg-Id = event_id (JetStream drops
// a re-publish inside the duplicate window) and we wait for the PubAck: exit 0 means stored.
// Exit codes: 0 stored (prints {"seq", "event_id", "duplicate"}), 1 failed, 2 bad usage.

import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import path from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";

import { connect } from "nats";

const IDENT = /^[A-Za-z0-9._:/-]{1,200}$/;
const PRODUCER = /^[A-Za-z0-9_:/-]+(\.[A-Za-z0-9_:/-]+)*$/; // dot-separated subject tokens
const MAX_ARTIFACTS = 1000;

class UsageError extends Error {}

function need(what, value) {
  if (typeof value !== "string" || !IDENT.test(value)) {
    throw new UsageError(`${what} ${JSON.stringify(value)}: 1-200 characters of A-Z a-z 0-9 . _ : / -`);
  }
  return value;
}

function parse(argv, env) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      "run-id": { type: "string", default: env.RUN_ID },
      kind: { type: "string", default: env.RUN_KIND },
      producer: { type: "string", default: env.PRODUCER ?? "examples.node" },
      status: { type: "string", default: "succeeded" },
      "event-id": { type: "string" },
      rows: { type: "string", multiple: true, default: [] },
      root: { type: "string", default: env.ARTIFACT_ROOT },
      server: { type: "string", default: env.NATS_URL ?? "nats://127.0.0.1:4222" },
      timeout: { type: "string", default: "10000" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) throw new UsageError("help");
  const producer = values.producer;
  if (!PRODUCER.test(producer) || producer.length > 200) {
    throw new UsageError(`producer ${JSON.stringify(producer)}: dot-separated tokens of A-Z a-z 0-9 _ : / -`);
  }
  const rows = new Map();
  for (const item of values.rows) {
    const m = /^([^=]+)=(\d+)$/.exec(item);
    if (!m) throw new UsageError(`--rows ${item}: expected NAME=N`);
    rows.set(m[1], Number(m[2]));
  }
  if (positionals.length === 0) throw new UsageError("no artifacts: give at least one NAME=PATH");
  if (positionals.length > MAX_ARTIFACTS) throw new UsageError(`at most ${MAX_ARTIFACTS} artifacts per event`);
  const files = new Map();
  for (const spec of positionals) {
    const at = spec.indexOf("=");
    if (at <= 0 || at === spec.length - 1) throw new UsageError(`argument ${spec}: expected NAME=PATH`);
    const name = need("artifact name", spec.slice(0, at));
    if (files.has(name)) throw new UsageError(`artifact ${name}: named twice`);
    files.set(name, spec.slice(at + 1));
  }
  for (const name of rows.keys()) {
    if (!files.has(name)) throw new UsageError(`--rows ${name}: no such artifact`);
  }
  if (values.status.length > 200 || /[\u0000-\u001f]/.test(values.status)) {
    throw new UsageError("--status: at most 200 characters, no control characters");
  }
  const timeout = Number(values.timeout);
  if (!Number.isFinite(timeout) || timeout <= 0) throw new UsageError("--timeout: milliseconds > 0");
  return {
    runId: need("run id (--run-id or RUN_ID)", values["run-id"]),
    kind: need("kind (--kind or RUN_KIND)", values.kind),
    producer,
    status: values.status,
    eventId: values["event-id"],
    rows,
    root: values.root,
    servers: values.server.split(",").filter(Boolean),
    timeout,
    files,
  };
}

// Size and SHA-256 of the bytes actually read, so the two always describe the same content.
async function describe(name, given, root, rows) {
  let file = given;
  let sent = given;
  if (!path.isAbsolute(given)) {
    file = root ? path.join(root, given) : path.resolve(given);
    if (!root) sent = file;
  }
  const info = await stat(file).catch((err) => {
    throw new UsageError(`artifact ${name}: cannot read ${file}: ${err.code ?? err.message}`);
  });
  if (!info.isFile()) throw new UsageError(`artifact ${name}: not a file: ${file}`);
  const hash = createHash("sha256");
  let bytes = 0;
  for await (const chunk of createReadStream(file)) {
    hash.update(chunk);
    bytes += chunk.length;
  }
  const artifact = { name, path: sent, bytes, sha256: hash.digest("hex") };
  if (rows.has(name)) artifact.rows = rows.get(name);
  return artifact;
}

async function buildEvent(opts) {
  const artifacts = [];
  for (const [name, given] of opts.files) {
    artifacts.push(await describe(name, given, opts.root, opts.rows));
  }
  // Stable for the same files (as busd's own producer does), so a retry is a duplicate.
  const fingerprint = artifacts.map((a) => `${a.name}=${a.sha256};`).join("");
  const eventId = opts.eventId ?? `${opts.runId}:${createHash("sha256").update(fingerprint).digest("hex").slice(0, 16)}`;
  need("event id", eventId);
  return {
    schema_version: 1,
    event_id: eventId,
    producer: opts.producer,
    run: {
      run_id: opts.runId,
      kind: opts.kind,
      status: opts.status,
      finished_at: new Date().toISOString(),
    },
    artifacts,
  };
}

async function main() {
  const opts = parse(process.argv.slice(2), process.env);
  const event = await buildEvent(opts);
  const subject = `artifacts.${opts.producer}`;
  const nc = await connect({ servers: opts.servers, name: "busd-example-node", timeout: opts.timeout });
  try {
    const js = nc.jetstream();
    const data = new TextEncoder().encode(JSON.stringify(event));
    // msgID sets the Nats-Msg-Id header; publish resolves with the PubAck once stored.
    const ack = await js.publish(subject, data, { msgID: event.event_id, timeout: opts.timeout });
    process.stdout.write(
      `${JSON.stringify({ seq: ack.seq, stream: ack.stream, event_id: event.event_id, duplicate: ack.duplicate })}\n`,
    );
  } finally {
    await nc.close();
  }
}

main().catch((err) => {
  if (err instanceof UsageError) {
    if (err.message !== "help") process.stderr.write(`producer: ${err.message}\n`);
    process.stderr.write(
      "usage: node producer.mjs --run-id ID --kind KIND [--producer NAME] [--status S] " +
        "[--event-id ID] [--rows NAME=N ...] [--root DIR] [--server URL] NAME=PATH ...\n",
    );
    process.exitCode = 2;
  } else if (err?.code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" || err?.code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") {
    process.stderr.write(`producer: ${err.message}\n`);
    process.exitCode = 2;
  } else {
    process.stderr.write(`producer: publish failed: ${err?.message ?? err}\n`);
    process.exitCode = 1;
  }
});
