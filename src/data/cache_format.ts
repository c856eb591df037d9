/**
 * The target cache's format (datasets.md, "Target cache"): the manifest (which teacher, which
 * rows, which finished shards), shard names and layout, and reading back a shard's header to
 * check it is whole and holds the rows it should.
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import { writeFileAtomic } from "../io/atomic.ts";
import { SafetensorsFile, type TensorInfo } from "../io/safetensors.ts";
import type { JsonScalar, Teacher } from "../models/teacher.ts";
import { captionHash, type CaptionRow } from "./captions.ts";

/** The `format` of a cache manifest; other values are refused. */
export const CACHE_FORMAT = "distill-target-cache";

/** The manifest `version` this code writes and reads. */
export const CACHE_VERSION = 1;

export const MANIFEST_FILE = "manifest.json";

export const DEFAULT_ROWS_PER_SHARD = 256;

/** The `format` value in each shard's `__metadata__`. */
export const SHARD_FORMAT = `${CACHE_FORMAT}/${CACHE_VERSION}`;

export const HASH_BYTES = 32;

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
export function canonicalJson(value: unknown): string {
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
export function teacherSha256(record: TeacherRecord): string {
  return sha256Hex(canonicalJson(record));
}

/** Where two teacher records differ, one line per key, naming both values. */
export function teacherDifferences(cached: TeacherRecord, current: TeacherRecord): string[] {
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

export function checkSameTeacher(
  path: string,
  cached: TeacherRecord,
  current: TeacherRecord,
): void {
  const differences = teacherDifferences(cached, current);
  if (differences.length === 0) return;
  throw new CacheError(
    `${path} holds targets of another teacher:\n  ${differences.join("\n  ")}\n` +
      `Targets of different teachers must not be mixed. Fix: use a new --out folder for this ` +
      `teacher (or the --sdxl folder this cache was made from).`,
  );
}

export function checkSameRows(
  path: string,
  cached: CacheManifest,
  rows: number,
  rowsSha256: string,
) {
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
export function parseManifest(path: string, text: string): CacheManifest {
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

export interface FoundManifest {
  path: string;
  manifest: CacheManifest;
}

/** manifest.json first, then the worker parts by count and index; none for a missing folder. */
export async function readManifests(dir: string): Promise<FoundManifest[]> {
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

export interface ShardPlan {
  index: number;
  file: string;
  start: number;
  end: number;
  rowsSha256: string;
}

export function planShards(
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

export function shardEntry(plan: ShardPlan, bytes: number, sha256: string): CacheShardEntry {
  return {
    index: plan.index,
    file: plan.file,
    rows: [plan.start, plan.end],
    bytes,
    sha256,
    rowsSha256: plan.rowsSha256,
  };
}

export async function writeManifest(dir: string, manifest: CacheManifest): Promise<void> {
  manifest.shards.sort((a, b) => a.index - b.index);
  const name = manifestFileName(manifest.worker);
  await writeFileAtomic(join(dir, name), JSON.stringify(manifest, null, 2) + "\n");
}

/** Removes the part manifests that a complete manifest.json supersedes. */
export async function removePartManifests(found: readonly FoundManifest[]): Promise<void> {
  for (const { path, manifest } of found) {
    if (manifest.worker) await Deno.remove(path).catch(() => undefined);
  }
}

export function hexToBytes(hex: string, out: Uint8Array, at: number): void {
  for (let i = 0; i < HASH_BYTES; i++) out[at + i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
}

function bytesToHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Index of the first F16 NaN or infinity (exponent bits all ones) in `bits`, or -1. */
export function firstNonFiniteF16(bits: Uint16Array): number {
  for (let i = 0; i < bits.length; i++) if ((bits[i] & 0x7c00) === 0x7c00) return i;
  return -1;
}

/** F16 bit patterns of little-endian bytes, independent of host byte order. */
export function f16Bits(bytes: Uint8Array): Uint16Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const bits = new Uint16Array(bytes.byteLength / 2);
  for (let i = 0; i < bits.length; i++) bits[i] = view.getUint16(2 * i, true);
  return bits;
}

export interface ShardLayout {
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
export async function inspectShardFile(
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

export function layoutOf(record: TeacherRecord): ShardLayout {
  return {
    teacherSha256: teacherSha256(record),
    seqLen: record.seqLen,
    seqDim: record.seqDim,
    pooledDim: record.pooledDim,
  };
}

export function checkWorker(worker: CacheWorker): void {
  const { index, count } = worker;
  if (
    !Number.isSafeInteger(count) || count < 1 || !Number.isSafeInteger(index) || index < 0 ||
    index >= count
  ) {
    throw new CacheError(`worker ${index}/${count}: expected i/n with 0 <= i < n`);
  }
}
