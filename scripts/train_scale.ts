/**
 * Training scale check (not in CI): distillation steps at the real sizes.
 *
 * Loads the random Qwen3-4B that scripts/student_scale.ts writes (NF4), adds LoRA (the default
 * config: r 16 on q/k/v/o) and a resampler at its defaults (dimIn 2560), and runs `--steps`
 * optimizer steps of batch 1 (one `--tokens`-token prompt) with gradient checkpointing against
 * random teacher targets of the real shapes ([1, 77, 2048] and [1, 1280]). Reports seconds per
 * sample, peak host RSS and the GPU memory high-water mark, and appends
 * `{name: "train_scale", ...}` to `--json`.
 *
 *   deno run --allow-read --allow-write --allow-env scripts/train_scale.ts \
 *     --qwen /tmp/distill-qwen3-4b [--json bench-out/scale.json] [--tokens 32] [--steps 3]
 *
 * On a CPU adapter GPU buffers are host memory, so RSS includes the GPU bytes.
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  appendBenchEntry,
  maxRssBytes,
  PeakMemory,
  scriptHelp,
} from "../src/bench/scale_report.ts";
import { adapterReport } from "../src/gpu/adapter_report.ts";
import { Gpu } from "../src/gpu/device.ts";
import { ModelFolder } from "../src/io/hf.ts";
import { destroyLora } from "../src/models/lora.ts";
import { destroyQwen3Weights, loadQwen3Weights } from "../src/models/qwen3_weights.ts";
import { destroyResampler, resamplerParamCount } from "../src/models/resampler_weights.ts";
import { trainableStudent } from "../src/bench/student.ts";
import { loadQwenTokenizer } from "../src/text/qwen_tokenizer.ts";
import { Rng } from "../src/util/rng.ts";
import type { MicroBatch } from "../src/train/step.ts";

const PROMPT = "A watercolour of a red fox curled asleep in fresh snow beneath a birch tree, " +
  "soft morning light, pale blue shadows, a few falling snowflakes, delicate brush strokes, " +
  "muted palette, minimalist composition with generous white space, Japanese woodblock " +
  "influence, highly detailed fur, calm and quiet winter atmosphere, fine art print";

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(0)} MiB`;

export interface TrainScaleStep {
  seconds: number;
  loss: number;
  gradNorm: number;
}

export interface TrainScaleResult {
  name: "train_scale";
  date: string;
  adapter: string;
  tokens: number;
  batch: 1;
  gradientCheckpointing: true;
  loraParams: number;
  resamplerParams: number;
  loadSeconds: number;
  steps: TrainScaleStep[];
  /** Mean over the steps after the first (which compiles the pipelines); the first if alone. */
  secondsPerSample: number;
  /** Highest sampled RSS and GPU bytes during the steps (after the model was loaded). */
  peakRssStepBytes: number;
  peakGpuLiveBytes: number;
  /** Live tensors plus freed buffers the pool keeps. */
  peakGpuPoolBytes: number;
  /** GPU bytes after the student and the optimizer state were set up, before any step. */
  gpuLiveBeforeStepsBytes: number;
  /** The process's true peak RSS at the end (ru_maxrss, VmHWM). */
  maxRssBytes: number;
}

async function run(dir: string, tokens: number, steps: number): Promise<TrainScaleResult> {
  const gpu = await Gpu.create();
  const peak = new PeakMemory(gpu);
  const rng = new Rng(11);
  try {
    const folder = await ModelFolder.open(dir);
    const loadStart = performance.now();
    const qwen = await loadQwen3Weights(gpu, folder, { onTensor: () => peak.sample() });
    const loadSeconds = (performance.now() - loadStart) / 1000;
    folder.close();
    console.error(`loaded the NF4 Qwen3 in ${loadSeconds.toFixed(1)} s, RSS ${mib(peak.rss)}`);

    const { lora, resampler, resamplerConfig, step } = trainableStudent(gpu, qwen, rng, {
      gradientCheckpointing: true,
    });
    await gpu.sync();
    const gpuLiveBeforeStepsBytes = gpu.stats.liveBytes;

    const tokenizer = await loadQwenTokenizer(dir);
    const { ids } = tokenizer.encode(PROMPT, { maxTokens: tokens });
    if (ids.length !== tokens) {
      throw new Error(`the prompt gives ${ids.length} tokens, fewer than --tokens ${tokens}`);
    }
    const { numQueries, dimSeq, dimPooled } = resamplerConfig;
    const micro: MicroBatch = {
      tokens: { ids, lengths: [tokens], batch: 1, seqLen: tokens },
      targetSeq: rng.fillNormal(new Float32Array(numQueries * dimSeq)),
      targetPooled: rng.fillNormal(new Float32Array(dimPooled)),
    };

    peak.reset();
    const results: TrainScaleStep[] = [];
    for (let s = 0; s < steps; s++) {
      const start = performance.now();
      const r = await step.step([micro], 1, s);
      peak.sample();
      const seconds = (performance.now() - start) / 1000;
      if (!Number.isFinite(r.loss) || !Number.isFinite(r.gradNorm.total)) {
        throw new Error(`step ${s}: loss ${r.loss}, grad norm ${r.gradNorm.total}`);
      }
      results.push({ seconds, loss: r.loss, gradNorm: r.gradNorm.total });
      console.error(
        `step ${s}: ${seconds.toFixed(1)} s, loss ${r.loss.toFixed(4)}, grad norm ` +
          `${r.gradNorm.total.toFixed(3)}, RSS peak ${mib(peak.rss)}, GPU live peak ` +
          `${mib(peak.gpuLive)}`,
      );
    }
    const timed = results.length > 1 ? results.slice(1) : results;
    const loraParams = [...lora.pairs.values()]
      .reduce((sum, p) => sum + p.a.size + p.b.size, 0);
    step.destroy();
    destroyLora(lora);
    destroyResampler(resampler);
    destroyQwen3Weights(qwen);
    return {
      name: "train_scale",
      date: new Date().toISOString(),
      adapter: adapterReport(gpu).description,
      tokens,
      batch: 1,
      gradientCheckpointing: true,
      loraParams,
      resamplerParams: resamplerParamCount(resamplerConfig),
      loadSeconds,
      steps: results,
      secondsPerSample: timed.reduce((sum, r) => sum + r.seconds, 0) / timed.length,
      peakRssStepBytes: peak.rss,
      peakGpuLiveBytes: peak.gpuLive,
      peakGpuPoolBytes: peak.gpuPool,
      gpuLiveBeforeStepsBytes,
      maxRssBytes: maxRssBytes(),
    };
  } finally {
    peak.stop();
    gpu.destroy();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      help: { type: "boolean", short: "h" },
      qwen: { type: "string" },
      json: { type: "string" },
      tokens: { type: "string", default: "32" },
      steps: { type: "string", default: "3" },
    },
  });
  if (values.help) {
    console.log(await scriptHelp(new URL(import.meta.url)));
    return;
  }
  const tokens = Number(values.tokens);
  const steps = Number(values.steps);
  if (!values.qwen || !Number.isInteger(tokens) || tokens < 1 || !(steps >= 1)) {
    throw new Error(
      "usage: train_scale.ts --qwen <folder> [--json <bench.json>] [--tokens 32] [--steps 3]",
    );
  }
  if (!(await Deno.stat(join(values.qwen, "config.json")).catch(() => null))) {
    throw new Error(
      `${values.qwen} holds no config.json: write the random Qwen3-4B first with ` +
        `scripts/student_scale.ts --dir ${values.qwen}`,
    );
  }
  const result = await run(values.qwen, tokens, steps);
  if (values.json) await appendBenchEntry(values.json, result);
  console.log(
    `train_scale: ${result.secondsPerSample.toFixed(1)} s per sample (${tokens} tokens, batch 1, ` +
      `checkpointing), peak RSS ${mib(result.maxRssBytes)}, GPU live peak ` +
      `${mib(result.peakGpuLiveBytes)} (${mib(result.gpuLiveBeforeStepsBytes)} before the ` +
      `first step) on ${result.adapter}`,
  );
}

if (import.meta.main) await main();
