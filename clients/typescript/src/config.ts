/** Options shared by every call, with their environment fallbacks. */

import { ArtifactBusConfigError } from "./errors.js";

export type Mode = "best_effort" | "required";

export const MODES: readonly Mode[] = ["best_effort", "required"];

export const DEFAULT_URL = "nats://127.0.0.1:4222";
export const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
export const DEFAULT_PUBLISH_TIMEOUT_MS = 10_000;
export const DEFAULT_COMMIT_TIMEOUT_MS = 60_000;

/** How to reach the bus. Every field falls back to an environment variable, then a default. */
export interface BusOptions {
  /** NATS server URL(s): "nats://a:4222" or "nats://a:4222,nats://b:4222" or a list.
   *  Env `NATS_URL`; default nats://127.0.0.1:4222 (busd's embedded server). */
  servers?: string | string[];
  /** Give up connecting after this long (env `ARTIFACT_BUS_CONNECT_TIMEOUT_MS`; 5000). */
  connectTimeoutMs?: number;
  /** Wait this long for the PubAck (env `ARTIFACT_BUS_PUBLISH_TIMEOUT_MS`; 10000). */
  publishTimeoutMs?: number;
  /** busd's durable consumer name, which names its request API (env `ARTIFACT_BUS_CONSUMER`;
   *  "busd", as `nats.consumer`). */
  consumer?: string;
  /** NATS user/password or token, when the server asks for them
   *  (env `NATS_USER`, `NATS_PASSWORD`, `NATS_TOKEN`). */
  user?: string;
  password?: string;
  token?: string;
  /** The prefix of this connection's inboxes, where PubAcks and busd's answers arrive (env
   *  `ARTIFACT_BUS_INBOX_PREFIX`; default `_INBOX`). With busd's shipped NATS permissions a
   *  producer may only subscribe to its own `_INBOX_<user>.>`: set `_INBOX_<user>`. */
  inboxPrefix?: string;
  /** Where to read the environment from (default `process.env`); for tests. */
  env?: Record<string, string | undefined>;
}

/** How a submit behaves when the bus is away. */
export interface ModeOptions {
  /** `required` (default): throw BusUnavailableError naming the URL. `best_effort`: keep the
   *  event in the outbox folder and return normally. Env `ARTIFACT_BUS_MODE`. */
  mode?: Mode;
  /** The outbox folder for `best_effort` (env `ARTIFACT_BUS_OUTBOX`). */
  outbox?: string;
  /** Where `best_effort` reports that it kept an event (default: one line on stderr). */
  log?: (line: string) => void;
}

export interface ResolvedBus {
  servers: string[];
  url: string;
  connectTimeoutMs: number;
  publishTimeoutMs: number;
  consumer: string;
  user?: string;
  password?: string;
  token?: string;
  inboxPrefix?: string;
}

export interface ResolvedMode {
  mode: Mode;
  outbox?: string;
  log: (line: string) => void;
}

function envOf(opts: { env?: Record<string, string | undefined> }): Record<string, string | undefined> {
  return opts.env ?? process.env;
}

function nonEmpty(value: string | undefined): string | undefined {
  return value === undefined || value.trim() === "" ? undefined : value.trim();
}

function positiveMs(value: number | undefined, env: string | undefined, name: string, envName: string,
                    fallback: number): number {
  if (value !== undefined) {
    if (!Number.isFinite(value) || value <= 0) {
      throw new ArtifactBusConfigError(`${name}: expected milliseconds > 0, got ${value}`);
    }
    return value;
  }
  const text = nonEmpty(env);
  if (text === undefined) return fallback;
  const parsed = Number(text);
  if (!Number.isFinite(parsed) || parsed <= 0) {
    throw new ArtifactBusConfigError(`${envName}=${text}: expected milliseconds > 0`);
  }
  return parsed;
}

export function resolveBus(opts: BusOptions = {}): ResolvedBus {
  const env = envOf(opts);
  let servers: string[];
  if (opts.servers !== undefined) {
    servers = (Array.isArray(opts.servers) ? opts.servers : opts.servers.split(","))
      .map((s) => s.trim()).filter(Boolean);
    if (servers.length === 0) throw new ArtifactBusConfigError("servers: no NATS URL given");
  } else {
    servers = (nonEmpty(env.NATS_URL) ?? DEFAULT_URL).split(",").map((s) => s.trim()).filter(Boolean);
  }
  const consumer = opts.consumer ?? nonEmpty(env.ARTIFACT_BUS_CONSUMER) ?? "busd";
  if (!/^[A-Za-z0-9_-]+$/.test(consumer)) {
    throw new ArtifactBusConfigError(`consumer ${JSON.stringify(consumer)}: not a consumer name`);
  }
  const out: ResolvedBus = {
    servers,
    url: servers.join(","),
    connectTimeoutMs: positiveMs(opts.connectTimeoutMs, env.ARTIFACT_BUS_CONNECT_TIMEOUT_MS,
      "connectTimeoutMs", "ARTIFACT_BUS_CONNECT_TIMEOUT_MS", DEFAULT_CONNECT_TIMEOUT_MS),
    publishTimeoutMs: positiveMs(opts.publishTimeoutMs, env.ARTIFACT_BUS_PUBLISH_TIMEOUT_MS,
      "publishTimeoutMs", "ARTIFACT_BUS_PUBLISH_TIMEOUT_MS", DEFAULT_PUBLISH_TIMEOUT_MS),
    consumer,
  };
  const user = opts.user ?? nonEmpty(env.NATS_USER);
  const password = opts.password ?? env.NATS_PASSWORD;
  const token = opts.token ?? env.NATS_TOKEN;
  if (user !== undefined) out.user = user;
  if (password !== undefined && password !== "") out.password = password;
  if (token !== undefined && token !== "") out.token = token;
  const inboxPrefix = opts.inboxPrefix ?? nonEmpty(env.ARTIFACT_BUS_INBOX_PREFIX);
  if (inboxPrefix !== undefined) {
    if (!SUBJECT_PREFIX.test(inboxPrefix)) {
      const named = opts.inboxPrefix !== undefined ? "inboxPrefix" : "ARTIFACT_BUS_INBOX_PREFIX";
      throw new ArtifactBusConfigError(
        `${named} ${JSON.stringify(inboxPrefix)}: not a subject prefix (tokens of letters, digits, _, - and $, no wildcards)`);
    }
    out.inboxPrefix = inboxPrefix;
  }
  return out;
}

/** A subject prefix without wildcards, as busd's own `nats.inbox_prefix` is checked. */
const SUBJECT_PREFIX = /^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$/;

export function resolveMode(opts: ModeOptions & { env?: Record<string, string | undefined> } = {}): ResolvedMode {
  const env = envOf(opts);
  let mode: Mode;
  if (opts.mode !== undefined) {
    if (!MODES.includes(opts.mode)) {
      throw new ArtifactBusConfigError(`mode ${JSON.stringify(opts.mode)}: expected "best_effort" or "required"`);
    }
    mode = opts.mode;
  } else {
    const text = nonEmpty(env.ARTIFACT_BUS_MODE);
    const normal = text?.toLowerCase().replace("-", "_");
    if (text === undefined) mode = "required";
    else if (normal === "best_effort" || normal === "required") mode = normal;
    else throw new ArtifactBusConfigError(`ARTIFACT_BUS_MODE=${text}: expected best_effort or required`);
  }
  const outbox = opts.outbox ?? nonEmpty(env.ARTIFACT_BUS_OUTBOX);
  if (mode === "best_effort" && outbox === undefined) {
    throw new ArtifactBusConfigError(
      "best_effort mode needs an outbox folder: pass `outbox` or set ARTIFACT_BUS_OUTBOX");
  }
  const out: ResolvedMode = {
    mode,
    log: opts.log ?? ((line: string) => void process.stderr.write(`${line}\n`)),
  };
  if (outbox !== undefined) out.outbox = outbox;
  return out;
}
