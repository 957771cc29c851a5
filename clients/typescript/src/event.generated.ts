/* eslint-disable */
// Generated from schemas/artifact-event.v1.schema.json by `npm run gen-types`
// (json-schema-to-typescript). Do not edit: change busd's event types, run `busd schema`,
// then `npm run gen-types`. The test suite fails when this file drifts from the schema.

/**
 * One finished job: its run and the 1–1000 artifacts it wrote.
 */
export interface ArtifactEvent {
  schema_version: number;
  run: Run;
  /**
   * @minItems 1
   * @maxItems 1000
   */
  artifacts: [Artifact, ...Artifact[]];
  event_id?: string | null;
  producer?: string | null;
}
/**
 * The job that produced the artifacts.
 */
export interface Run {
  run_id: string;
  kind: string;
  status?: string | null;
  started_at?: string | null;
  finished_at?: string | null;
  params?: {
    [k: string]: unknown | undefined;
  } | null;
  code_version?: string | null;
  parent_run_id?: string | null;
}
/**
 * One file a job wrote. ``rows``, ``bytes`` and ``sha256`` are checked when given.
 */
export interface Artifact {
  name: string;
  path: string;
  rows?: number | null;
  bytes?: number | null;
  sha256?: string | null;
  meta?: {
    [k: string]: unknown | undefined;
  } | null;
}
