/**
 * The closed sets of outcomes and rejection reasons (busd's contract §4, `busd/errors.py`:
 * `Outcome` and `Reason`). The test suite checks these lists against the Python enums.
 */

export const OUTCOMES = ["committed", "duplicate", "rejected"] as const;

/** The one outcome every stream message ends in. */
export type Outcome = (typeof OUTCOMES)[number];

export const REASONS = [
  "malformed",
  "schema",
  "unsupported_version",
  "producer_mismatch",
  "event_id_conflict",
  "poison",
  "path_outside_roots",
  "file_missing",
  "file_unreadable",
  "size_mismatch",
  "checksum_mismatch",
  "not_parquet",
  "rows_mismatch",
  "too_large",
] as const;

/** Why busd rejected an event. */
export type Reason = (typeof REASONS)[number];

export function isReason(value: unknown): value is Reason {
  return typeof value === "string" && (REASONS as readonly string[]).includes(value);
}

export function isOutcome(value: unknown): value is Outcome {
  return typeof value === "string" && (OUTCOMES as readonly string[]).includes(value);
}
