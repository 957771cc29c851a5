#!/usr/bin/env node
// Generate src/event.generated.ts from the published JSON Schema of the artifact event.
//
//   npm run gen-types               rewrite src/event.generated.ts
//   npm run gen-types -- --check    exit 1 when the committed file differs from a fresh one
//   npm run gen-types -- --stdout   print the generated text
//
// The schema itself is generated from busd's Python types (`busd schema`), so the chain is
// Python types -> schemas/artifact-event.v1.schema.json -> these TypeScript types; each step
// has a drift check in the test suite.

import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

import { compile } from "json-schema-to-typescript";

const here = path.dirname(fileURLToPath(import.meta.url));
const SCHEMA = path.resolve(here, "../../../schemas/artifact-event.v1.schema.json");
const OUT = path.resolve(here, "../src/event.generated.ts");

const BANNER = `/* eslint-disable */
// Generated from schemas/artifact-event.v1.schema.json by \`npm run gen-types\`
// (json-schema-to-typescript). Do not edit: change busd's event types, run \`busd schema\`,
// then \`npm run gen-types\`. The test suite fails when this file drifts from the schema.`;

export async function generate() {
  const schema = JSON.parse(await readFile(SCHEMA, "utf8"));
  // The root is only a $ref to $defs.ArtifactEvent: without its title the root is not
  // emitted a second time under another name.
  delete schema.title;
  return compile(schema, "ArtifactEvent", {
    bannerComment: BANNER,
    strictIndexSignatures: true,
    format: true,
    style: { printWidth: 100 },
  });
}

async function main(argv) {
  const text = await generate();
  if (argv.includes("--stdout")) {
    process.stdout.write(text);
  } else if (argv.includes("--check")) {
    const current = await readFile(OUT, "utf8").catch(() => "");
    if (current !== text) {
      process.stderr.write("src/event.generated.ts drifted from the schema: run `npm run gen-types`\n");
      process.exitCode = 1;
    }
  } else {
    await writeFile(OUT, text);
  }
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`gen-types: ${err?.message ?? err}\n`);
  process.exitCode = 1;
});
