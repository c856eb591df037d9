/**
 * Building a target cache: run the teacher over the rows, shard by shard, each written
 * atomically (temp file + rename) with the manifest updated after it, so a run killed at any
 * point resumes without recomputing finished shards. Shard boundaries depend only on the row
 * count and rows per shard, so `n` workers can each compute the shards `k % n == i`.
 */
import { join } from "node:path";
import { f32ArrayToF16 } from "../io/dtype.ts";
import { prepareOutputFolder } from "../io/output_path.ts";
import { writeSafetensors } from "../io/safetensors.ts";
import type { JsonScalar, Teacher } from "../models/teacher.ts";
import { sha256File } from "../util/hash.ts";
import {
  CACHE_FORMAT,
  CACHE_VERSION,
  CacheError,
  type CacheManifest,
  type CacheShardEntry,
  type CacheWorker,
  canonicalJson,
  checkSameRows,
  checkSameTeacher,
  checkWorker,
  DEFAULT_ROWS_PER_SHARD,
  firstNonFiniteF16,
  type FoundManifest,
  HASH_BYTES,
  hexToBytes,
  inspectShardFile,
  layoutOf,
  manifestFileName,
  planShards,
  readManifests,
  removePartManifests,
  rowListSha256,
  SHARD_FORMAT,
  shardEntry,
  type ShardLayout,
  type ShardPlan,
  type TeacherRecord,
  teacherRecord,
  writeManifest,
} from "./cache_format.ts";
import { captionHash, type CaptionRow } from "./captions.ts";

/** Where a `buildTargetCache` run stands, as `onProgress` reports it. */
export interface CacheProgress {
  /** Rows of this worker's shards that are finished, including ones found on disk. */
  rowsDone: number;
  /** Rows of this worker's shards in all. */
  rowsTotal: number;
  /** Rows the teacher computed in this run. */
  rowsComputed: number;
  /** This worker's shards that are finished, including ones found on disk. */
  shardsDone: number;
  /** This worker's shards in all. */
  shardsTotal: number;
}

/** What `buildTargetCache` computes, with which teacher, into which folder. */
export interface BuildTargetCacheOptions {
  /** The cache folder; created if missing, resumed if it holds a cache of the same rows. */
  dir: string;
  /** The captions, in data set order (as `readCaptions` returns them). */
  rows: readonly CaptionRow[];
  /** Recorded in the manifest to say where the rows came from. */
  source: Record<string, JsonScalar>;
  /** Computes the targets; must match the teacher of a cache being resumed. */
  teacher: Teacher;
  /** Captions per `teacher.encode` call; batches never cross a shard. */
  batchSize: number;
  /** Undefined: the value of the cache being resumed, else `DEFAULT_ROWS_PER_SHARD`. */
  rowsPerShard?: number;
  /** Compute only this worker's shards and write `manifest.part-i-of-n.json`. */
  worker?: CacheWorker;
  /** Called once after the finished shards are found, after every batch and at the end. */
  onProgress?: (progress: CacheProgress) => void;
  /** Notes: shards recomputed, temp files removed. */
  log?: (line: string) => void;
}

/** Deletes temp files of a killed run, only those of `targets` (other workers may be writing). */
async function removeStaleTempFiles(
  dir: string,
  targets: ReadonlySet<string>,
  log: (line: string) => void,
): Promise<void> {
  const stale: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    const at = entry.name.indexOf(".tmp-");
    if (entry.isFile && at > 0 && targets.has(entry.name.slice(0, at))) stale.push(entry.name);
  }
  for (const name of stale.sort()) await Deno.remove(join(dir, name));
  if (stale.length) {
    log(`removed ${stale.length} temp file(s) of an interrupted run: ${stale.join(", ")}`);
  }
}

/**
 * The manifest entry of a shard already on disk, or undefined when it must be computed. A file
 * with a recorded entry must match its SHA-256; a complete file without one (the run stopped
 * between renaming the shard and recording it) is taken after its header and rows check out.
 */
async function finishedShard(
  dir: string,
  plan: ShardPlan,
  recorded: readonly CacheShardEntry[],
  layout: ShardLayout,
  log: (line: string) => void,
): Promise<CacheShardEntry | undefined> {
  const path = join(dir, plan.file);
  const stat = await Deno.stat(path).catch(() => undefined);
  const matching = recorded.filter((e) =>
    e.index === plan.index && e.file === plan.file && e.rowsSha256 === plan.rowsSha256
  );
  if (!stat?.isFile) {
    if (matching.length) log(`${path}: listed as finished but missing; computing it again`);
    return undefined;
  }
  const sizeMatches = matching.some((e) => e.bytes === stat.size);
  const sha256 = matching.length && !sizeMatches ? "" : await sha256File(path);
  if (matching.some((e) => e.sha256 === sha256 && e.bytes === stat.size)) {
    return shardEntry(plan, stat.size, sha256);
  }
  if (matching.length) {
    log(`${path}: its size or SHA-256 does not match the manifest (damaged); computing it again`);
    return undefined;
  }
  const inspected = await inspectShardFile(path, plan, layout);
  if (typeof inspected === "string") {
    log(`${path}: not a finished shard of this cache (${inspected}); computing it again`);
    return undefined;
  }
  return shardEntry(plan, stat.size, sha256);
}

/**
 * The teacher's output for a batch as F16 bit patterns; refuses output of the wrong size or
 * values F16 cannot hold (NaN, infinity, |x| >= 65520), naming the row and its caption.
 */
function teacherOutputF16(
  output: { seq: Float32Array; pooled: Float32Array },
  rows: readonly CaptionRow[],
  firstRow: number,
  teacher: TeacherRecord,
): { seq: Uint16Array; pooled: Uint16Array } {
  const parts = [
    ["prompt_embeds", output.seq, teacher.seqLen * teacher.seqDim, "seq"],
    ["pooled", output.pooled, teacher.pooledDim, "pooled"],
  ] as const;
  const [seq, pooled] = parts.map(([name, values, perRow, field]) => {
    if (!(values instanceof Float32Array) || values.length !== rows.length * perRow) {
      throw new CacheError(
        `the teacher returned ${field} of ${values?.length} values for ${rows.length} captions; ` +
          `expected a Float32Array of ${rows.length} x ${perRow} (${name})`,
      );
    }
    const bits = f32ArrayToF16(values);
    const i = firstNonFiniteF16(bits);
    if (i < 0) return bits;
    const row = rows[Math.floor(i / perRow)];
    const why = Number.isFinite(values[i]) ? ", beyond the F16 range (|x| < 65520)" : "";
    throw new CacheError(
      `the teacher's ${name} for row ${firstRow + Math.floor(i / perRow)} (id ${row.id}) holds ` +
        `${values[i]} at element ${i % perRow}${why}; the cache stores F16 and training refuses ` +
        `non-finite targets. Fix: check the teacher on this caption: ${
          JSON.stringify(row.caption)
        }`,
    );
  });
  return { seq, pooled };
}

/** Writes one shard's targets (F16 bit patterns) with its rows' ids, captions and hashes. */
async function writeShard(
  dir: string,
  plan: ShardPlan,
  rows: readonly CaptionRow[],
  hashes: readonly string[],
  layout: ShardLayout,
  targets: { seq: Uint16Array; pooled: Uint16Array },
): Promise<CacheShardEntry> {
  const n = plan.end - plan.start;
  const captionBytes = new Uint8Array(n * HASH_BYTES);
  for (let i = 0; i < n; i++) hexToBytes(hashes[plan.start + i], captionBytes, i * HASH_BYTES);
  const shardRows = rows.slice(plan.start, plan.end);
  const path = join(dir, plan.file);
  await writeSafetensors(path, [
    {
      name: "prompt_embeds",
      dtype: "F16",
      shape: [n, layout.seqLen, layout.seqDim],
      data: targets.seq,
    },
    { name: "pooled", dtype: "F16", shape: [n, layout.pooledDim], data: targets.pooled },
    { name: "caption_sha256", dtype: "U8", shape: [n, HASH_BYTES], data: captionBytes },
  ], {
    format: SHARD_FORMAT,
    teacher_sha256: layout.teacherSha256,
    first_row: String(plan.start),
    ids: JSON.stringify(shardRows.map((row) => row.id)),
    captions: JSON.stringify(shardRows.map((row) => row.caption)),
  });
  return shardEntry(plan, (await Deno.stat(path)).size, await sha256File(path));
}

/**
 * The batches of `plans` in order; a batch never crosses a shard. Not length-bucketed (unlike
 * training and batch encode): the CLIP teachers read every caption as 77 ids, padding
 * included, and the targets are all 77 positions' states, so a batch costs the same whatever
 * its captions' lengths.
 */
function batchesOf(plans: readonly ShardPlan[], batchSize: number) {
  return plans.flatMap((plan) => {
    const batches: { plan: ShardPlan; start: number; end: number }[] = [];
    for (let start = plan.start; start < plan.end; start += batchSize) {
      batches.push({ plan, start, end: Math.min(plan.end, start + batchSize) });
    }
    return batches;
  });
}

function chooseRowsPerShard(asked: number | undefined, found: readonly FoundManifest[]): number {
  const cached = found[0]?.manifest.rowsPerShard;
  if (asked !== undefined && (!Number.isSafeInteger(asked) || asked < 1)) {
    throw new CacheError(`rows per shard ${asked}: expected a positive integer`);
  }
  for (const { path, manifest } of found) {
    const wanted = asked ?? cached;
    if (manifest.rowsPerShard !== wanted) {
      throw new CacheError(
        `${path} cuts the rows into shards of ${manifest.rowsPerShard}, but this run asks for ` +
          `${wanted}. Fix: drop --rows-per-shard (a resumed cache keeps its own), or use a new ` +
          `--out folder.`,
      );
    }
  }
  return asked ?? cached ?? DEFAULT_ROWS_PER_SHARD;
}

/**
 * Computes the targets of `rows` into `dir`, resuming what is there: shards listed in any
 * manifest of the folder whose files still hash the same are kept, stale temp files are removed,
 * and every other shard of this worker is computed, written atomically and recorded in the
 * worker's manifest right away. Refuses a folder holding another teacher's or other captions'
 * targets. Returns the manifest written last.
 */
export async function buildTargetCache(options: BuildTargetCacheOptions): Promise<CacheManifest> {
  const { dir, rows, teacher, batchSize } = options;
  const worker = options.worker ?? { index: 0, count: 1 };
  const log = options.log ?? (() => {});
  checkWorker(worker);
  if (rows.length === 0) throw new CacheError("no captions to compute targets for");
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) {
    throw new CacheError(`batch size ${batchSize}: expected a positive integer`);
  }
  const record = teacherRecord(teacher);
  const layout = layoutOf(record);
  const hashes = rows.map((row) => captionHash(row.caption));
  const rowsSha256 = rowListSha256(rows.map((row) => row.id), hashes);

  await prepareOutputFolder(dir);
  const found = await readManifests(dir);
  for (const { path, manifest } of found) {
    checkSameTeacher(path, manifest.teacher, record);
    checkSameRows(path, manifest, rows.length, rowsSha256);
  }
  const rowsPerShard = chooseRowsPerShard(options.rowsPerShard, found);
  const plans = planShards(rows, hashes, rowsPerShard);
  const mine = plans.filter((plan) => plan.index % worker.count === worker.index);
  const manifestName = manifestFileName(worker);
  await removeStaleTempFiles(dir, new Set([manifestName, ...mine.map((p) => p.file)]), log);

  const manifest: CacheManifest = {
    format: CACHE_FORMAT,
    version: CACHE_VERSION,
    teacher: record,
    dtype: "F16",
    source: JSON.parse(canonicalJson(options.source)),
    rows: rows.length,
    rowsSha256,
    rowsPerShard,
    shardCount: plans.length,
    ...(worker.count > 1 ? { worker } : {}),
    complete: false,
    shards: [],
  };
  const recorded = found.flatMap(({ manifest }) => manifest.shards);
  const todo: ShardPlan[] = [];
  for (const plan of mine) {
    const entry = await finishedShard(dir, plan, recorded, layout, log);
    if (entry) manifest.shards.push(entry);
    else todo.push(plan);
  }

  const progress: CacheProgress = {
    rowsDone: manifest.shards.reduce((sum, e) => sum + e.rows[1] - e.rows[0], 0),
    rowsTotal: mine.reduce((sum, p) => sum + p.end - p.start, 0),
    rowsComputed: 0,
    shardsDone: manifest.shards.length,
    shardsTotal: mine.length,
  };
  options.onProgress?.({ ...progress });
  await writeManifest(dir, manifest);
  // The next batch is encoded while this one is converted and its shard written, so the
  // teacher's GPU waits on that CPU work as little as possible; one encode is in flight at most.
  const batches = batchesOf(todo, batchSize);
  const encode = (i: number) => {
    const promise = teacher.encode(
      rows.slice(batches[i].start, batches[i].end).map((r) => r.caption),
    );
    promise.catch(() => {}); // reported where it is awaited, unless an earlier batch failed first
    return promise;
  };
  let pending = batches.length ? encode(0) : undefined;
  let targets = { seq: new Uint16Array(0), pooled: new Uint16Array(0) };
  for (let i = 0; i < batches.length; i++) {
    const { plan, start, end } = batches[i];
    const output = await pending!;
    pending = i + 1 < batches.length ? encode(i + 1) : undefined;
    if (start === plan.start) {
      const n = plan.end - plan.start;
      targets = {
        seq: new Uint16Array(n * record.seqLen * record.seqDim),
        pooled: new Uint16Array(n * record.pooledDim),
      };
    }
    const bits = teacherOutputF16(output, rows.slice(start, end), start, record);
    targets.seq.set(bits.seq, (start - plan.start) * record.seqLen * record.seqDim);
    targets.pooled.set(bits.pooled, (start - plan.start) * record.pooledDim);
    progress.rowsDone += end - start;
    progress.rowsComputed += end - start;
    options.onProgress?.({ ...progress });
    if (end === plan.end) {
      manifest.shards.push(await writeShard(dir, plan, rows, hashes, layout, targets));
      progress.shardsDone++;
      await writeManifest(dir, manifest);
    }
  }
  manifest.complete = true;
  await writeManifest(dir, manifest);
  if (worker.count === 1) await removePartManifests(found);
  options.onProgress?.({ ...progress });
  return manifest;
}
