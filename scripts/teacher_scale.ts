/**
 * Teacher scale check (not in CI): the SDXL teacher at its real sizes on the target cache.
 *
 * Writes random CLIP ViT-L and ViT-bigG text encoders with the real SDXL shapes (F16, diffusers
 * layout, the real CLIP tokenizer files from tests/fixtures/clip-tokenizer) into `--dir` (kept
 * and reused by later runs), then, in a child process so that writing them does not count,
 * loads the teacher and runs the target cache over the first `--prompts` PartiPrompts. Reports
 * captions/s, peak RSS, GPU memory, and appends `{name: "teacher_cache", ...}` to `--json`.
 *
 *   deno run --allow-read --allow-write --allow-env --allow-run scripts/teacher_scale.ts \
 *     --dir /tmp/sdxl-random --json bench-out/bench.json [--prompts 64] [--batch-size 8]
 */
import { parseArgs } from "node:util";
import { dirname, join } from "node:path";
import { runCache } from "../src/cli/cache.ts";
import { Gpu } from "../src/gpu/device.ts";
import { writeFileAtomic } from "../src/io/atomic.ts";
import { f32ToF16Bits } from "../src/io/dtype.ts";
import { type TensorToWrite, writeSafetensors } from "../src/io/safetensors.ts";
import { loadSdxlTeacher } from "../src/models/sdxl_teacher.ts";
import { Rng } from "../src/train/rng.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const TOKENIZER_DIR = join(ROOT, "tests/fixtures/clip-tokenizer");
const PROMPTS = join(ROOT, "tests/fixtures/prompts/PartiPrompts.sample300.tsv");
const TOKENIZER_FILES = [
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "tokenizer_config.json",
];

/** The sizes of a CLIP text encoder config; `projectionDim` adds a `text_projection`. */
export interface ClipTextShape {
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  intermediateSize: number;
  vocabSize: number;
  hiddenAct: "quick_gelu" | "gelu";
  projectionDim?: number;
}

/** SDXL base 1.0's text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (OpenCLIP ViT-bigG/14). */
export const SDXL_TEXT_ENCODERS: Record<"text_encoder" | "text_encoder_2", ClipTextShape> = {
  text_encoder: {
    hiddenSize: 768,
    numLayers: 12,
    numHeads: 12,
    intermediateSize: 3072,
    vocabSize: 49408,
    hiddenAct: "quick_gelu",
  },
  text_encoder_2: {
    hiddenSize: 1280,
    numLayers: 32,
    numHeads: 20,
    intermediateSize: 5120,
    vocabSize: 49408,
    hiddenAct: "gelu",
    projectionDim: 1280,
  },
};

/** F16 bit patterns of uniform values with mean `mean` and standard deviation `std`. */
function randomF16(rng: Rng, n: number, std: number, mean = 0): Uint16Array {
  const out = new Uint16Array(n);
  const halfWidth = std * Math.sqrt(3);
  for (let i = 0; i < n; i++) out[i] = f32ToF16Bits(mean + halfWidth * (2 * rng.next() - 1));
  return out;
}

/**
 * Writes a random CLIP text encoder (config.json and an F16 model.safetensors with Hugging
 * Face's key names) into `dir`. Weights are scaled like CLIP's initialisation so activations
 * stay in range through every layer.
 */
export async function writeRandomClipTextEncoder(
  dir: string,
  shape: ClipTextShape,
  seed: number,
): Promise<void> {
  const rng = new Rng(seed);
  const h = shape.hiddenSize;
  const tensors: TensorToWrite[] = [];
  const put = (name: string, dims: number[], std: number, mean = 0) =>
    tensors.push({
      name,
      dtype: "F16",
      shape: dims,
      data: randomF16(rng, dims.reduce((a, b) => a * b, 1), std, mean),
    });
  const linear = (name: string, out: number, inp: number) => {
    put(`${name}.weight`, [out, inp], 1 / Math.sqrt(inp));
    put(`${name}.bias`, [out], 0.02);
  };
  put("text_model.embeddings.token_embedding.weight", [shape.vocabSize, h], 0.02);
  put("text_model.embeddings.position_embedding.weight", [77, h], 0.01);
  for (let i = 0; i < shape.numLayers; i++) {
    const p = `text_model.encoder.layers.${i}.`;
    for (const norm of ["layer_norm1", "layer_norm2"]) {
      put(`${p}${norm}.weight`, [h], 0.05, 1);
      put(`${p}${norm}.bias`, [h], 0.02);
    }
    for (const proj of ["q_proj", "k_proj", "v_proj", "out_proj"]) {
      linear(`${p}self_attn.${proj}`, h, h);
    }
    linear(`${p}mlp.fc1`, shape.intermediateSize, h);
    linear(`${p}mlp.fc2`, h, shape.intermediateSize);
  }
  put("text_model.final_layer_norm.weight", [h], 0.05, 1);
  put("text_model.final_layer_norm.bias", [h], 0.02);
  if (shape.projectionDim) {
    put("text_projection.weight", [shape.projectionDim, h], 1 / Math.sqrt(h));
  }
  const config = {
    architectures: [shape.projectionDim ? "CLIPTextModelWithProjection" : "CLIPTextModel"],
    attention_dropout: 0,
    bos_token_id: 0,
    dropout: 0,
    // The legacy value SDXL's configs carry; the teacher must not pool there.
    eos_token_id: 2,
    hidden_act: shape.hiddenAct,
    hidden_size: h,
    initializer_factor: 1,
    initializer_range: 0.02,
    intermediate_size: shape.intermediateSize,
    layer_norm_eps: 1e-5,
    max_position_embeddings: 77,
    model_type: "clip_text_model",
    num_attention_heads: shape.numHeads,
    num_hidden_layers: shape.numLayers,
    pad_token_id: 1,
    projection_dim: shape.projectionDim ?? h,
    torch_dtype: "float16",
    vocab_size: shape.vocabSize,
  };
  await Deno.mkdir(dir, { recursive: true });
  await writeFileAtomic(join(dir, "config.json"), JSON.stringify(config, null, 2) + "\n");
  await writeSafetensors(join(dir, "model.safetensors"), tensors);
}

/**
 * A CLIP tokenizer folder from the real tokenizer files; `padToken` "!" makes SDXL's
 * tokenizer_2 (same vocabulary, padded with id 0).
 */
export async function writeClipTokenizerFolder(dir: string, padToken?: string): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  for (const file of TOKENIZER_FILES) {
    let text = await Deno.readTextFile(join(TOKENIZER_DIR, file));
    if (padToken && (file === "special_tokens_map.json" || file === "tokenizer_config.json")) {
      text = JSON.stringify({ ...JSON.parse(text), pad_token: padToken }, null, 2) + "\n";
    }
    await writeFileAtomic(join(dir, file), text);
  }
}

/** An SDXL folder (text encoders, tokenizers) with random encoders of the given shapes. */
export async function writeRandomSdxlTeacherFolder(
  dir: string,
  shapes: Record<"text_encoder" | "text_encoder_2", ClipTextShape> = SDXL_TEXT_ENCODERS,
  seed = 1,
): Promise<void> {
  await writeRandomClipTextEncoder(join(dir, "text_encoder"), shapes.text_encoder, seed);
  await writeRandomClipTextEncoder(join(dir, "text_encoder_2"), shapes.text_encoder_2, seed + 1);
  await writeClipTokenizerFolder(join(dir, "tokenizer"));
  await writeClipTokenizerFolder(join(dir, "tokenizer_2"), "!");
}

/** Kilobytes of a `/proc/self/status` line (VmHWM: peak RSS), when the system has one. */
async function procStatusBytes(key: string): Promise<number | undefined> {
  try {
    const status = await Deno.readTextFile("/proc/self/status");
    const match = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status);
    return match ? Number(match[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

export interface TeacherCacheResult {
  name: "teacher_cache";
  date: string;
  adapter: string;
  prompts: number;
  batchSize: number;
  loadSeconds: number;
  cacheSeconds: number;
  captionsPerSecond: number;
  /** Highest Deno.memoryUsage().rss seen while loading and caching (sampled every 100 ms). */
  peakRssBytes: number;
  /** Deno.memoryUsage().rss right after the teacher was loaded. */
  rssAfterLoadBytes: number;
  /** /proc/self/status VmHWM at the end (Linux only). */
  vmHwmBytes?: number;
  /** Sum of the weight tensors' bytes. */
  weightBytes: number;
  /** Highest GPU memory the buffer pool held (live + pooled; sizes rounded to its classes). */
  peakPoolBytes: number;
  shapes: typeof SDXL_TEXT_ENCODERS;
}

/** Loads the teacher of `dir` and caches `prompts` prompts; runs in the child process. */
async function measure(
  dir: string,
  prompts: number,
  batchSize: number,
): Promise<TeacherCacheResult> {
  const gpu = await Gpu.create();
  let peakRss = Deno.memoryUsage().rss;
  let peakPool = 0;
  const sample = () => {
    peakRss = Math.max(peakRss, Deno.memoryUsage().rss);
    peakPool = Math.max(peakPool, gpu.stats.liveBytes + gpu.stats.pooledBytes);
  };
  const timer = setInterval(sample, 100);
  const out = await Deno.makeTempDir({ prefix: "teacher-cache-" });
  try {
    const loadStart = performance.now();
    const teacher = await loadSdxlTeacher(gpu, dir);
    const loadSeconds = (performance.now() - loadStart) / 1000;
    const rssAfterLoadBytes = Deno.memoryUsage().rss;
    sample();
    const cacheStart = performance.now();
    await runCache({ data: PROMPTS, limit: prompts, out, batchSize }, teacher);
    const cacheSeconds = (performance.now() - cacheStart) / 1000;
    sample();
    teacher.destroy();
    return {
      name: "teacher_cache",
      date: new Date().toISOString(),
      adapter: [
        gpu.adapterInfo.vendor,
        gpu.adapterInfo.architecture,
        gpu.adapterInfo.device,
        gpu.adapterInfo.description,
      ].filter(Boolean).join(" "),
      prompts,
      batchSize,
      loadSeconds,
      cacheSeconds,
      captionsPerSecond: prompts / cacheSeconds,
      peakRssBytes: peakRss,
      rssAfterLoadBytes,
      vmHwmBytes: await procStatusBytes("VmHWM"),
      weightBytes: teacher.gpuBytes,
      peakPoolBytes: peakPool,
      shapes: SDXL_TEXT_ENCODERS,
    };
  } finally {
    clearInterval(timer);
    await Deno.remove(out, { recursive: true });
    gpu.destroy();
  }
}

/** Appends `entry` to the JSON array in `path` (created if missing), atomically. */
async function appendBenchEntry(path: string, entry: unknown): Promise<void> {
  let entries: unknown[] = [];
  try {
    const parsed = JSON.parse(await Deno.readTextFile(path));
    if (!Array.isArray(parsed)) throw new Error(`${path} does not hold a JSON array of results`);
    entries = parsed;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  entries.push(entry);
  await Deno.mkdir(dirname(path) || ".", { recursive: true });
  await writeFileAtomic(path, JSON.stringify(entries, null, 2) + "\n");
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      dir: { type: "string" },
      json: { type: "string" },
      prompts: { type: "string", default: "64" },
      "batch-size": { type: "string", default: "8" },
      measure: { type: "boolean" },
    },
  });
  const { dir, json } = values;
  const prompts = Number(values.prompts);
  const batchSize = Number(values["batch-size"]);
  if (!dir || (!json && !values.measure) || !(prompts > 0) || !(batchSize > 0)) {
    throw new Error(
      "usage: teacher_scale.ts --dir <folder> --json <bench.json> [--prompts 64] [--batch-size 8]",
    );
  }
  if (values.measure) {
    console.log(JSON.stringify(await measure(dir, prompts, batchSize)));
    return;
  }
  if (!(await Deno.stat(join(dir, "tokenizer_2", "vocab.json")).catch(() => null))) {
    console.error(`teacher_scale: writing random SDXL text encoders to ${dir} ...`);
    const start = performance.now();
    await writeRandomSdxlTeacherFolder(dir);
    console.error(`teacher_scale: written in ${((performance.now() - start) / 1000).toFixed(1)} s`);
  }
  const child = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      new URL(import.meta.url).pathname,
      "--measure",
      "--dir",
      dir,
      "--prompts",
      String(prompts),
      "--batch-size",
      String(batchSize),
    ],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  if (!child.success) {
    throw new Error(`teacher_scale: the measuring process failed (${child.code})`);
  }
  const result = JSON.parse(new TextDecoder().decode(child.stdout).trim().split("\n").at(-1)!);
  await appendBenchEntry(json!, result);
  const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(0)} MiB`;
  console.log(
    `teacher_cache: ${result.prompts} prompts, batch ${result.batchSize}, load ` +
      `${result.loadSeconds.toFixed(1)} s, ${result.captionsPerSecond.toFixed(3)} captions/s, ` +
      `peak RSS ${mib(result.peakRssBytes)} (VmHWM ${mib(result.vmHwmBytes ?? 0)}), weights ` +
      `${mib(result.weightBytes)}, GPU pool peak ${mib(result.peakPoolBytes)} on ${result.adapter}`,
  );
}

if (import.meta.main) await main();
