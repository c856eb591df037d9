/**
 * The target cache: the SDXL teacher's outputs (prompt_embeds, pooled) for every caption of a
 * data set, stored as F16 safetensors shards beside a manifest, so training reads targets
 * instead of running the two CLIP encoders. The format is documented in datasets.md
 * ("Target cache").
 *
 * Everything written is deterministic (the same rows and teacher give the same bytes) and
 * atomic (temp file + rename), so a run killed at any point resumes without recomputing
 * finished shards and never leaves a partial one. Shard boundaries depend only on the row
 * count and rows per shard, so `n` workers can each compute the shards `k % n == i` and their
 * manifests merge into the one an undivided run writes.
 */

import { createHash } from "node:crypto";
import { join } from "node:path";
import { writeFileAtomic } from "../io/atomic.ts";
import { prepareOutputFolder } from "../io/output_path.ts";
import { decodeF32, f32ArrayToF16 } from "../io/dtype.ts";
import { SafetensorsFile, type TensorInfo, writeSafetensors } from "../io/safetensors.ts";
import { captionHash, type CaptionRow } from "./captions.ts";
import { ShardHashCheck } from "./cache_verify.ts";
import { sha256File } from "../util/hash.ts";
import type { JsonScalar, Teacher } from "../models/teacher.ts";

/** The `format` of a cache manifest; other values are refused. */
export const CACHE_FORMAT = "distill-target-cache";
/** The manifest `version` this code writes and reads. */
export const CACHE_VERSION = 1;
export const MANIFEST_FILE = "manifest.json";
export const DEFAULT_ROWS_PER_SHARD = 256;
/** The `format` value in each shard's `__metadata__`. */
const SHARD_FORMAT = `${CACHE_FORMAT}/${CACHE_VERSION}`;
const HASH_BYTES = 32;
const PART_MANIFEST = /^manifest\.part-(\d+)-of-(\d+)\.json$/;

/** Bad cache, bad teacher output, or a cache that does not fit this run; the message says the fix. */
export class CacheError extends Error {
  override name = "CacheError";
}

/** A JSON value that is not an object, array or null: what settings records hold. */
/** The teacher as a manifest records and compares it (keys sorted, so equal teachers match). */
export interface TeacherRecord {
  /** See `Teacher.identity`. */
  identity: Record<string, string>;
  /** See `Teacher.tokenizer`. */
  tokenizer: Record<string, JsonScalar>;
  /** Tokens per sequence target. */
  seqLen: number;
  /** Features per token of the sequence target. */
  seqDim: number;
  /** Features of the pooled target. */
  pooledDim: number;
}

/** One finished shard file as a manifest lists it. */
export interface CacheShardEntry {
  /** Shard number, 0-based, in data set order. */
  index: number;
  /** File name inside the cache folder. */
  file: string;
  /** Data set rows [start, end) held by the file. */
  rows: [number, number];
  /** File size, checked before the hash. */
  bytes: number;
  /** SHA-256 of the whole file, hex. */
  sha256: string;
  /** `rowListSha256` of the shard's rows: which captions it holds, in order. */
  rowsSha256: string;
}

/** Worker `index` of `count` computes the shards whose index is `index` mod `count`. */
export interface CacheWorker {
  /** This worker's number, 0-based, below `count`. */
  index: number;
  /** How many workers split the shards. */
  count: number;
}

/** `manifest.json` of a target cache: which teacher, which rows, and the finished shards. */
export interface CacheManifest {
  /** Always `CACHE_FORMAT`: marks the folder as a target cache. */
  format: typeof CACHE_FORMAT;
  /** Layout version; a different one is refused. */
  version: typeof CACHE_VERSION;
  /** The teacher the targets came from; resuming with another teacher is refused. */
  teacher: TeacherRecord;
  /** Element type of the stored targets. */
  dtype: "F16";
  /** How the rows were read (data path, format, options); recorded, never compared. */
  source: Record<string, JsonScalar>;
  /** Number of captions in the data set (all workers together). */
  rows: number;
  /** `rowListSha256` of all rows: a resumed or merged run must read the same captions. */
  rowsSha256: string;
  /** Rows per shard file (the last shard may hold fewer). */
  rowsPerShard: number;
  /** Shards of the whole data set, listed or not. */
  shardCount: number;
  /** Present in a worker's `manifest.part-i-of-n.json` only. */
  worker?: CacheWorker;
  /** Every shard this manifest is responsible for is listed. */
  complete: boolean;
  /** Finished shards, by index. */
  shards: CacheShardEntry[];
}

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

export function shardFileName(index: number): string {
  return `targets-${String(index).padStart(5, "0")}.safetensors`;
}

export function manifestFileName(worker?: CacheWorker): string {
  return !worker || worker.count === 1
    ? MANIFEST_FILE
    : `manifest.part-${worker.index}-of-${worker.count}.json`;
}

function sha256Hex(text: string): string {
  return createHash("sha256").update(text, "utf8").digest("hex");
}

/** JSON with object keys sorted at every level, so equal values give equal text. */
function canonicalJson(value: unknown): string {
  return JSON.stringify(
    value,
    (_key, v) =>
      typeof v === "object" && v !== null && !Array.isArray(v)
        ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
        : v,
  );
}

/**
 * SHA-256 over one line `JSON.stringify([id, captionSha256]) + "\n"` per row, in order: names
 * the captions a cache (or shard) holds without storing them in the manifest.
 */
export function rowListSha256(ids: readonly string[], captionHashes: readonly string[]): string {
  const hash = createHash("sha256");
  for (let i = 0; i < ids.length; i++) {
    hash.update(JSON.stringify([ids[i], captionHashes[i]]) + "\n", "utf8");
  }
  return hash.digest("hex");
}

export function teacherRecord(teacher: Teacher): TeacherRecord {
  for (const key of ["seqLen", "seqDim", "pooledDim"] as const) {
    if (!Number.isSafeInteger(teacher[key]) || teacher[key] <= 0) {
      throw new CacheError(
        `the teacher's ${key} is ${teacher[key]}; it must be a positive integer`,
      );
    }
  }
  return JSON.parse(canonicalJson({
    identity: teacher.identity,
    tokenizer: teacher.tokenizer,
    seqLen: teacher.seqLen,
    seqDim: teacher.seqDim,
    pooledDim: teacher.pooledDim,
  }));
}

/** The shard files' `teacher_sha256`: ties each shard to the teacher that computed it. */
function teacherSha256(record: TeacherRecord): string {
  return sha256Hex(canonicalJson(record));
}

/** Where two teacher records differ, one line per key, naming both values. */
function teacherDifferences(cached: TeacherRecord, current: TeacherRecord): string[] {
  const lines: string[] = [];
  const compare = (what: string, a: Record<string, unknown>, b: Record<string, unknown>) => {
    for (const key of [...new Set([...Object.keys(a), ...Object.keys(b)])].sort()) {
      if (canonicalJson(a[key]) !== canonicalJson(b[key])) {
        const show = (v: unknown) => (v === undefined ? "(absent)" : JSON.stringify(v));
        lines.push(
          `${what}${JSON.stringify([key])}: cache ${show(a[key])}, this run ${show(b[key])}`,
        );
      }
    }
  };
  compare("identity", cached.identity, current.identity);
  compare("tokenizer", cached.tokenizer, current.tokenizer);
  const dims = (r: TeacherRecord) => ({
    seqLen: r.seqLen,
    seqDim: r.seqDim,
    pooledDim: r.pooledDim,
  });
  compare("", dims(cached), dims(current));
  return lines;
}

function checkSameTeacher(path: string, cached: TeacherRecord, current: TeacherRecord): void {
  const differences = teacherDifferences(cached, current);
  if (differences.length === 0) return;
  throw new CacheError(
    `${path} holds targets of another teacher:\n  ${differences.join("\n  ")}\n` +
      `Targets of different teachers must not be mixed. Fix: use a new --out folder for this ` +
      `teacher (or the --sdxl folder this cache was made from).`,
  );
}

function checkSameRows(path: string, cached: CacheManifest, rows: number, rowsSha256: string) {
  if (cached.rows === rows && cached.rowsSha256 === rowsSha256) return;
  throw new CacheError(
    `${path} holds targets of other captions: ${cached.rows} rows (rows sha256 ` +
      `${cached.rowsSha256}, read from ${canonicalJson(cached.source)}), but this run reads ` +
      `${rows} rows (rows sha256 ${rowsSha256}). Fix: use a new --out folder, or the same ` +
      `--data, --format, --caption-field, --dedupe and --limit as that cache.`,
  );
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Checks the fields this module relies on; a damaged or foreign manifest names its file. */
function parseManifest(path: string, text: string): CacheManifest {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new CacheError(
      `${path}: not valid JSON (${(error as Error).message}). Manifests are written atomically, ` +
        `so the file was changed by hand. Fix: delete it; the next run finds the finished shards ` +
        `again from their files.`,
    );
  }
  if (!isRecord(value) || value.format !== CACHE_FORMAT) {
    throw new CacheError(
      `${path}: not a distill target cache manifest (no "format": "${CACHE_FORMAT}"). Fix: use ` +
        `an empty or new --out folder.`,
    );
  }
  if (value.version !== CACHE_VERSION) {
    throw new CacheError(
      `${path}: cache format version ${value.version}, but this distill reads version ` +
        `${CACHE_VERSION}. Fix: use a new --out folder.`,
    );
  }
  const manifest = value as unknown as CacheManifest;
  const positive = (n: unknown) => Number.isSafeInteger(n) && (n as number) > 0;
  const entriesOk = Array.isArray(manifest.shards) &&
    manifest.shards.every((s) =>
      isRecord(s) && Number.isSafeInteger(s.index) && typeof s.file === "string" &&
      Array.isArray(s.rows) && typeof s.sha256 === "string" && typeof s.rowsSha256 === "string" &&
      Number.isSafeInteger(s.bytes)
    );
  if (
    !isRecord(manifest.teacher) || !positive(manifest.rows) || !positive(manifest.rowsPerShard) ||
    !positive(manifest.shardCount) || typeof manifest.rowsSha256 !== "string" || !entriesOk
  ) {
    throw new CacheError(
      `${path}: the manifest lacks or mangles teacher, rows, rowsSha256, rowsPerShard, ` +
        `shardCount or shards. Fix: delete it; the next run finds the finished shards again.`,
    );
  }
  return manifest;
}

interface FoundManifest {
  path: string;
  manifest: CacheManifest;
}

/** manifest.json first, then the worker parts by count and index; none for a missing folder. */
async function readManifests(dir: string): Promise<FoundManifest[]> {
  const names: { name: string; order: number[] }[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      if (!entry.isFile) continue;
      const part = PART_MANIFEST.exec(entry.name);
      if (entry.name === MANIFEST_FILE) names.push({ name: entry.name, order: [0, 0] });
      else if (part) names.push({ name: entry.name, order: [Number(part[2]), Number(part[1])] });
    }
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw error;
  }
  names.sort((a, b) => a.order[0] - b.order[0] || a.order[1] - b.order[1]);
  const found: FoundManifest[] = [];
  for (const { name } of names) {
    const path = join(dir, name);
    found.push({ path, manifest: parseManifest(path, await Deno.readTextFile(path)) });
  }
  return found;
}

interface ShardPlan {
  index: number;
  file: string;
  start: number;
  end: number;
  rowsSha256: string;
}

function planShards(
  rows: readonly CaptionRow[],
  hashes: readonly string[],
  rowsPerShard: number,
): ShardPlan[] {
  const plans: ShardPlan[] = [];
  for (let start = 0, index = 0; start < rows.length; start += rowsPerShard, index++) {
    const end = Math.min(rows.length, start + rowsPerShard);
    const ids = rows.slice(start, end).map((row) => row.id);
    const rowsSha256 = rowListSha256(ids, hashes.slice(start, end));
    plans.push({ index, file: shardFileName(index), start, end, rowsSha256 });
  }
  return plans;
}

function shardEntry(plan: ShardPlan, bytes: number, sha256: string): CacheShardEntry {
  return {
    index: plan.index,
    file: plan.file,
    rows: [plan.start, plan.end],
    bytes,
    sha256,
    rowsSha256: plan.rowsSha256,
  };
}

async function writeManifest(dir: string, manifest: CacheManifest): Promise<void> {
  manifest.shards.sort((a, b) => a.index - b.index);
  const name = manifestFileName(manifest.worker);
  await writeFileAtomic(join(dir, name), JSON.stringify(manifest, null, 2) + "\n");
}

/** Removes the part manifests that a complete manifest.json supersedes. */
async function removePartManifests(found: readonly FoundManifest[]): Promise<void> {
  for (const { path, manifest } of found) {
    if (manifest.worker) await Deno.remove(path).catch(() => undefined);
  }
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

function hexToBytes(hex: string, out: Uint8Array, at: number): void {
  for (let i = 0; i < HASH_BYTES; i++) out[at + i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
}

function bytesToHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Index of the first F16 NaN or infinity (exponent bits all ones) in `bits`, or -1. */
function firstNonFiniteF16(bits: Uint16Array): number {
  for (let i = 0; i < bits.length; i++) if ((bits[i] & 0x7c00) === 0x7c00) return i;
  return -1;
}

/** F16 bit patterns of little-endian bytes, independent of host byte order. */
function f16Bits(bytes: Uint8Array): Uint16Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const bits = new Uint16Array(bytes.byteLength / 2);
  for (let i = 0; i < bits.length; i++) bits[i] = view.getUint16(2 * i, true);
  return bits;
}

interface ShardLayout {
  teacherSha256: string;
  seqLen: number;
  seqDim: number;
  pooledDim: number;
}

/** What a shard file must hold: its rows, and the teacher it was computed by. */
interface ShardExpectation {
  start: number;
  end: number;
  rowsSha256: string;
}

interface ShardContents {
  ids: string[];
  captions: string[];
  seq: TensorInfo;
  pooled: TensorInfo;
  captionSha256: TensorInfo;
}

function parseStringList(value: string | undefined, count: number): string[] | undefined {
  try {
    const list = JSON.parse(value ?? "null");
    const ok = Array.isArray(list) && list.length === count &&
      list.every((s) => typeof s === "string");
    return ok ? list : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Checks a shard's header against what the manifest expects: metadata, dtypes, shapes and the
 * row list (ids with the stored caption hashes). Returns the contents, or what is wrong.
 */
async function inspectShard(
  file: SafetensorsFile,
  expected: ShardExpectation,
  layout: ShardLayout,
): Promise<ShardContents | string> {
  const n = expected.end - expected.start;
  const meta = file.metadata;
  if (meta.format !== SHARD_FORMAT) return `__metadata__ format is not "${SHARD_FORMAT}"`;
  if (meta.teacher_sha256 !== layout.teacherSha256) {
    return `computed by another teacher (teacher_sha256 ${meta.teacher_sha256}, ` +
      `the cache's is ${layout.teacherSha256})`;
  }
  if (meta.first_row !== String(expected.start)) {
    return `__metadata__ first_row is ${meta.first_row}, expected ${expected.start}`;
  }
  const ids = parseStringList(meta.ids, n);
  const captions = parseStringList(meta.captions, n);
  if (!ids || !captions) return `__metadata__ ids/captions are not ${n} strings each`;
  const shapes: [string, string, number[]][] = [
    ["prompt_embeds", "F16", [n, layout.seqLen, layout.seqDim]],
    ["pooled", "F16", [n, layout.pooledDim]],
    ["caption_sha256", "U8", [n, HASH_BYTES]],
  ];
  for (const [name, dtype, shape] of shapes) {
    if (!file.has(name)) return `no tensor "${name}"`;
    const info = file.info(name);
    if (info.dtype !== dtype || info.shape.join() !== shape.join()) {
      return `tensor "${name}" is ${info.dtype} [${info.shape}], expected ${dtype} [${shape}]`;
    }
  }
  const hashBytes = await file.readBytes("caption_sha256");
  const hashes = ids.map((_, i) =>
    bytesToHex(hashBytes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES))
  );
  if (rowListSha256(ids, hashes) !== expected.rowsSha256) {
    return "its ids and caption hashes are not the rows the manifest lists for it";
  }
  for (let i = 0; i < n; i++) {
    if (captionHash(captions[i]) !== hashes[i]) {
      return `row ${expected.start + i} (id ${ids[i]}): the stored caption does not match its hash`;
    }
  }
  return {
    ids,
    captions,
    seq: file.info("prompt_embeds"),
    pooled: file.info("pooled"),
    captionSha256: file.info("caption_sha256"),
  };
}

/** `inspectShard` on a path; a file that does not parse is a problem, not an exception. */
async function inspectShardFile(
  path: string,
  expected: ShardExpectation,
  layout: ShardLayout,
): Promise<{ file: SafetensorsFile; contents: ShardContents } | string> {
  let file: SafetensorsFile;
  try {
    file = await SafetensorsFile.open(path);
  } catch (error) {
    return (error as Error).message;
  }
  try {
    const contents = await inspectShard(file, expected, layout);
    return typeof contents === "string" ? contents : { file, contents };
  } finally {
    file.close();
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

/** The batches of `plans` in order; a batch never crosses a shard. */
function batchesOf(plans: readonly ShardPlan[], batchSize: number) {
  return plans.flatMap((plan) => {
    const batches: { plan: ShardPlan; start: number; end: number }[] = [];
    for (let start = plan.start; start < plan.end; start += batchSize) {
      batches.push({ plan, start, end: Math.min(plan.end, start + batchSize) });
    }
    return batches;
  });
}

function layoutOf(record: TeacherRecord): ShardLayout {
  return {
    teacherSha256: teacherSha256(record),
    seqLen: record.seqLen,
    seqDim: record.seqDim,
    pooledDim: record.pooledDim,
  };
}

function checkWorker(worker: CacheWorker): void {
  const { index, count } = worker;
  if (
    !Number.isSafeInteger(count) || count < 1 || !Number.isSafeInteger(index) || index < 0 ||
    index >= count
  ) {
    throw new CacheError(`worker ${index}/${count}: expected i/n with 0 <= i < n`);
  }
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

/** Decoded targets of some rows, in the order asked: seq [n, seqLen, seqDim], pooled [n, pooledDim]. */
export interface TargetRows {
  /** Sequence targets [n, seqLen, seqDim], row-major. */
  seq: Float32Array;
  /** Pooled targets [n, pooledDim], row-major. */
  pooled: Float32Array;
}

interface OpenShard {
  path: string;
  entry: CacheShardEntry;
  ids: string[];
  seq: TensorInfo;
  pooled: TensorInfo;
}

/** Reads exactly `length` bytes at `position`. */
async function readAt(file: Deno.FsFile, path: string, position: number, length: number) {
  const bytes = new Uint8Array(length);
  await file.seek(position, Deno.SeekMode.Start);
  for (let done = 0; done < length;) {
    const n = await file.read(bytes.subarray(done));
    if (n === null) {
      throw new CacheError(`${path}: ends at byte ${position + done}; it was truncated`);
    }
    done += n;
  }
  return bytes;
}

/** A complete cache opened for training: row metadata in memory, targets read on demand. */
export class TargetCache {
  /** The cache folder. */
  readonly dir: string;
  /** The parsed `manifest.json`. */
  readonly manifest: CacheManifest;
  /** Every row's `CaptionRow.id`, in row order. */
  readonly ids: readonly string[];
  /** Every row's caption text, in row order. */
  readonly captions: readonly string[];
  readonly #shards: OpenShard[];

  private constructor(
    dir: string,
    manifest: CacheManifest,
    shards: OpenShard[],
    ids: string[],
    captions: string[],
  ) {
    this.dir = dir;
    this.manifest = manifest;
    this.#shards = shards;
    this.ids = ids;
    this.captions = captions;
  }

  /** Number of rows. */
  get rows(): number {
    return this.manifest.rows;
  }
  /** Tokens per sequence target. */
  get seqLen(): number {
    return this.manifest.teacher.seqLen;
  }
  /** Features per token of the sequence target. */
  get seqDim(): number {
    return this.manifest.teacher.seqDim;
  }
  /** Features of the pooled target. */
  get pooledDim(): number {
    return this.manifest.teacher.pooledDim;
  }
  /** The teacher the targets came from, as the manifest records it. */
  get teacher(): TeacherRecord {
    return this.manifest.teacher;
  }

  /**
   * Opens `dir/manifest.json` and every shard's header after checking each shard's SHA-256
   * against the manifest; refuses an incomplete or damaged cache.
   */
  static async open(dir: string, options: OpenTargetCacheOptions = {}): Promise<TargetCache> {
    const path = join(dir, MANIFEST_FILE);
    let text: string;
    try {
      text = await Deno.readTextFile(path);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
      const parts = (await readManifests(dir)).length;
      throw new CacheError(
        `${path}: no such file. Fix: ${
          parts
            ? "merge the worker manifests first (deno task cache --merge --out <dir>)"
            : "compute the cache first (deno task cache)"
        }`,
      );
    }
    const manifest = parseManifest(path, text);
    if (!manifest.complete || manifest.shards.length !== manifest.shardCount) {
      throw new CacheError(
        `${path}: the cache is incomplete (${manifest.shards.length} of ${manifest.shardCount} ` +
          `shards). Fix: rerun deno task cache with the same options to finish it.`,
      );
    }
    const layout = layoutOf(manifest.teacher);
    const hashes = await ShardHashCheck.load(dir, options.verifiedShardsFile);
    const shards: OpenShard[] = [];
    const ids: string[] = [];
    const captions: string[] = [];
    for (const entry of manifest.shards) {
      const shardPath = join(dir, entry.file);
      const expected = { start: entry.rows[0], end: entry.rows[1], rowsSha256: entry.rowsSha256 };
      const stat = await Deno.stat(shardPath).catch(() => undefined);
      const inspected = stat?.size !== entry.bytes
        ? `${stat ? `${stat.size} bytes, the manifest says ${entry.bytes}` : "missing"}`
        : await hashes.problem(shardPath, entry.file, entry.sha256, stat) ??
          await inspectShardFile(shardPath, expected, layout);
      if (typeof inspected === "string") {
        throw new CacheError(
          `${shardPath}: ${inspected}. Fix: run deno task cache --verify --out ${dir} to list ` +
            `the damaged shards, delete them and rerun deno task cache --out ${dir} with the ` +
            `same options to compute them again.`,
        );
      }
      const { contents } = inspected;
      shards.push({
        path: shardPath,
        entry,
        ids: contents.ids,
        seq: contents.seq,
        pooled: contents.pooled,
      });
      ids.push(...contents.ids);
      captions.push(...contents.captions);
    }
    await hashes.save();
    return new TargetCache(dir, manifest, shards, ids, captions);
  }

  /**
   * F32 targets of the rows `indices` (in that order). Refuses NaN or infinity, naming the
   * shard file and the row, since training on them would poison the student.
   */
  async readRows(indices: readonly number[]): Promise<TargetRows> {
    const seqRow = this.seqLen * this.seqDim;
    const pooledRow = this.pooledDim;
    const seq = new Float32Array(indices.length * seqRow);
    const pooled = new Float32Array(indices.length * pooledRow);
    const byShard = new Map<number, number[]>();
    indices.forEach((row, at) => {
      if (!Number.isSafeInteger(row) || row < 0 || row >= this.rows) {
        throw new CacheError(
          `${this.dir}: row ${row} is out of range; the cache has ${this.rows} rows`,
        );
      }
      const k = Math.floor(row / this.manifest.rowsPerShard);
      const positions = byShard.get(k);
      if (positions) positions.push(at);
      else byShard.set(k, [at]);
    });
    for (const [k, positions] of byShard) {
      const shard = this.#shards[k];
      const file = await Deno.open(shard.path, { read: true });
      try {
        for (const at of positions) {
          const local = indices[at] - shard.entry.rows[0];
          for (
            const [name, info, out, width] of [["prompt_embeds", shard.seq, seq, seqRow], [
              "pooled",
              shard.pooled,
              pooled,
              pooledRow,
            ]] as const
          ) {
            const bytes = await readAt(
              file,
              shard.path,
              info.byteOffset + local * width * 2,
              width * 2,
            );
            const values = decodeF32(bytes, "F16");
            if (values.some((v) => !Number.isFinite(v))) {
              throw new CacheError(
                `${shard.path}: ${name} of row ${indices[at]} (id ${shard.ids[local]}) holds NaN ` +
                  `or infinity. Fix: delete this shard and rerun deno task cache to compute it again.`,
              );
            }
            out.set(values, at * width);
          }
        }
      } finally {
        file.close();
      }
    }
    return { seq, pooled };
  }
}

/** How `openTargetCache` opens a cache. */
export interface OpenTargetCacheOptions {
  /**
   * A file (in a folder the caller writes) remembering the shards already verified, so the
   * next open of an unchanged cache hashes nothing; without it every shard is hashed.
   */
  verifiedShardsFile?: string;
}

/** Opens a complete, verified target cache for reading (see `TargetCache.open`). */
export function openTargetCache(
  dir: string,
  options: OpenTargetCacheOptions = {},
): Promise<TargetCache> {
  return TargetCache.open(dir, options);
}
