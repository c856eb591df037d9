/**
 * `deno task bench:learn`: does the student learn the prompt, at a size where it can? A small
 * random SDXL teacher (the real CLIP architecture and tokenizer, narrower) over 5,600 real
 * T2I-CompBench training prompts; held out: the T2I-CompBench validation prompts and
 * PartiPrompts, never trained on. One student per variant is trained for the same fixed budget,
 * and its held-out R², retrieval and slices are written as learning curves beside the mean
 * predictor, the word-neighbour reference and chance. Not a test: a measurement whose figures go
 * in the README.
 */
import { join } from "node:path";
import { Gpu } from "../gpu/device.ts";
import { writeFileAtomic } from "../io/atomic.ts";
import { writeRandomQwen3 } from "../models/random_qwen3.ts";
import { type ClipTextShape, writeRandomSdxlTeacherFolder } from "../models/random_sdxl.ts";
import { loadSdxlTeacher } from "../models/sdxl_teacher.ts";
import { readQwenPackageFiles } from "../text/qwen_tokenizer.ts";
import type { HeldOutFigures } from "../train/evaluation.ts";
import { readMetrics } from "../train/metrics.ts";
import { train } from "../train/trainer.ts";
import type { TrainOptions } from "../train/options.ts";
import { type Command, parseCommandArgs, positiveInteger, UsageError } from "./args.ts";
import { runCache } from "../data/cache_job.ts";
import { prepareOut } from "./demo.ts";

const PROMPTS = new URL("../../data/prompts/learn/", import.meta.url);
const MARKER = ".distill-bench-learn";
const CATEGORIES = [
  "3d_spatial",
  "color",
  "complex",
  "non_spatial",
  "numeracy",
  "shape",
  "spatial",
  "texture",
];
const HELD_OUT_FILES = [...CATEGORIES.map((c) => `${c}_val`), "partiprompts"];

/** The real CLIP text architecture and tokenizer, narrower, so thousands of prompts cache fast. */
const TEACHER: Record<"text_encoder" | "text_encoder_2", ClipTextShape> = {
  text_encoder: {
    hiddenSize: 128,
    numLayers: 2,
    numHeads: 2,
    intermediateSize: 256,
    vocabSize: 49408,
    hiddenAct: "quick_gelu",
  },
  text_encoder_2: {
    hiddenSize: 192,
    numLayers: 2,
    numHeads: 3,
    intermediateSize: 256,
    vocabSize: 49408,
    hiddenAct: "gelu",
    projectionDim: 192,
  },
};

const STUDENT = {
  hiddenSize: 256,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 64,
  intermediateSize: 512,
  vocabSize: 151936,
};

/** The ablation: the seed's resampler, the mean start (the default), and learned positions. */
const VARIANTS: Record<string, Pick<TrainOptions, "resampler">> = {
  "mean-start": { resampler: { seqBias: true } },
  "seed": { resampler: { seqBias: false } },
  "mean-start+positions": { resampler: { seqBias: true, numPositions: 96 } },
};

const HELP = `distill bench:learn: does the student learn the prompt? Held-out learning curves.

Usage: deno task bench:learn [--out bench-out/learn] [--steps N] [--variants a,b]

Caches a small random SDXL teacher (CLIP architecture and tokenizer, 128/192 wide) over the
T2I-CompBench training prompts in data/prompts/learn/ (5,600), then trains a small random Qwen3
student (hidden 256) for --steps steps of 32 per variant and evaluates every 50 steps on 100
held-out prompts (T2I-CompBench validation prompts and PartiPrompts, never trained on): R² against
the mean predictor, retrieval among the 100 against chance, the word-neighbour reference, and
per-slice figures. Writes <out>/learn.json and each variant's run folder with report.html.

Options:
  --out <folder>      output folder (default bench-out/learn; replaced on each run)
  --steps <n>         optimizer steps per variant (default 400)
  --variants <list>   comma-separated, from: ${Object.keys(VARIANTS).join(", ")} (default all)
  --keep-cache        reuse the models and the cache of an earlier run in <out> (they are the
                      same on every run); only the variants' run folders are replaced
  -h, --help          show this help`;

interface VariantResult {
  name: string;
  seconds: number;
  curve: Array<Record<string, number | null>>;
  final: HeldOutFigures;
  slices: Record<string, HeldOutFigures>;
}

export async function runBenchLearn(
  { out, steps, variants, keepCache = false }: {
    out: string;
    steps: number;
    variants: string[];
    keepCache?: boolean;
  },
  log: (line: string) => void = (line) => console.log(line),
): Promise<void> {
  for (const v of variants) {
    if (!(v in VARIANTS)) {
      throw new UsageError(
        `bench:learn: unknown variant '${v}'; expected ${Object.keys(VARIANTS)}`,
      );
    }
  }
  // The models and the cache are the same on every run (fixed seeds): --keep-cache reuses them.
  const cached = keepCache &&
    await Deno.stat(join(out, "cache", "manifest.json")).then(() => true, () => false);
  if (cached) {
    for (const v of variants) await Deno.remove(join(out, v), { recursive: true }).catch(() => {});
  } else {
    await prepareOut(out, MARKER, "bench:learn");
  }
  const sdxl = join(out, "models", "sdxl-small-random");
  const qwen = join(out, "models", "qwen3-small-random");
  if (!cached) {
    await writeRandomSdxlTeacherFolder(sdxl, TEACHER, 1);
    await writeRandomQwen3(qwen, STUDENT, { seed: 2, tokenizer: await readQwenPackageFiles() });
  }
  const gpu = await Gpu.create();
  try {
    const cache = join(out, "cache");
    const started = performance.now();
    await runCache(
      { data: PROMPTS.pathname, format: "lines", out: cache, batchSize: 64 },
      () => loadSdxlTeacher(gpu, sdxl),
      (line) => log(`  ${line}`),
    );
    const cacheSeconds = (performance.now() - started) / 1000;
    const results: VariantResult[] = [];
    const path = join(out, "learn.json");
    let references: Record<string, unknown> = {};
    for (const name of variants) {
      log(`variant ${name}: ${steps} steps of 32`);
      const t0 = performance.now();
      const run = join(out, name);
      const result = await train({
        cache,
        qwen,
        out: run,
        batchSize: 32,
        epochs: 1000,
        maxSteps: steps,
        lr: { resampler: 2e-3, lora: 2e-4 },
        warmupRatio: 0.05,
        heldOutFiles: HELD_OUT_FILES,
        evalRows: 100,
        evalEvery: 50,
        checkpointEvery: 0,
        resampler: {
          dim: 256,
          depth: 2,
          heads: 4,
          dimHead: 64,
          ffMult: 2,
          ...VARIANTS[name].resampler,
        },
        lora: { r: 8, alpha: 16, dropout: 0.05 },
        prompt: { mode: "chat", maxTokens: 96 },
      }, {
        gpu,
        log: (line) => log(`  ${line}`),
        onProgress: (p) => {
          if (p.step % 50 === 0) {
            log(`  step ${p.step}/${p.totalSteps}: train loss ${p.loss.toFixed(4)}`);
          }
        },
      });
      const h = result.evalAfter!.heldOut!;
      references = {
        mean_mse_seq: h.meanMseSeq,
        mean_mse_pooled: h.meanMsePooled,
        word_neighbours: h.neighbours,
        chance_top1: h.chanceTop1,
        chance_top5: h.chanceTop5,
      };
      const curve = (await readMetrics(run)).flatMap((r) =>
        r.type === "eval"
          ? [{
            step: r.step,
            r2_seq: r.r2_seq ?? null,
            r2_pooled: r.r2_pooled ?? null,
            top1_seq: r.top1_seq ?? null,
            top1_pooled: r.top1_pooled ?? null,
          }]
          : []
      );
      results.push({
        name,
        seconds: (performance.now() - t0) / 1000,
        curve,
        final: h.student,
        slices: h.slices,
      });
      // Written after every variant, so a run cut short keeps what it finished.
      await writeFileAtomic(
        path,
        JSON.stringify(
          {
            steps,
            batch: 32,
            teacher: TEACHER,
            student: STUDENT,
            held_out_files: HELD_OUT_FILES,
            eval_rows: 100,
            cache_seconds: cacheSeconds,
            references,
            variants: results,
          },
          null,
          2,
        ) + "\n",
      );
    }
    log(`\nheld-out after ${steps} steps (100 prompts never trained on):`);
    const nn = references.word_neighbours as HeldOutFigures;
    const row = (name: string, f: HeldOutFigures) =>
      `  ${name.padEnd(22)} R² seq ${f.r2Seq.toFixed(3)}  pooled ${f.r2Pooled.toFixed(3)}  ` +
      `top-1 seq ${f.top1Seq?.toFixed(2)}  pooled ${f.top1Pooled?.toFixed(2)}`;
    log(
      `  ${
        "mean predictor".padEnd(22)
      } R² seq 0.000  pooled 0.000  top-1 chance ${references.chance_top1}`,
    );
    log(row("word neighbours", nn));
    for (const r of results) log(row(r.name, r.final));
    log(`wrote ${path} and a report.html per variant`);
  } finally {
    gpu.destroy();
  }
}

export const benchLearnCommand: Command = {
  name: "bench:learn",
  summary: "learning benchmark: held-out R² and retrieval of students trained on real prompts",
  async run(args) {
    const { values } = parseCommandArgs("bench:learn", args, {
      out: { type: "string" },
      steps: { type: "string" },
      variants: { type: "string" },
      "keep-cache": { type: "boolean" },
    });
    if (values.help) return console.log(HELP);
    await runBenchLearn({
      out: values.out ?? "bench-out/learn",
      steps: positiveInteger("bench:learn", "--steps", values.steps, 400),
      variants: values.variants?.split(",").map((v) => v.trim()) ?? Object.keys(VARIANTS),
      keepCache: values["keep-cache"] ?? false,
    });
  },
};
