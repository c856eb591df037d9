/**
 * Merging the worker manifests of a cache split over machines into the one an undivided run
 * writes, and verifying every shard of a cache against its manifest (`cache --verify`).
 */
import { join } from "node:path";
import {
  CacheError,
  type CacheManifest,
  type CacheShardEntry,
  checkSameRows,
  checkSameTeacher,
  f16Bits,
  firstNonFiniteF16,
  inspectShardFile,
  layoutOf,
  MANIFEST_FILE,
  readManifests,
  removePartManifests,
  type ShardLayout,
  teacherDifferences,
  writeManifest,
} from "./cache_format.ts";
import { ShardHashCheck } from "./cache_verify.ts";

function formatIndices(indices: readonly number[]): string {
  const shown = indices.slice(0, 12).join(", ");
  return indices.length > 12 ? `${shown}, ... (${indices.length} in all)` : shown;
}

/**
 * Combines the manifests of `dir` (worker parts, and manifest.json if present) into one complete
 * manifest.json, byte-identical to the one an undivided run writes, and removes the parts.
 * Refuses manifests of different teachers or captions, and a cache with shards missing.
 */
export async function mergeCacheManifests(dir: string): Promise<CacheManifest> {
  const found = await readManifests(dir);
  if (found.length === 0) {
    throw new CacheError(
      `${dir}: no ${MANIFEST_FILE} or manifest.part-*-of-*.json to merge. Fix: copy the files ` +
        `of every worker's --out folder into this one.`,
    );
  }
  const first = found[0];
  for (const { path, manifest } of found.slice(1)) {
    checkSameTeacher(path, first.manifest.teacher, manifest.teacher);
    checkSameRows(path, first.manifest, manifest.rows, manifest.rowsSha256);
    if (manifest.rowsPerShard !== first.manifest.rowsPerShard) {
      throw new CacheError(
        `${path} has shards of ${manifest.rowsPerShard} rows, ${first.path} of ` +
          `${first.manifest.rowsPerShard}: these workers split the data differently. Fix: rerun ` +
          `one of them with the other's --rows-per-shard.`,
      );
    }
  }
  const byIndex = new Map<number, { path: string; entry: CacheShardEntry }>();
  for (const { path, manifest } of found) {
    for (const entry of manifest.shards) {
      const other = byIndex.get(entry.index);
      if (other && other.entry.sha256 !== entry.sha256) {
        throw new CacheError(
          `shard ${entry.index} is listed with SHA-256 ${other.entry.sha256} in ${other.path} ` +
            `and ${entry.sha256} in ${path}; one file was replaced. Fix: delete ${entry.file} ` +
            `and run the cache again for that shard's worker.`,
        );
      }
      byIndex.set(entry.index, { path, entry });
    }
  }
  const { shardCount } = first.manifest;
  const missing = [...Array(shardCount).keys()].filter((k) => !byIndex.has(k));
  if (missing.length) {
    const counts = [...new Set(found.flatMap(({ manifest }) => manifest.worker?.count ?? []))];
    const owners = counts.length === 1
      ? ` (workers ${formatIndices([...new Set(missing.map((k) => k % counts[0]))])} of ${
        counts[0]
      })`
      : "";
    throw new CacheError(
      `${dir}: ${missing.length} of ${shardCount} shards are not finished: ` +
        `${formatIndices(missing)}${owners}. Fix: let every worker finish (rerun the ones that ` +
        `stopped) and copy their files here, then merge again.`,
    );
  }
  for (const { path, entry } of byIndex.values()) {
    const stat = await Deno.stat(join(dir, entry.file)).catch(() => undefined);
    if (stat?.size !== entry.bytes) {
      throw new CacheError(
        `${join(dir, entry.file)}: listed in ${path} with ${entry.bytes} bytes, but ` +
          `${stat ? `it has ${stat.size}` : "it is missing"}. Fix: copy it from the machine of ` +
          `the worker that computed it.`,
      );
    }
  }
  const merged: CacheManifest = {
    ...first.manifest,
    complete: true,
    shards: [...byIndex.values()].map(({ entry }) => entry),
  };
  delete merged.worker;
  await writeManifest(dir, merged);
  await removePartManifests(found);
  return merged;
}

/** What `verifyCache` found; `ok` sums it up. */
export interface CacheVerifyReport {
  /** The cache folder checked. */
  dir: string;
  /** Rows the manifest declares. */
  rows: number;
  /** Shards the manifest declares. */
  shardCount: number;
  /** Shards whose files were read and checked. */
  shardsChecked: number;
  /** Shards no manifest lists yet (for a worker's folder: only that worker's shards count). */
  missingShards: number[];
  /** Damage: each names the file and what is wrong. */
  problems: string[];
  /** Files that are not part of the cache, such as temp files of a killed run. */
  warnings: string[];
  /** No problems and no missing shards. */
  ok: boolean;
}

/**
 * Re-checks a cache: each listed shard's size and SHA-256, header, row list, stored caption
 * hashes and every value (no NaN or infinity), and which shards are missing.
 */
export async function verifyCache(dir: string): Promise<CacheVerifyReport> {
  const found = await readManifests(dir);
  if (found.length === 0) {
    throw new CacheError(
      `${dir}: no ${MANIFEST_FILE} (not a target cache, or nothing computed yet)`,
    );
  }
  const first = found[0].manifest;
  const problems: string[] = [];
  for (const { path, manifest } of found.slice(1)) {
    const differences = teacherDifferences(first.teacher, manifest.teacher);
    if (differences.length) problems.push(`${path}: another teacher: ${differences.join("; ")}`);
    if (manifest.rowsSha256 !== first.rowsSha256 || manifest.rowsPerShard !== first.rowsPerShard) {
      problems.push(`${path}: other rows or rows per shard than ${found[0].path}`);
    }
  }
  const layout = layoutOf(first.teacher);
  const entries = new Map<number, CacheShardEntry>();
  for (const { manifest } of found) for (const e of manifest.shards) entries.set(e.index, e);
  const hasFullManifest = found.some(({ manifest }) => !manifest.worker);
  const expected = [...Array(first.shardCount).keys()].filter((k) =>
    hasFullManifest || found.some(({ manifest: m }) => k % m.worker!.count === m.worker!.index)
  );
  const missingShards = expected.filter((k) => !entries.has(k));

  // No memo: --verify hashes every shard.
  const hashes = await ShardHashCheck.load(dir);
  let shardsChecked = 0;
  for (const entry of [...entries.values()].sort((a, b) => a.index - b.index)) {
    const path = join(dir, entry.file);
    const problem = await verifyShard(path, entry, layout, hashes);
    shardsChecked++;
    if (problem) problems.push(`${path}: ${problem}`);
  }
  const known = new Set([
    ...found.map(({ path }) => path),
    ...[...entries.values()].map((e) => join(dir, e.file)),
  ]);
  const warnings: string[] = [];
  for await (const item of Deno.readDir(dir)) {
    const path = join(dir, item.name);
    if (!known.has(path)) {
      const what = item.name.includes(".tmp-")
        ? "a temp file of an interrupted run (the next run of the same worker removes it)"
        : "not listed in any manifest";
      warnings.push(`${path}: ${what}`);
    }
  }
  warnings.sort();
  return {
    dir,
    rows: first.rows,
    shardCount: first.shardCount,
    shardsChecked,
    missingShards,
    problems,
    warnings,
    ok: problems.length === 0 && missingShards.length === 0,
  };
}

/** What is wrong with one listed shard, or undefined. */
async function verifyShard(
  path: string,
  entry: CacheShardEntry,
  layout: ShardLayout,
  hashes: ShardHashCheck,
): Promise<string | undefined> {
  const stat = await Deno.stat(path).catch(() => undefined);
  if (!stat?.isFile) return "missing (rerun the cache to compute it again)";
  if (stat.size !== entry.bytes) return `${stat.size} bytes, the manifest says ${entry.bytes}`;
  const changed = await hashes.problem(path, entry.file, entry.sha256, stat);
  if (changed) return `${changed}. Fix: delete it and rerun the cache to compute it again`;
  const expected = { start: entry.rows[0], end: entry.rows[1], rowsSha256: entry.rowsSha256 };
  const inspected = await inspectShardFile(path, expected, layout);
  if (typeof inspected === "string") return inspected;
  const { file, contents } = inspected;
  try {
    for (
      const [name, perRow] of [["prompt_embeds", layout.seqLen * layout.seqDim], [
        "pooled",
        layout.pooledDim,
      ]] as const
    ) {
      const at = firstNonFiniteF16(f16Bits(await file.readBytes(name)));
      if (at >= 0) {
        const row = Math.floor(at / perRow);
        return `${name} row ${entry.rows[0] + row} (id ${contents.ids[row]}) holds NaN or ` +
          `infinity. Fix: delete the file and rerun the cache to compute it again`;
      }
    }
  } finally {
    file.close();
  }
  return undefined;
}
