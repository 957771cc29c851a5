/** Build and check artifact events (schema version 1) the way busd's Python producer does. */

import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import path from "node:path";

import { asyncBufferFromFile, parquetMetadataAsync } from "hyparquet";

import { InvalidEventError } from "./errors.js";
import type { Artifact, ArtifactEvent, Run } from "./event.generated.js";

export type { Artifact, ArtifactEvent, Run } from "./event.generated.js";

export const SCHEMA_VERSION = 1;
export const MAX_ARTIFACTS = 1000;
export const MAX_PAYLOAD_BYTES = 1024 * 1024;
const IDENT = /^[A-Za-z0-9._:/-]{1,200}$/;
/** A producer names the subject `artifacts.<producer>`: dot-separated, no empty token. */
const PRODUCER = /^[A-Za-z0-9_:/-]+(\.[A-Za-z0-9_:/-]+)*$/;
const SHA256 = /^[0-9a-f]{64}$/;
/** Footer reads start with this many bytes from the end (more is read if the footer is bigger). */
const FOOTER_FETCH_BYTES = 64 * 1024;

/** One file a job wrote. */
export interface ArtifactFile {
  /** The artifact's name (unique within the event): `fills`, `positions`, … */
  name: string;
  /** The Parquet file. A relative path is read from `root` when given and sent as written
   *  (busd resolves it against its first artifact root); otherwise it is made absolute. */
  path: string;
  /** Free JSON object kept with the artifact. */
  meta?: Record<string, unknown>;
}

/** The run an event describes. */
export interface RunOptions {
  runId: string;
  kind: string;
  /** Default "succeeded" (as `busd submit`); null leaves it out. */
  status?: string | null;
  startedAt?: Date | string;
  finishedAt?: Date | string;
  params?: Record<string, unknown>;
  codeVersion?: string;
  parentRunId?: string;
}

export interface BuildOptions extends RunOptions {
  /** The producer (subject `artifacts.<producer>`); env `ARTIFACT_BUS_PRODUCER`. */
  producer?: string;
  /** Default `<runId>:<16 hex>` from the artifacts' names and SHA-256, as busd's Python
   *  producer computes it: the same files give the same id, so a retry is a duplicate. */
  eventId?: string;
  /** Folder relative artifact paths are read from (env `ARTIFACT_ROOT`). */
  root?: string;
  env?: Record<string, string | undefined>;
}

/** Size, SHA-256 and Parquet row count of one file, as busd will check them. */
export async function describeArtifact(file: ArtifactFile, root?: string): Promise<Artifact> {
  const given = file.path;
  if (typeof given !== "string" || given === "") {
    throw new InvalidEventError(`artifact ${file.name}: no path`);
  }
  let local = given;
  let sent = given;
  if (!path.isAbsolute(given)) {
    if (root !== undefined) {
      local = path.join(root, given);
    } else {
      local = path.resolve(given);
      sent = local;
    }
  }
  const info = await stat(local).catch((err: NodeJS.ErrnoException) => {
    throw new InvalidEventError(`artifact ${file.name}: cannot read ${local}: ${err.code ?? err.message}`);
  });
  if (!info.isFile()) throw new InvalidEventError(`artifact ${file.name}: not a file: ${local}`);
  // size and digest of the bytes actually read, so they always describe the same content
  const hash = createHash("sha256");
  let bytes = 0;
  try {
    for await (const chunk of createReadStream(local)) {
      hash.update(chunk as Buffer);
      bytes += (chunk as Buffer).length;
    }
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new InvalidEventError(`artifact ${file.name}: cannot read ${local}: ${e.code ?? e.message}`);
  }
  let rows: number;
  try {
    const metadata = await parquetMetadataAsync(await asyncBufferFromFile(local),
      { initialFetchSize: FOOTER_FETCH_BYTES });
    rows = Number(metadata.num_rows);
  } catch (err) {
    throw new InvalidEventError(
      `artifact ${file.name}: ${local} is not a Parquet file (${(err as Error).message ?? err})`);
  }
  const artifact: Artifact = { name: file.name, path: sent, rows, bytes, sha256: hash.digest("hex") };
  if (file.meta !== undefined) artifact.meta = file.meta;
  return artifact;
}

/** The default event id: `<runId>:` and the first 16 hex digits of the SHA-256 of
 *  `name=sha256;` for each artifact in order (busd/producer.py `build_event`). */
export function defaultEventId(runId: string, artifacts: readonly Artifact[]): string {
  const fingerprint = artifacts.map((a) => `${a.name}=${a.sha256 ?? ""};`).join("");
  return `${runId}:${createHash("sha256").update(fingerprint).digest("hex").slice(0, 16)}`;
}

function timestamp(value: Date | string | undefined, what: string): string | undefined {
  if (value === undefined) return undefined;
  if (value instanceof Date) {
    if (Number.isNaN(value.getTime())) throw new InvalidEventError(`${what}: invalid date`);
    return value.toISOString();
  }
  return value;
}

/** Names, count and identifiers checked before any file is read. */
export function checkFiles(files: readonly ArtifactFile[]): void {
  if (!Array.isArray(files) || files.length === 0) {
    throw new InvalidEventError("an event names 1 to 1000 artifacts: none given");
  }
  if (files.length > MAX_ARTIFACTS) {
    throw new InvalidEventError(`an event names 1 to 1000 artifacts: ${files.length} given`);
  }
  const seen = new Set<string>();
  for (const f of files) {
    ident(`artifact name`, f.name);
    if (seen.has(f.name)) throw new InvalidEventError(`artifact name ${JSON.stringify(f.name)} appears twice`);
    seen.add(f.name);
  }
}

/** Build the event for files a job wrote: reads each file (size, SHA-256, Parquet rows). */
export async function buildEvent(opts: BuildOptions & { artifacts: readonly ArtifactFile[] }): Promise<ArtifactEvent> {
  const env = opts.env ?? process.env;
  const producer = opts.producer ?? env.ARTIFACT_BUS_PRODUCER;
  if (producer === undefined || producer === "") {
    throw new InvalidEventError("no producer: pass `producer` or set ARTIFACT_BUS_PRODUCER");
  }
  checkFiles(opts.artifacts);
  ident("run id", opts.runId);
  ident("kind", opts.kind);
  const root = opts.root ?? (env.ARTIFACT_ROOT || undefined);
  const artifacts: Artifact[] = [];
  for (const file of opts.artifacts) artifacts.push(await describeArtifact(file, root));
  const run: Run = { run_id: opts.runId, kind: opts.kind };
  const status = opts.status === undefined ? "succeeded" : opts.status;
  if (status !== null) run.status = status;
  const started = timestamp(opts.startedAt, "startedAt");
  const finished = timestamp(opts.finishedAt, "finishedAt");
  if (started !== undefined) run.started_at = started;
  if (finished !== undefined) run.finished_at = finished;
  if (opts.params !== undefined) run.params = opts.params;
  if (opts.codeVersion !== undefined) run.code_version = opts.codeVersion;
  if (opts.parentRunId !== undefined) run.parent_run_id = opts.parentRunId;
  const event: ArtifactEvent = {
    schema_version: SCHEMA_VERSION,
    run,
    artifacts: artifacts as [Artifact, ...Artifact[]],
    event_id: opts.eventId ?? defaultEventId(opts.runId, artifacts),
    producer,
  };
  checkEvent(event);
  return event;
}

function ident(what: string, value: unknown): void {
  if (typeof value !== "string" || !IDENT.test(value)) {
    throw new InvalidEventError(`${what} ${JSON.stringify(value)}: 1-200 characters of A-Z a-z 0-9 . _ : / -`);
  }
}

function short(what: string, value: unknown): void {
  if (value === undefined || value === null) return;
  if (typeof value !== "string" || value.length > 200) {
    throw new InvalidEventError(`${what}: a string of at most 200 characters`);
  }
}

function count(what: string, value: unknown): void {
  if (value === undefined || value === null) return;
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) {
    throw new InvalidEventError(`${what}: a whole number >= 0`);
  }
}

function object(what: string, value: unknown): void {
  if (value === undefined || value === null) return;
  if (typeof value !== "object" || Array.isArray(value)) throw new InvalidEventError(`${what}: a JSON object`);
}

/** The checks busd applies to an event's shape (contract §3); throws InvalidEventError. */
export function checkEvent(event: ArtifactEvent): void {
  if (event.schema_version !== SCHEMA_VERSION) {
    throw new InvalidEventError(`schema_version ${event.schema_version}: this client writes ${SCHEMA_VERSION}`);
  }
  if (event.event_id != null) ident("event id", event.event_id);
  if (event.producer != null) {
    ident("producer", event.producer);
    if (!PRODUCER.test(event.producer)) {
      throw new InvalidEventError(`producer ${JSON.stringify(event.producer)}: dot-separated tokens of A-Z a-z 0-9 _ : / -`);
    }
  }
  const run = event.run;
  if (typeof run !== "object" || run === null) throw new InvalidEventError("run: a JSON object");
  ident("run id", run.run_id);
  ident("kind", run.kind);
  if (run.parent_run_id != null) ident("parent run id", run.parent_run_id);
  short("status", run.status);
  short("code_version", run.code_version);
  object("params", run.params);
  const files = event.artifacts;
  checkFiles(files as unknown as ArtifactFile[]);
  for (const a of files) {
    if (typeof a.path !== "string" || a.path.length < 1 || a.path.length > 4096 || a.path.includes("\0")) {
      throw new InvalidEventError(`artifact ${a.name}: path of 1-4096 characters, no NUL`);
    }
    count(`artifact ${a.name}: rows`, a.rows);
    count(`artifact ${a.name}: bytes`, a.bytes);
    if (a.sha256 != null && !SHA256.test(a.sha256)) {
      throw new InvalidEventError(`artifact ${a.name}: sha256 must be 64 lowercase hex digits`);
    }
    object(`artifact ${a.name}: meta`, a.meta);
  }
  const size = Buffer.byteLength(encodeEvent(event));
  if (size > MAX_PAYLOAD_BYTES) {
    throw new InvalidEventError(`the event is ${size} bytes, over busd's 1 MiB limit`);
  }
}

function compact<T extends object>(pairs: [string, unknown][]): T {
  const out: Record<string, unknown> = {};
  for (const [key, value] of pairs) if (value !== undefined && value !== null) out[key] = value;
  return out as T;
}

/** The JSON payload: fields in the order busd's Python producer writes them, nulls left out,
 *  so the same event from Python and TypeScript is the same bytes. */
export function encodeEvent(event: ArtifactEvent): string {
  const r = event.run;
  const ordered = compact<ArtifactEvent>([
    ["schema_version", event.schema_version],
    ["run", compact<Run>([["run_id", r.run_id], ["kind", r.kind], ["status", r.status],
      ["started_at", r.started_at], ["finished_at", r.finished_at], ["params", r.params],
      ["code_version", r.code_version], ["parent_run_id", r.parent_run_id]])],
    ["artifacts", event.artifacts.map((a) => compact<Artifact>([["name", a.name], ["path", a.path],
      ["rows", a.rows], ["bytes", a.bytes], ["sha256", a.sha256], ["meta", a.meta]]))],
    ["event_id", event.event_id],
    ["producer", event.producer],
  ]);
  return JSON.stringify(ordered);
}
