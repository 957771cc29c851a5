/**
 * The on-disk outbox: events kept while NATS was unreachable, in the same format as busd's
 * Python producer (busd/producer.py `to_outbox`), so `busd outbox flush DIR` sends what this
 * package wrote and `flushOutbox(DIR)` sends what `busd submit --outbox DIR` wrote.
 *
 * One file per event, `<20-digit epoch nanoseconds>-<event id, sanitized>.json`, holding
 * `{"subject": ..., "headers": {"Nats-Msg-Id": ...}, "payload": "<the event's JSON>"}`,
 * written atomically (temporary file, fsync, rename, fsync of the folder). Names sort in
 * submission order; a flush sends oldest first and removes a file only after its PubAck.
 */

import { mkdir, open, readFile, readdir, rename, unlink } from "node:fs/promises";
import path from "node:path";

import { ArtifactBusError } from "./errors.js";

export interface OutboxEntry {
  subject: string;
  headers: Record<string, string>;
  payload: string;
}

const START_MS = BigInt(Date.now());
const START_HR = process.hrtime.bigint();
let lastNs = 0n;

/** Epoch nanoseconds, strictly increasing within this process. */
function nowNs(): bigint {
  let ns = START_MS * 1_000_000n + (process.hrtime.bigint() - START_HR);
  if (ns <= lastNs) ns = lastNs + 1n;
  lastNs = ns;
  return ns;
}

function safeName(msgId: string): string {
  const safe = [...msgId].map((c) => (/^[A-Za-z0-9._-]$/.test(c) ? c : "_")).join("");
  return safe.slice(0, 80) || "event";
}

async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Keep one event in `dir`; returns the file's path. */
export async function writeOutbox(dir: string, entry: OutboxEntry): Promise<string> {
  await mkdir(dir, { recursive: true });
  const name = `${nowNs().toString().padStart(20, "0")}-${safeName(entry.headers["Nats-Msg-Id"] ?? "")}.json`;
  const file = path.join(dir, name);
  const tmp = path.join(dir, `.${name}.tmp-${process.pid}`);
  const body = JSON.stringify({ subject: entry.subject, headers: entry.headers, payload: entry.payload });
  try {
    const handle = await open(tmp, "w");
    try {
      await handle.writeFile(body);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(tmp, file);
    await fsyncDir(dir);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw new ArtifactBusError(`cannot keep the event in the outbox ${dir}: ${(err as Error).message}`);
  }
  return file;
}

/** The outbox's files, oldest first (an absent folder is an empty outbox). */
export async function listOutbox(dir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
  return names.filter((n) => n.endsWith(".json") && !n.startsWith(".")).sort().map((n) => path.join(dir, n));
}

export async function readOutbox(file: string): Promise<OutboxEntry> {
  const raw = JSON.parse(await readFile(file, "utf8")) as Partial<OutboxEntry>;
  if (typeof raw.subject !== "string" || typeof raw.payload !== "string" ||
      typeof raw.headers !== "object" || raw.headers === null) {
    throw new ArtifactBusError(`${file}: not an outbox entry (subject, headers, payload)`);
  }
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(raw.headers)) headers[k] = String(v);
  return { subject: raw.subject, headers, payload: raw.payload };
}
