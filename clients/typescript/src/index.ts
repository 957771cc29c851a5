/**
 * artifact-bus: publish busd artifact events from TypeScript.
 *
 *   const result = await submitArtifacts({ runId, kind, producer, artifacts: [{ name, path }],
 *                                          waitForCommit: true });
 *
 * See README.md for the modes (best_effort / required), the outbox and the environment.
 */

export {
  type CommitOutcome,
  type FlushResult,
  type SubmitOptions,
  type SubmitResult,
  checkTraceparent,
  flushOutbox,
  openConnection,
  publishEvent,
  submitArtifact,
  submitArtifacts,
  waitForCommit,
} from "./client.js";
export {
  type BusOptions,
  type Mode,
  type ModeOptions,
  DEFAULT_URL,
  MODES,
  resolveBus,
  resolveMode,
} from "./config.js";
export {
  ArtifactBusConfigError,
  ArtifactBusError,
  BusUnavailableError,
  CommitTimeoutError,
  InvalidEventError,
} from "./errors.js";
export {
  type Artifact,
  type ArtifactEvent,
  type ArtifactFile,
  type BuildOptions,
  type Run,
  type RunOptions,
  MAX_ARTIFACTS,
  SCHEMA_VERSION,
  buildEvent,
  checkEvent,
  defaultEventId,
  describeArtifact,
  encodeEvent,
} from "./event.js";
export { type OutboxEntry, listOutbox, readOutbox, writeOutbox } from "./outbox.js";
export { OUTCOMES, type Outcome, REASONS, type Reason, isOutcome, isReason } from "./reasons.js";
