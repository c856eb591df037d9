/**
 * A deterministic stand-in for the SDXL teacher: each caption's targets are drawn from a
 * generator seeded by the caption's hash, so they depend on the caption alone (not on the batch
 * it came in), like the real encoders. Small dims keep cache tests fast.
 */
import { join } from "node:path";
import { captionHash, type CaptionRow } from "../../src/data/captions.ts";
import type { Teacher } from "../../src/models/teacher.ts";
import { Rng } from "../../src/util/rng.ts";

export interface FakeTeacherOptions {
  seqLen?: number;
  seqDim?: number;
  pooledDim?: number;
  /** Identity entries to add or override (e.g. another weight file hash). */
  identity?: Record<string, string>;
  /**
   * On the batch after this many, prints `ready <batches>` to stdout and blocks until the
   * process is killed, so a parent kills it at a known point rather than after a guessed time.
   */
  haltAfterBatches?: number;
  /** Throws on the batch after this many, as a crashing GPU would. */
  failAfterBatches?: number;
  /** Puts `value` into this caption's seq targets. */
  poison?: { caption: string; value: number };
}

export interface FakeTeacher extends Teacher {
  /** Captions encoded so far. */
  encoded: number;
}

export function fakeTeacher(options: FakeTeacherOptions = {}): FakeTeacher {
  const { seqLen = 77, seqDim = 16, pooledDim = 8 } = options;
  let batches = 0;
  let inFlight = 0;
  const teacher: FakeTeacher = {
    identity: {
      "text_encoder/model.safetensors": "sha256:fake-l",
      "text_encoder_2/model.safetensors": "sha256:fake-g",
      ...options.identity,
    },
    tokenizer: { max_length: seqLen, pad_id: 49407, pad_id_2: 0 },
    seqLen,
    seqDim,
    pooledDim,
    encoded: 0,
    async encode(captions) {
      if (options.haltAfterBatches !== undefined && batches >= options.haltAfterBatches) {
        Deno.stdout.writeSync(new TextEncoder().encode(`ready ${batches}\n`));
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
      }
      if (options.failAfterBatches !== undefined && batches >= options.failAfterBatches) {
        throw new Error("fake teacher: device lost");
      }
      batches++;
      // The cache overlaps its CPU work with the next batch, but never runs two batches at once.
      if (++inFlight > 1) throw new Error("fake teacher: encode called while a batch is running");
      await new Promise((resolve) => setTimeout(resolve, 0));
      inFlight--;
      const seq = new Float32Array(captions.length * seqLen * seqDim);
      const pooled = new Float32Array(captions.length * pooledDim);
      captions.forEach((caption, b) => {
        const rng = new Rng(parseInt(captionHash(caption).slice(0, 8), 16));
        for (let i = 0; i < seqLen * seqDim; i++) seq[b * seqLen * seqDim + i] = rng.uniform(-8, 8);
        for (let i = 0; i < pooledDim; i++) pooled[b * pooledDim + i] = rng.uniform(-2, 2);
        if (options.poison?.caption === caption) {
          seq[b * seqLen * seqDim + 5] = options.poison.value;
        }
      });
      teacher.encoded += captions.length;
      return { seq, pooled };
    },
  };
  return teacher;
}

/** `n` distinct caption rows as `readCaptions` would give them for a .jsonl file. */
export function sampleRows(n: number, file = "captions.jsonl"): CaptionRow[] {
  return Array.from({ length: n }, (_, i) => ({
    id: `${file}:${i + 1}`,
    caption: `a photo of ${i} red cubes left of ${i % 7} blue spheres`,
    source: file,
  }));
}

/** Writes `sampleRows(n)` as a .jsonl data set in `dir`; returns its path. */
export async function writeSampleJsonl(dir: string, n: number): Promise<string> {
  const path = join(dir, "captions.jsonl");
  const lines = sampleRows(n).map((row) => JSON.stringify({ caption: row.caption }));
  await Deno.writeTextFile(path, lines.join("\n") + (n ? "\n" : ""));
  return path;
}

/** Every file of `dir` (names sorted) with its bytes, for byte-for-byte comparisons. */
export async function readTree(dir: string): Promise<Map<string, Uint8Array>> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(dir)) names.push(entry.name);
  const files = new Map<string, Uint8Array>();
  for (const name of names.sort()) files.set(name, await Deno.readFile(join(dir, name)));
  return files;
}
