/**
 * The target cache as training reads it (the format is in cache_format.ts, building in
 * cache_build.ts, merging and verifying in cache_merge.ts). The cache holds the SDXL teacher's
 * outputs (prompt_embeds, pooled) for every caption of a data set, stored as F16 safetensors
 * shards beside a manifest, so training reads targets instead of running the two CLIP encoders. The format is documented in datasets.md
 * ("Target cache").
 *
 * Everything written is deterministic (the same rows and teacher give the same bytes) and
 * atomic (temp file + rename), so a run killed at any point resumes without recomputing
 * finished shards and never leaves a partial one. Shard boundaries depend only on the row
 * count and rows per shard, so `n` workers can each compute the shards `k % n == i` and their
 * manifests merge into the one an undivided run writes.
 */
import { join } from "node:path";
import { decodeF32 } from "../io/dtype.ts";
import type { TensorInfo } from "../io/safetensors.ts";
import {
  CacheError,
  type CacheManifest,
  type CacheShardEntry,
  inspectShardFile,
  layoutOf,
  MANIFEST_FILE,
  parseManifest,
  readManifests,
  type TeacherRecord,
} from "./cache_format.ts";
import { ShardHashCheck } from "./cache_verify.ts";

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
