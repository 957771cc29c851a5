/** Shared by the tests: fixtures, the environment the Python wrapper sets, busd's CLI. */

import { execFile } from "node:child_process";
import { rmSync } from "node:fs";
import { copyFile, mkdir, mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
/** test/fixtures, from dist/test (compiled) or test (sources). */
export const FIXTURES = path.resolve(here, here.includes(`${path.sep}dist${path.sep}`) ? "../../test/fixtures" : "fixtures");
export const THREE = path.join(FIXTURES, "three.parquet"); // columns x (int64), y (string); 3 rows
export const FIVE = path.join(FIXTURES, "five.parquet"); // px (double), qty (int64), side (string); 5 rows

/** What tests/test_typescript_client.py hands over; undefined when run on their own. */
export const LIVE = {
  natsUrl: process.env.ARTIFACT_BUS_TEST_NATS_URL,
  /** the artifact root busd serve was configured with */
  root: process.env.ARTIFACT_BUS_TEST_ROOT,
  /** busd's command line as a JSON array, e.g. ["python", "-m", "busd"] */
  busd: process.env.ARTIFACT_BUS_TEST_BUSD ? (JSON.parse(process.env.ARTIFACT_BUS_TEST_BUSD) as string[]) : undefined,
  /** busd.toml of the busd serve under test */
  config: process.env.ARTIFACT_BUS_TEST_CONFIG,
  /** a scratch folder shared by the phases of one scenario */
  work: process.env.ARTIFACT_BUS_TEST_WORK,
};

export function liveOrSkip(): { natsUrl: string; root: string; busd: string[]; config: string } | undefined {
  const { natsUrl, root, busd, config } = LIVE;
  if (natsUrl && root && busd && config) return { natsUrl, root, busd, config };
  return undefined;
}

export const SKIP_LIVE = liveOrSkip() === undefined
  ? "needs a running busd: run through tests/test_typescript_client.py" : false;

/** A copy of a fixture at `root/rel` (a fresh file of the job's own). */
export async function place(fixture: string, root: string, rel: string): Promise<string> {
  const dest = path.join(root, rel);
  await mkdir(path.dirname(dest), { recursive: true });
  await copyFile(fixture, dest);
  return dest;
}

/** Scratch folders of this test file's process, removed when it exits (they piled up in
 * the system's temporary folder, a few per run). */
const scratched: string[] = [];
process.on("exit", () => {
  for (const dir of scratched) rmSync(dir, { recursive: true, force: true });
});

export async function scratch(prefix = "artifact-bus-test-"): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), prefix));
  scratched.push(dir);
  return dir;
}

/** Run busd's CLI with the config under test; resolves with exit code, stdout, stderr. */
export function busd(args: string[], timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  const live = liveOrSkip();
  if (!live) throw new Error("busd CLI not available");
  const [cmd, ...pre] = live.busd;
  return new Promise((resolve) => {
    execFile(cmd!, [...pre, ...args], { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err ? (typeof (err as NodeJS.ErrnoException).code === "number" ? Number((err as NodeJS.ErrnoException).code) : 1) : 0;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      });
  });
}

/** `busd query --json SQL` over the exports of the busd under test. */
export async function query<T = Record<string, unknown>>(sql: string): Promise<T[]> {
  const live = liveOrSkip()!;
  const out = await busd(["query", "--config", live.config, "--json", sql]);
  if (out.code !== 0) throw new Error(`busd query failed (${out.code}): ${out.stderr}`);
  return JSON.parse(out.stdout) as T[];
}

/** Seconds a promise took to settle, with its result or error. */
export async function timed<T>(p: Promise<T>): Promise<{ seconds: number; value?: T; error?: unknown }> {
  const start = performance.now();
  try {
    const value = await p;
    return { seconds: (performance.now() - start) / 1000, value };
  } catch (error) {
    return { seconds: (performance.now() - start) / 1000, error };
  }
}
