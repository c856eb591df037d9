/**
 * Student scale check (not in CI): the NF4 Qwen3 student at Qwen3-4B's real sizes.
 *
 * Writes a random checkpoint with Qwen3-4B's exact shapes (BF16, 3 shards, the real Qwen3
 * tokenizer files) into `--dir` unless it already holds one (config.json is written last), then,
 * in a child process so that writing does not count, loads it with NF4 quantization and runs the
 * encoder on one `--tokens`-token prompt. Reports write and load time, peak host RSS, GPU bytes
 * of the weights, forward time and tokens/s, and appends `{name: "student_scale", ...}` to
 * `--json`.
 *
 *   deno run --allow-read --allow-write --allow-env --allow-run scripts/student_scale.ts \
 *     --dir /tmp/distill-qwen3-4b [--json bench-out/scale.json] [--tokens 32]
 *
 * On a CPU adapter (lavapipe, llvmpipe) GPU buffers live in host memory, so the process RSS
 * includes the weights' GPU bytes; the entry reports both, and RSS minus GPU bytes is what the
 * host side of the loader costs.
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  appendBenchEntry,
  maxRssBytes,
  measureInChild,
  PeakMemory,
  scriptHelp,
} from "../src/bench/scale_report.ts";
import { adapterReport } from "../src/gpu/adapter_report.ts";
import { Gpu } from "../src/gpu/device.ts";
import { ModelFolder } from "../src/io/hf.ts";
import { qwen3Forward } from "../src/models/qwen3.ts";
import { destroyQwen3Weights, loadQwen3Weights } from "../src/models/qwen3_weights.ts";
import { QWEN3_4B_SIZES, writeRandomQwen3 } from "../src/models/random_qwen3.ts";
import { loadQwenTokenizer, readQwenPackageFiles } from "../src/text/qwen_tokenizer.ts";

/** Long enough that the chat prompt is cut at any `--tokens` up to about 100. */
const PROMPT = "A highly detailed oil painting of a lighthouse on a rocky cliff at dusk, waves " +
  "crashing below, warm light spilling from its windows, gulls circling overhead, dramatic " +
  "clouds lit orange and violet by the setting sun, a small fishing boat returning to the " +
  "harbour, in the style of the Romantic landscape painters, rich texture, visible brushwork, " +
  "golden hour, cinematic composition, wide angle, trending on an art gallery wall";

const SEED = 4;

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(0)} MiB`;

/** Writes the random Qwen3-4B into `dir` unless its config.json exists; returns the seconds. */
export async function ensureRandomQwen3_4b(dir: string): Promise<number | undefined> {
  if (await Deno.stat(join(dir, "config.json")).catch(() => null)) return undefined;
  console.error(`writing a random Qwen3-4B (BF16, 3 shards) to ${dir} ...`);
  const start = performance.now();
  let reported = 0;
  await writeRandomQwen3(dir, QWEN3_4B_SIZES, {
    seed: SEED,
    dtype: "BF16",
    shardCount: 3,
    tokenizer: await readQwenPackageFiles(),
    onProgress: ({ bytesDone, bytesTotal }) => {
      if (bytesDone - reported < bytesTotal / 10 && bytesDone < bytesTotal) return;
      reported = bytesDone;
      const seconds = (performance.now() - start) / 1000;
      console.error(`  ${mib(bytesDone)} of ${mib(bytesTotal)} in ${seconds.toFixed(1)} s`);
    },
  });
  return (performance.now() - start) / 1000;
}

export interface StudentScaleResult {
  name: "student_scale";
  date: string;
  adapter: string;
  sizes: typeof QWEN3_4B_SIZES;
  /** Seconds to write the checkpoint; absent when an existing one was reused. */
  writeSeconds?: number;
  loadSeconds: number;
  tokens: number;
  /** First forward pass (pipelines compile) and a second one. */
  forwardSecondsCold: number;
  forwardSeconds: number;
  tokensPerSecond: number;
  /** Bytes of GPU memory the NF4 weights and the BF16 embedding take. */
  weightGpuBytes: number;
  /** Deno.memoryUsage().rss before loading, after it, and its highest value during it. */
  rssBeforeLoadBytes: number;
  rssAfterLoadBytes: number;
  peakRssLoadBytes: number;
  /** Highest sampled RSS and GPU pool bytes during the forward passes. */
  peakRssForwardBytes: number;
  peakGpuLiveForwardBytes: number;
  peakGpuPoolBytes: number;
  /** The process's true peak RSS at the end (ru_maxrss, VmHWM). */
  maxRssBytes: number;
}

async function measure(dir: string, tokens: number): Promise<StudentScaleResult> {
  const gpu = await Gpu.create();
  const peak = new PeakMemory(gpu);
  try {
    const rssBeforeLoadBytes = Deno.memoryUsage().rss;
    const folder = await ModelFolder.open(dir);
    const loadStart = performance.now();
    const weights = await loadQwen3Weights(gpu, folder, {
      quantize: "nf4",
      onTensor: (_name, done, total) => {
        peak.sample();
        if (done % 50 === 0 || done === total) {
          const seconds = ((performance.now() - loadStart) / 1000).toFixed(1);
          console.error(`  loaded ${done}/${total} tensors in ${seconds} s, RSS ${mib(peak.rss)}`);
        }
      },
    });
    await gpu.sync();
    const loadSeconds = (performance.now() - loadStart) / 1000;
    folder.close();
    peak.sample();
    const rssAfterLoadBytes = Deno.memoryUsage().rss;
    const peakRssLoadBytes = peak.rss;

    const tokenizer = await loadQwenTokenizer(dir);
    const { ids } = tokenizer.encode(PROMPT, { maxTokens: tokens });
    if (ids.length !== tokens) {
      throw new Error(`the prompt gives ${ids.length} tokens, fewer than --tokens ${tokens}`);
    }
    const batch = { ids, lengths: [tokens], batch: 1, seqLen: tokens };
    peak.reset();
    const forward = async () => {
      const start = performance.now();
      const out = qwen3Forward(gpu, weights, batch);
      const hidden = (await gpu.read(out)) as Float32Array;
      out.destroy();
      peak.sample();
      if (!hidden.every(Number.isFinite)) throw new Error("the hidden state has non-finite values");
      return (performance.now() - start) / 1000;
    };
    const forwardSecondsCold = await forward();
    const forwardSeconds = await forward();
    destroyQwen3Weights(weights);
    return {
      name: "student_scale",
      date: new Date().toISOString(),
      adapter: adapterReport(gpu).description,
      sizes: QWEN3_4B_SIZES,
      loadSeconds,
      tokens,
      forwardSecondsCold,
      forwardSeconds,
      tokensPerSecond: tokens / forwardSeconds,
      weightGpuBytes: weights.gpuBytes,
      rssBeforeLoadBytes,
      rssAfterLoadBytes,
      peakRssLoadBytes,
      peakRssForwardBytes: peak.rss,
      peakGpuLiveForwardBytes: peak.gpuLive,
      peakGpuPoolBytes: peak.gpuPool,
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
      dir: { type: "string" },
      json: { type: "string" },
      tokens: { type: "string", default: "32" },
      measure: { type: "boolean" },
    },
  });
  if (values.help) {
    console.log(await scriptHelp(new URL(import.meta.url)));
    return;
  }
  const { dir, json } = values;
  const tokens = Number(values.tokens);
  if (!dir || !Number.isInteger(tokens) || tokens < 1) {
    throw new Error(
      "usage: student_scale.ts --dir <folder> [--json <bench.json>] [--tokens 32]",
    );
  }
  if (values.measure) {
    console.log(JSON.stringify(await measure(dir, tokens)));
    return;
  }
  const writeSeconds = await ensureRandomQwen3_4b(dir);
  const measured = await measureInChild<StudentScaleResult>(
    new URL(import.meta.url),
    ["--dir", dir, "--tokens", String(tokens)],
    "student_scale",
  );
  const result = { ...measured, writeSeconds };
  if (json) await appendBenchEntry(json, result);
  console.log(
    `student_scale: write ${writeSeconds?.toFixed(1) ?? "(reused)"} s, load ` +
      `${result.loadSeconds.toFixed(1)} s, weights ${mib(result.weightGpuBytes)} on the GPU, ` +
      `peak RSS while loading ${mib(result.peakRssLoadBytes)} (process peak ${
        mib(result.maxRssBytes)
      }), forward of ${tokens} tokens ${result.forwardSeconds.toFixed(2)} s (cold ` +
      `${result.forwardSecondsCold.toFixed(2)} s), ${result.tokensPerSecond.toFixed(1)} ` +
      `tokens/s on ${result.adapter}`,
  );
}

if (import.meta.main) await main();
