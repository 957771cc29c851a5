/** Publishing events, waiting for busd's verdict, and flushing the outbox. */

import { unlink } from "node:fs/promises";

import { jetstream } from "@nats-io/jetstream";
import { connect, headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";

import {
  DEFAULT_COMMIT_TIMEOUT_MS,
  type BusOptions,
  type ModeOptions,
  type ResolvedBus,
  resolveBus,
  resolveMode,
} from "./config.js";
import { ArtifactBusConfigError, BusUnavailableError, CommitTimeoutError } from "./errors.js";
import {
  type ArtifactEvent,
  type ArtifactFile,
  type BuildOptions,
  buildEvent,
  checkEvent,
  encodeEvent,
} from "./event.js";
import { listOutbox, readOutbox, writeOutbox } from "./outbox.js";
import type { Reason } from "./reasons.js";

const SUBJECT_PREFIX = "artifacts";
const POLL_MS = 100;
const REQUEST_MS = 2_000;

/** busd's verdict on one stream message. */
export type CommitOutcome =
  | { outcome: "committed" | "duplicate"; seq: number; eventId?: string }
  | { outcome: "rejected"; reason: Reason; detail?: string; seq: number; eventId?: string };

/** What a submit did. */
export type SubmitResult =
  /** Stored in the stream (PubAck), not waited for. `duplicate`: JetStream already held an
   *  event with this id (a retry), and `seq` is the stored one's. */
  | { state: "stored"; seq: number; eventId: string; subject: string; duplicate: boolean;
      /** best_effort only: waitForCommit gave up; the event is stored and busd will settle it. */
      waitError?: string }
  /** Stored and settled by busd (waitForCommit). */
  | ({ state: "settled"; eventId: string; subject: string; duplicate: boolean } & CommitOutcome)
  /** best_effort only: NATS was unavailable, the event is in the outbox file `path`. */
  | { state: "outbox"; path: string; eventId: string; subject: string; error: string };

export interface SubmitOptions extends BuildOptions, BusOptions, ModeOptions {
  /** The job's W3C trace context, sent as the `traceparent` header: busd keeps it with the
   *  event's catalog rows and names it in its log lines. An invalid one throws
   *  ArtifactBusConfigError (busd would ignore it). */
  traceparent?: string;
  /** Wait until busd committed (and exported) or rejected the event. */
  waitForCommit?: boolean;
  /** How long waitForCommit waits (default 60000 ms). */
  commitTimeoutMs?: number;
}

/** Connect, failing fast: a server that refuses, or never answers, gives BusUnavailableError
 *  naming the URL within `connectTimeoutMs`; nothing is retried in the background. */
export async function openConnection(bus: ResolvedBus, name = "artifact-bus"): Promise<NatsConnection> {
  const pending = connect({
    servers: bus.servers,
    name,
    timeout: bus.connectTimeoutMs,
    reconnect: false,
    waitOnFirstConnect: false,
    ...(bus.user !== undefined ? { user: bus.user } : {}),
    ...(bus.password !== undefined ? { pass: bus.password } : {}),
    ...(bus.token !== undefined ? { token: bus.token } : {}),
    ...(bus.inboxPrefix !== undefined ? { inboxPrefix: bus.inboxPrefix } : {}),
  });
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error("no answer")), bus.connectTimeoutMs);
  });
  try {
    return await Promise.race([pending, deadline]);
  } catch (err) {
    // a connection that completes after we gave up is closed, never leaked
    pending.then((nc) => nc.close()).catch(() => undefined);
    const why = (err as Error)?.message ?? String(err);
    throw new BusUnavailableError(
      `cannot reach NATS at ${bus.url} within ${bus.connectTimeoutMs / 1000}s: ${why}`, bus.url, err);
  } finally {
    clearTimeout(timer);
  }
}

async function withConnection<T>(bus: ResolvedBus, action: (nc: NatsConnection) => Promise<T>): Promise<T> {
  const nc = await openConnection(bus);
  try {
    return await action(nc);
  } finally {
    await nc.close().catch(() => undefined);
  }
}

async function publishRaw(nc: NatsConnection, bus: ResolvedBus, subject: string, payload: string,
                          hdrs: Record<string, string>): Promise<{ seq: number; duplicate: boolean }> {
  const h = natsHeaders();
  for (const [k, v] of Object.entries(hdrs)) h.set(k, v);
  try {
    const ack = await jetstream(nc).publish(subject, new TextEncoder().encode(payload),
      { headers: h, timeout: bus.publishTimeoutMs });
    return { seq: ack.seq, duplicate: ack.duplicate };
  } catch (err) {
    const why = (err as Error)?.message ?? String(err);
    throw new BusUnavailableError(`publish to ${subject} at ${bus.url} failed: ${why}`, bus.url, err);
  }
}

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;

/** A W3C `traceparent` as busd reads it (lower-case hex; not version ff, not all-zero ids;
 *  version 00 exactly 55 characters), trimmed; undefined for none or an empty one. */
export function checkTraceparent(value: string | undefined): string | undefined {
  if (value === undefined || value.trim() === "") return undefined;
  const text = value.trim();
  const m = TRACEPARENT.exec(text);
  const ok = m !== null && m[1] !== "ff" && !/^0+$/.test(m[2]!) && !/^0+$/.test(m[3]!)
    && (m[1] !== "00" || text.length === 55);
  if (!ok) {
    throw new ArtifactBusConfigError(
      `traceparent ${JSON.stringify(value)}: not a W3C trace context (00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, lower case)`);
  }
  return text;
}

function subjectFor(event: ArtifactEvent): string {
  if (!event.producer) throw new ArtifactBusConfigError("the event names no producer");
  return `${SUBJECT_PREFIX}.${event.producer}`;
}

function settled(answer: Record<string, unknown>, seq: number): CommitOutcome {
  const eventId = typeof answer.event_id === "string" ? answer.event_id : undefined;
  const base = eventId === undefined ? { seq } : { seq, eventId };
  if (answer.outcome === "rejected") {
    const out: CommitOutcome = { outcome: "rejected", reason: answer.reason as Reason, ...base };
    if (typeof answer.detail === "string") out.detail = answer.detail;
    return out;
  }
  return { outcome: answer.outcome as "committed" | "duplicate", ...base };
}

async function pollOutcome(nc: NatsConnection, bus: ResolvedBus, seq: number, timeoutMs: number): Promise<CommitOutcome> {
  const subject = `busd.api.${bus.consumer}.outcome`;
  const deadline = Date.now() + timeoutMs;
  const body = new TextEncoder().encode(JSON.stringify({ seq }));
  for (;;) {
    let answer: Record<string, unknown> = { state: "pending" };
    try {
      const left = Math.max(1, Math.min(REQUEST_MS, deadline - Date.now()));
      const reply = await nc.request(subject, body, { timeout: left });
      answer = JSON.parse(new TextDecoder().decode(reply.data)) as Record<string, unknown>;
    } catch {
      // no busd answering yet (no responders, a timeout): keep waiting until the deadline
    }
    if (answer.state === "done") return settled(answer, seq);
    if (Date.now() >= deadline) {
      throw new CommitTimeoutError(
        `busd did not settle sequence ${seq} within ${timeoutMs / 1000}s (is busd serve running on ${bus.url}?)`, seq);
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(POLL_MS, Math.max(0, deadline - Date.now()))));
  }
}

/** Wait until busd committed, deduplicated or rejected the stream message `seq`. Throws
 *  CommitTimeoutError after `timeoutMs` (default 60000), BusUnavailableError without NATS. */
export async function waitForCommit(opts: BusOptions & { seq: number; timeoutMs?: number }): Promise<CommitOutcome> {
  const bus = resolveBus(opts);
  return withConnection(bus, (nc) => pollOutcome(nc, bus, opts.seq, opts.timeoutMs ?? DEFAULT_COMMIT_TIMEOUT_MS));
}

/** Publish a built event (see `buildEvent`), with the modes and the wait of `submitArtifacts`. */
export async function publishEvent(event: ArtifactEvent,
                                   opts: BusOptions & ModeOptions & { waitForCommit?: boolean; commitTimeoutMs?: number; traceparent?: string } = {}):
  Promise<SubmitResult> {
  checkEvent(event);
  const bus = resolveBus(opts);
  const mode = resolveMode(opts);
  const subject = subjectFor(event);
  const payload = encodeEvent(event);
  const eventId = event.event_id ?? "";
  const hdrs: Record<string, string> = eventId ? { "Nats-Msg-Id": eventId } : {};
  const traceparent = checkTraceparent(opts.traceparent);
  if (traceparent !== undefined) hdrs.traceparent = traceparent;
  let nc: NatsConnection | undefined;
  let stored: { seq: number; duplicate: boolean };
  try {
    nc = await openConnection(bus);
    stored = await publishRaw(nc, bus, subject, payload, hdrs);
  } catch (err) {
    if (nc !== undefined) await nc.close().catch(() => undefined);
    if (!(err instanceof BusUnavailableError) || mode.mode === "required" || mode.outbox === undefined) throw err;
    const file = await writeOutbox(mode.outbox, { subject, headers: hdrs, payload });
    mode.log(`artifact-bus: ${err.message}; event ${eventId} kept in the outbox ${file}`);
    return { state: "outbox", path: file, eventId, subject, error: err.message };
  }
  try {
    const base = { eventId, subject, duplicate: stored.duplicate };
    if (!opts.waitForCommit) return { state: "stored", seq: stored.seq, ...base };
    try {
      const outcome = await pollOutcome(nc, bus, stored.seq, opts.commitTimeoutMs ?? DEFAULT_COMMIT_TIMEOUT_MS);
      return { state: "settled", ...base, ...outcome };
    } catch (err) {
      if (!(err instanceof CommitTimeoutError) || mode.mode === "required") throw err;
      mode.log(`artifact-bus: ${err.message}; event ${eventId} is stored as sequence ${stored.seq}`);
      return { state: "stored", seq: stored.seq, ...base, waitError: err.message };
    }
  } finally {
    await nc.close().catch(() => undefined);
  }
}

/** One event for the files a job wrote (1 to 1000): all of them are committed, or none.
 *  Computes each file's size, SHA-256 and Parquet row count, publishes to
 *  `artifacts.<producer>` with `Nats-Msg-Id` = the event id and waits for the PubAck. */
export async function submitArtifacts(opts: SubmitOptions & { artifacts: readonly ArtifactFile[] }): Promise<SubmitResult> {
  // options are checked before the files are read: a bad mode fails at once
  resolveBus(opts);
  resolveMode(opts);
  const event = await buildEvent(opts);
  return publishEvent(event, opts);
}

/** `submitArtifacts` for a job that wrote one file. */
export async function submitArtifact(opts: SubmitOptions & ArtifactFile): Promise<SubmitResult> {
  const { name, path, meta, ...rest } = opts;
  const file: ArtifactFile = meta === undefined ? { name, path } : { name, path, meta };
  return submitArtifacts({ ...rest, artifacts: [file] });
}

export interface FlushResult {
  /** Events stored by this flush (one per outbox file sent). */
  sent: number;
  /** Their stream sequences, oldest first. */
  seqs: number[];
  /** How many JetStream already held (sent before, e.g. by a flush killed after the PubAck). */
  duplicates: number;
}

/** Send the events kept in `dir`, oldest first; each file is removed only after its PubAck.
 *  Also sends what `busd submit --outbox DIR` wrote. Throws BusUnavailableError (naming the
 *  URL) when NATS is still away; what was sent by then is gone from the folder. */
export async function flushOutbox(dir: string, opts: BusOptions = {}): Promise<FlushResult> {
  const bus = resolveBus(opts);
  const files = await listOutbox(dir);
  const out: FlushResult = { sent: 0, seqs: [], duplicates: 0 };
  if (files.length === 0) return out;
  await withConnection(bus, async (nc) => {
    for (const file of files) {
      const entry = await readOutbox(file);
      const ack = await publishRaw(nc, bus, entry.subject, entry.payload, entry.headers);
      await unlink(file);
      out.sent += 1;
      out.seqs.push(ack.seq);
      if (ack.duplicate) out.duplicates += 1;
    }
  });
  return out;
}
