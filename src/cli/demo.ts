/**
 * `deno task demo`: the whole pipeline on models small enough to run on a CPU in minutes.
 * A tiny random SDXL teacher (real widths, so outputs have SDXL's shapes) and a tiny random
 * Qwen3 student, both with the real tokenizers, over a few hundred real prompts: cache the
 * teacher's targets, train LoRA + resampler, encode a prompt, write the report.
 */
import { join } from "node:path";
import { Gpu } from "../gpu/device.ts";
import { prepareOutputFolder } from "../io/output_path.ts";
import { writeRandomQwen3 } from "../models/random_qwen3.ts";
import { type ClipTextShape, writeRandomSdxlTeacherFolder } from "../models/random_sdxl.ts";
import { loadSdxlTeacher } from "../models/sdxl_teacher.ts";
import { readQwenPackageFiles } from "../text/qwen_tokenizer.ts";
import { describeHeldOut } from "../train/evaluation.ts";
import type { EvalResult } from "../train/evaluation.ts";
import { train } from "../train/trainer.ts";
import { type Command, parseCommandArgs, positiveInteger, UsageError } from "./args.ts";
import { runCache } from "../data/cache_job.ts";
import { runEncode } from "../train/encode_file.ts";

const PROMPTS = new URL("../../data/prompts/demo_prompts.txt", import.meta.url);
const MARKER = ".distill-demo";
const DEMO_PROMPT = "a red cube to the left of a blue sphere, no people";

/** Real SDXL widths (768 + 1280 = 2048 and a 1280 projection), two layers, narrow MLPs. */
const DEMO_TEACHER: Record<"text_encoder" | "text_encoder_2", ClipTextShape> = {
  text_encoder: {
    hiddenSize: 768,
    numLayers: 2,
    numHeads: 12,
    intermediateSize: 256,
    vocabSize: 49408,
    hiddenAct: "quick_gelu",
  },
  text_encoder_2: {
    hiddenSize: 1280,
    numLayers: 2,
    numHeads: 20,
    intermediateSize: 256,
    vocabSize: 49408,
    hiddenAct: "gelu",
    projectionDim: 1280,
  },
};

/**
 * Hidden 256: at 64 the student's states hold too little of each word for the sequence to
 * reach R² 0.1 in the demo's steps (0.075 at 40 steps, against 0.115 at 256; README).
 */
const DEMO_STUDENT = {
  hiddenSize: 256,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 64,
  intermediateSize: 512,
  vocabSize: 151936,
};

const DEFAULT_STEPS = 60;

const HELP = `distill demo: the whole pipeline on tiny random models, in a few minutes on a CPU.

Usage: deno task demo [--out demo-out] [--steps N] [--limit N]

It writes a tiny random SDXL teacher and a tiny random Qwen3 student (with the real CLIP and
Qwen3 tokenizers), caches the teacher's targets for 256 real prompts
(data/prompts/demo_prompts.txt), trains LoRA + resampler on 90% of them, and ends with the
held-out figures on the other 10% (prompts it never trained on) beside the best predictor
that ignores the prompt (the mean target: R² 0) and chance. It encodes a prompt and writes:
  <out>/conditioning.safetensors   prompt_embeds [1, 77, 2048], pooled_prompt_embeds [1, 1280]
                                   and the negative pair, as diffusers' SDXL pipeline takes them
  <out>/run/report.html            the training report (open it in a browser)
The teacher is random, so the figures show that the student learns how a teacher's output
depends on the prompt, not what a real SDXL student reaches.

Options:
  --out <folder>   output folder (default demo-out; replaced on each run)
  --steps <n>      optimizer steps (default ${DEFAULT_STEPS})
  --limit <n>      use only the first n prompts (default: all 256)
  -h, --help       show this help`;

/**
 * Empties `out` for a new run of `command`, refusing a folder that `command` did not make (it
 * holds the `marker` file when it did).
 */
export async function prepareOut(out: string, marker = MARKER, command = "demo"): Promise<void> {
  let entries: string[] = [];
  try {
    entries = (await Array.fromAsync(Deno.readDir(out))).map((e) => e.name);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  if (entries.length > 0 && !entries.includes(marker)) {
    throw new UsageError(
      `${command}: ${out} exists and was not made by the ${command}; pass an empty or new ` +
        `--out folder`,
    );
  }
  await Deno.remove(out, { recursive: true }).catch(() => {});
  await prepareOutputFolder(out);
  await Deno.writeTextFile(
    join(out, marker),
    `made by distill ${command}; deleted on its next run\n`,
  );
}

export interface DemoResult {
  evalBefore: EvalResult | null;
  evalAfter: EvalResult | null;
  conditioning: string;
  report: string;
}

export interface DemoOptions {
  out: string;
  steps: number;
  /** Only the first n prompts (default: all 256). */
  limit?: number;
}

export async function runDemo(
  { out, steps, limit }: DemoOptions,
  log: (line: string) => void = (line) => console.log(line),
): Promise<DemoResult> {
  const started = performance.now();
  const elapsed = () => `${((performance.now() - started) / 1000).toFixed(0)} s`;
  await prepareOut(out);
  log(
    "distill demo: tiny RANDOM models with the real tokenizers and real prompts. It shows that\n" +
      "caching, training and encoding work end to end, and that the student learns how the\n" +
      "teacher's output depends on the prompt (measured on prompts it never trained on); it\n" +
      "says nothing about the quality of a real SDXL student.",
  );
  const sdxl = join(out, "models", "sdxl-tiny-random");
  const qwen = join(out, "models", "qwen3-tiny-random");
  log(
    `[1/5] writing a random SDXL teacher (CLIP-L 768 + bigG 1280 wide, 2 layers each) to ${sdxl}`,
  );
  await writeRandomSdxlTeacherFolder(sdxl, DEMO_TEACHER, 1);
  log(
    `[2/5] writing a random Qwen3 student (hidden 64, 2 layers, 151936-token vocabulary) to ${qwen}`,
  );
  await writeRandomQwen3(qwen, DEMO_STUDENT, { seed: 2, tokenizer: await readQwenPackageFiles() });

  const gpu = await Gpu.create();
  try {
    const cache = join(out, "cache");
    log(`[3/5] caching the teacher's targets for the prompts in data/prompts/demo_prompts.txt`);
    const manifest = await runCache(
      { data: PROMPTS.pathname, format: "lines", out: cache, batchSize: 16, limit },
      () => loadSdxlTeacher(gpu, sdxl),
      (line) => log(`      ${line}`),
    );
    log(`      ${manifest.rows} rows cached (${elapsed()} so far)`);

    const run = join(out, "run");
    log(`[4/5] training LoRA + resampler for ${steps} steps`);
    const result = await train(
      {
        cache,
        qwen,
        out: run,
        batchSize: 16,
        epochs: 100,
        maxSteps: steps,
        lr: { resampler: 2e-3, lora: 2e-4 },
        warmupRatio: 0.05,
        heldOutFraction: 0.1,
        evalEvery: 20,
        checkpointEvery: 0,
        resampler: { dim: 128, depth: 1, heads: 4, dimHead: 32, ffMult: 2 },
        lora: { r: 8, alpha: 16, dropout: 0.05 },
        prompt: { mode: "chat", maxTokens: 96 },
      },
      {
        gpu,
        log: (line) => log(`      ${line}`),
        onProgress: (p) => {
          if (p.step % 10 === 0 || p.step === p.totalSteps) {
            log(`      step ${p.step}/${p.totalSteps}: train loss ${p.loss.toFixed(4)}`);
          }
        },
      },
    );

    const conditioning = join(out, "conditioning.safetensors");
    log(`[5/5] encoding "${DEMO_PROMPT}"`);
    await runEncode(
      {
        qwen,
        adapter: result.adapterDir,
        prompts: [DEMO_PROMPT],
        out: conditioning,
        format: "safetensors",
        dtype: "f16",
        batchSize: 1,
      },
      (line) => log(`      ${line}`),
    );
    const report = join(run, "report.html");
    log(
      `done in ${elapsed()}:\n  ${conditioning}  (prompt_embeds [1, 77, 2048], ` +
        `pooled_prompt_embeds [1, 1280], negative_* zeros)\n  ${report}  (training report)`,
    );
    // Last, what the demo is for: did the student learn the prompt?
    const heldOut = result.evalAfter?.heldOut;
    if (heldOut) {
      log(
        `did it learn the prompt? On ${heldOut.student.rows} held-out prompts after ${steps} steps:`,
      );
      for (const line of describeHeldOut(heldOut)) log(`  ${line}`);
    }
    return { evalBefore: result.evalBefore, evalAfter: result.evalAfter, conditioning, report };
  } finally {
    gpu.destroy();
  }
}

export const demoCommand: Command = {
  name: "demo",
  summary: "run cache, train and encode end to end on tiny random models (a few minutes on a CPU)",
  async run(args) {
    const { values } = parseCommandArgs("demo", args, {
      out: { type: "string" },
      steps: { type: "string" },
      limit: { type: "string" },
    });
    if (values.help) return console.log(HELP);
    await runDemo({
      out: values.out ?? "demo-out",
      steps: positiveInteger("demo", "--steps", values.steps, DEFAULT_STEPS),
      limit: values.limit === undefined
        ? undefined
        : positiveInteger("demo", "--limit", values.limit, 0),
    });
  },
};
