/**
 * The student at the bench config (hidden 1024, 8 layers, 16/8 heads x 64, intermediate 3072,
 * vocab 4096, 256 tokens; resampler at its defaults): forward with NF4 weights (decoded to f32,
 * and to f16), forward with f32 weights, and one distillation step (NF4 + LoRA r16 on q/k/v/o + resampler, batch 1, no
 * checkpointing), the same work as PyTorch's `torch_student.py`, whose JSON `--torch` reads.
 *
 * The random checkpoint is written once (BF16) under bench-out/ and reused.
 */
import { join } from "node:path";
import { ModelFolder } from "../io/hf.ts";
import { DEFAULT_LORA_CONFIG, destroyLora, initLora } from "../models/lora.ts";
import { qwen3Forward, type TokenBatch } from "../models/qwen3.ts";
import {
  destroyQwen3Weights,
  type LoadQwen3Options,
  loadQwen3Weights,
  type Qwen3Config,
  qwen3LinearShapes,
  type Qwen3Weights,
} from "../models/qwen3_weights.ts";
import { writeRandomQwen3 } from "../models/random_qwen3.ts";
import { destroyResampler, initResampler } from "../models/resampler_weights.ts";
import { RESAMPLER_DEFAULTS } from "../models/resampler_config.ts";
import { Rng } from "../util/rng.ts";
import { DistillStep, type MicroBatch } from "../train/step.ts";
import type { Gpu, GpuStats } from "../gpu/device.ts";
import type { Bench, BenchResult } from "./harness.ts";
import { maxRssBytes, PeakMemory } from "./scale_report.ts";

export const STUDENT_BENCH_CONFIG: Readonly<Qwen3Config> = {
  hiddenSize: 1024,
  numLayers: 8,
  numHeads: 16,
  numKvHeads: 8,
  headDim: 64,
  intermediateSize: 3072,
  vocabSize: 4096,
  ropeTheta: 1e6,
  rmsNormEps: 1e-6,
};

export const STUDENT_BENCH_TOKENS = 256;

/** Where the random bench checkpoint lives (inside the project: the task writes only there). */
export const STUDENT_BENCH_DIR = "bench-out/student-bench-qwen3";

/** What `python3 torch_student.py` prints. */
export interface TorchStudentTimes {
  tokens: number;
  fwd_f32_s: number;
  train_step_s: number;
  /**
   * PyTorch's f32 matmul 1024³ in GFLOP/s (OpenBLAS, what numpy uses too), from the JSON that
   * torch_baseline.py prints first when torch_student.py imports it; absent if it did not.
   */
  matmul1024Gflops?: number;
}

/** Reads and checks the JSON `torch_student.py` printed (flag `--torch`). */
export async function readTorchStudentTimes(path: string): Promise<TorchStudentTimes> {
  let json: unknown;
  let baseline: { torch_matmul_1024_gflops?: unknown } | undefined;
  try {
    // The script's last line: it imports torch_baseline.py, which prints its own JSON first.
    const lines = (await Deno.readTextFile(path)).trim().split("\n");
    json = JSON.parse(lines.at(-1) ?? "");
    const before = lines.slice(0, -1).join("\n").trim();
    if (before) baseline = JSON.parse(before);
  } catch (error) {
    throw new Error(
      `--torch ${path}: ${(error as Error).message}; pass the JSON that ` +
        "`python3 torch_student.py > FILE` printed, saved inside the project " +
        "(e.g. bench-out/torch_student.json: the task reads only there)",
    );
  }
  const t = json as Partial<TorchStudentTimes>;
  for (const key of ["tokens", "fwd_f32_s", "train_step_s"] as const) {
    if (typeof t?.[key] !== "number" || !(t[key]! > 0)) {
      throw new Error(`--torch ${path}: "${key}" is missing or not a positive number`);
    }
  }
  if (t.tokens !== STUDENT_BENCH_TOKENS) {
    throw new Error(
      `--torch ${path}: measured at ${t.tokens} tokens; the student bench runs ` +
        `${STUDENT_BENCH_TOKENS} (run torch_student.py without --tokens)`,
    );
  }
  const gflops = baseline?.torch_matmul_1024_gflops;
  return {
    ...(t as TorchStudentTimes),
    ...(typeof gflops === "number" && gflops > 0 ? { matmul1024Gflops: gflops } : {}),
  };
}

async function ensureCheckpoint(dir: string): Promise<void> {
  if (await Deno.stat(join(dir, "config.json")).catch(() => null)) return;
  console.error(`writing the random bench Qwen3 (BF16) to ${dir} ...`);
  await writeRandomQwen3(dir, STUDENT_BENCH_CONFIG, { seed: 5, dtype: "BF16" });
}

async function loadWeights(gpu: Gpu, dir: string, options: LoadQwen3Options) {
  const folder = await ModelFolder.open(dir);
  try {
    return await loadQwen3Weights(gpu, folder, options);
  } finally {
    folder.close();
  }
}

/**
 * The default LoRA (r 16 on q/k/v/o) and a resampler at its defaults, both freshly initialised,
 * on `qwen`, with a DistillStep at the default learning rates: what the benchmarks train.
 */
export function trainableStudent(
  gpu: Gpu,
  qwen: Qwen3Weights,
  rng: Rng,
  options: { gradientCheckpointing: boolean },
) {
  const lora = initLora(
    gpu,
    qwen3LinearShapes(qwen.config),
    qwen.config.numLayers,
    { ...DEFAULT_LORA_CONFIG },
    rng,
  );
  const resamplerConfig = { dimIn: qwen.config.hiddenSize, ...RESAMPLER_DEFAULTS };
  const resampler = initResampler(gpu, resamplerConfig, rng);
  const step = new DistillStep(
    gpu,
    { qwen, lora, resampler },
    { lr: { resampler: 1e-4, lora: 2e-5 }, weightDecay: 0.01, maxGradNorm: 1 },
    options,
  );
  return { lora, resampler, resamplerConfig, step };
}

/** Seconds of each of `reps` calls after one warm-up call (which compiles the pipelines). */
async function timeSeconds(reps: number, run: () => Promise<void>): Promise<number[]> {
  await run();
  const seconds: number[] = [];
  for (let r = 0; r < reps; r++) {
    const start = performance.now();
    await run();
    seconds.push((performance.now() - start) / 1000);
  }
  return seconds;
}

/** One result row: median seconds, the spread, tokens/s, GPU counters per call. */
function row(
  peak: PeakMemory,
  name: string,
  seconds: number[],
  counters: CallCounters,
  torchSeconds: number | undefined,
): BenchResult {
  const sorted = [...seconds].sort((a, b) => a - b);
  const s = sorted[sorted.length >> 1];
  return {
    name,
    ms: s * 1000,
    seconds: s,
    minSeconds: sorted[0],
    maxSeconds: sorted.at(-1),
    tokensPerSecond: STUDENT_BENCH_TOKENS / s,
    dispatches: counters.dispatches,
    submits: counters.submits,
    readbacks: counters.readbacks,
    bindGroupsCreated: counters.bindGroupsCreated,
    buffersCreated: counters.buffersCreated,
    peakRssBytes: peak.rss,
    peakGpuPoolBytes: peak.gpuPool,
    ...(torchSeconds === undefined ? {} : { torchSeconds, vsTorch: s / torchSeconds }),
  };
}

type CallCounters = Pick<
  GpuStats,
  "dispatches" | "submits" | "readbacks" | "bindGroupsCreated" | "buffersCreated"
>;

/** Dispatches, submits, readbacks, bind groups and buffers created in one call of `run`. */
async function countCalls(gpu: Gpu, run: () => Promise<void>): Promise<CallCounters> {
  const before = gpu.stats;
  await run();
  const after = gpu.stats;
  const delta = (key: keyof CallCounters) => after[key] - before[key];
  return {
    dispatches: delta("dispatches"),
    submits: delta("submits"),
    readbacks: delta("readbacks"),
    bindGroupsCreated: delta("bindGroupsCreated"),
    buffersCreated: delta("buffersCreated"),
  };
}

/** Kernels listed in the step profile; the rest are summed in one row. */
const PROFILE_ROWS = 12;

/**
 * GPU time per kernel over one more training step, each dispatch timed in a pass of its own
 * (src/gpu/profile.ts): rows `student_step_kernel`, longest first, with their share of the
 * step's GPU time. Timed apart from the step's wall time, which the extra passes would inflate.
 */
async function stepProfile(gpu: Gpu, train: () => Promise<void>): Promise<BenchResult[]> {
  gpu.startProfile();
  await train();
  const profile = await gpu.stopProfile();
  const shown = profile.kernels.slice(0, PROFILE_ROWS);
  const rest = profile.kernels.slice(PROFILE_ROWS);
  if (rest.length > 0) {
    shown.push({
      kernel: `${rest.length} other kernels`,
      seconds: rest.reduce((s, k) => s + k.seconds, 0),
      calls: rest.reduce((n, k) => n + k.calls, 0),
    });
  }
  return shown.map((k) => ({
    name: "student_step_kernel",
    kernel: k.kernel,
    calls: k.calls,
    share: k.seconds / profile.seconds,
    ms: k.seconds * 1000,
    ...(profile.untimed > 0 ? { untimedDispatches: profile.untimed } : {}),
  }));
}

export const studentBench: Bench = {
  name: "student",
  summary: "the bench-config student: forward NF4, forward f32, one training step",
  async run({ gpu, torch }) {
    await ensureCheckpoint(STUDENT_BENCH_DIR);
    const reps = 3;
    const rng = new Rng(3);
    const tokens: TokenBatch = {
      ids: Int32Array.from(
        { length: STUDENT_BENCH_TOKENS },
        () => Math.floor(rng.next() * STUDENT_BENCH_CONFIG.vocabSize),
      ),
      lengths: [STUDENT_BENCH_TOKENS],
      batch: 1,
      seqLen: STUDENT_BENCH_TOKENS,
    };
    const peak = new PeakMemory(gpu);
    const results: BenchResult[] = [];
    try {
      const forward = (weights: Qwen3Weights) => async () => {
        const out = qwen3Forward(gpu, weights, tokens);
        await gpu.read(out);
        out.destroy();
        peak.sample();
      };
      // NF4 decoded to exact f32 for the products (the default), to f16, and f32 weights.
      const variants: Array<[string, LoadQwen3Options]> = [
        ["student_forward_nf4", { quantize: "nf4" }],
        ["student_forward_nf4_f16", { quantize: "nf4", nf4Decode: "f16" }],
        ["student_forward_f32", { quantize: "none" }],
      ];
      for (const [name, options] of variants) {
        const weights = await loadWeights(gpu, STUDENT_BENCH_DIR, options);
        peak.reset();
        const seconds = await timeSeconds(reps, forward(weights));
        const counters = await countCalls(gpu, forward(weights));
        results.push({
          ...row(peak, name, seconds, counters, torch?.fwd_f32_s),
          weightGpuBytes: weights.gpuBytes,
        });
        destroyQwen3Weights(weights);
      }

      const qwen = await loadWeights(gpu, STUDENT_BENCH_DIR, { quantize: "nf4" });
      const { lora, resampler, resamplerConfig, step } = trainableStudent(gpu, qwen, rng, {
        gradientCheckpointing: false,
      });
      const micro: MicroBatch = {
        tokens,
        targetSeq: rng.fillNormal(
          new Float32Array(resamplerConfig.numQueries * resamplerConfig.dimSeq),
        ),
        targetPooled: rng.fillNormal(new Float32Array(resamplerConfig.dimPooled)),
      };
      peak.reset();
      let calls = 0;
      const train = async () => {
        const r = await step.step([micro], 1, calls++);
        peak.sample();
        if (!Number.isFinite(r.loss)) throw new Error(`student bench: training loss ${r.loss}`);
      };
      const seconds = await timeSeconds(reps, train);
      const counters = await countCalls(gpu, train);
      results.push(row(peak, "student_train_step", seconds, counters, torch?.train_step_s));
      if (gpu.features.timestampQuery) results.push(...await stepProfile(gpu, train));
      step.destroy();
      destroyLora(lora);
      destroyResampler(resampler);
      destroyQwen3Weights(qwen);
      for (const r of results) r.maxRssBytes = maxRssBytes();
      return results;
    } finally {
      peak.stop();
    }
  },
};
