/** Errors thrown by artifact-bus; each message is one line a job can log as is. */

export class ArtifactBusError extends Error {
  override name = "ArtifactBusError";
}

/** A bad option or environment variable; the message names it. */
export class ArtifactBusConfigError extends ArtifactBusError {
  override name = "ArtifactBusConfigError";
}

/** The event would be rejected by busd whatever the bus does (bad identifier, duplicate name,
 *  too many artifacts, a file that is missing or not Parquet). Never sent to the outbox. */
export class InvalidEventError extends ArtifactBusError {
  override name = "InvalidEventError";
}

/** NATS could not be reached, or did not store the event (no PubAck). In `required` mode
 *  this is thrown; in `best_effort` mode the event goes to the outbox instead. */
export class BusUnavailableError extends ArtifactBusError {
  override name = "BusUnavailableError";
  constructor(
    message: string,
    readonly url: string,
    override readonly cause?: unknown,
  ) {
    super(message);
  }
}

/** The event is stored, but busd did not settle it within the wait (busd down or behind). */
export class CommitTimeoutError extends ArtifactBusError {
  override name = "CommitTimeoutError";
  constructor(
    message: string,
    readonly seq: number,
  ) {
    super(message);
  }
}
