/**
 * Random Qwen3 checkpoints with real shapes, for scale tests without downloading a model.
 *
 * `writeRandomQwen3` writes a Hugging Face folder as transformers saves a Qwen3ForCausalLM:
 * config.json (sorted keys, Python float spelling), weights under the real key names, either
 * in `model.safetensors` or sharded as `model-0000i-of-0000n.safetensors` with
 * `model.safetensors.index.json`, and optionally the tokenizer files.
 *
 * It streams: each shard's header is computed from the shapes alone, then tensor data is
 * generated chunk by chunk (16 MiB) and written while the next chunk is generated, so memory
 * stays at two chunks whatever the model size (Qwen3-4B is 8 GB in BF16).
 *
 * Values are not exactly normal: drawing 4e9 Box-Muller normals in TypeScript takes minutes,
 * and BF16 keeps only 8 significant bits anyway. Each element is the Irwin-Hall sum of the four
 * bytes of one xorshift32 output (1021 levels, bell-shaped, bounded at ±3.46 std), mapped
 * through a per-tensor table of the dtype's bit patterns with the exact mean and std asked:
 * N(0, 0.02) for linears and the embedding, 1 + N(0, 0.02) for the RMSNorm weights.
 * Each tensor's stream is seeded from `seed` and its name (through `Rng`), so the bytes do not
 * depend on the shard layout or the chunk size.
 */
import { join } from "node:path";
import { writeAll, writeAtomic, writeFileAtomic } from "../io/atomic.ts";
import { DTYPE_BYTES, f32ToBf16Bits, f32ToF16Bits } from "../io/dtype.ts";
import type { JsonObject } from "../text/tokenizer_files.ts";
import { Rng } from "../util/rng.ts";
import { type Qwen3Config, qwen3WeightSchema } from "./qwen3_weights.ts";

/** A Qwen3's sizes; rope theta and the norm epsilon default to Qwen3's 1e6 and 1e-6. */
export type RandomQwen3Sizes =
  & Omit<Qwen3Config, "ropeTheta" | "rmsNormEps">
  & Partial<Pick<Qwen3Config, "ropeTheta" | "rmsNormEps">>;

/** Qwen/Qwen3-4B's config.json sizes. */
export const QWEN3_4B_SIZES: Readonly<Qwen3Config> = {
  hiddenSize: 2560,
  numLayers: 36,
  numHeads: 32,
  numKvHeads: 8,
  headDim: 128,
  intermediateSize: 9728,
  vocabSize: 151936,
  ropeTheta: 1e6,
  rmsNormEps: 1e-6,
};

export type RandomQwen3DType = "BF16" | "F16" | "F32";

export interface RandomQwen3Progress {
  /** The shard file being written (relative to the folder). */
  shard: string;
  tensor: string;
  /** Tensor bytes written so far, over all shards. */
  bytesDone: number;
  bytesTotal: number;
}

export interface RandomQwen3Options {
  seed: number;
  /** Weight dtype (default BF16, as Qwen3 ships). */
  dtype?: RandomQwen3DType;
  /** Number of safetensors shards (default 1: a single `model.safetensors`). */
  shardCount?: number;
  /** Written as tokenizer.json and tokenizer_config.json; sets bos/eos ids in the config. */
  tokenizer?: { tokenizerJson: JsonObject; tokenizerConfig: JsonObject };
  /** Called after every chunk of tensor data is written. */
  onProgress?: (progress: RandomQwen3Progress) => void;
}

export interface RandomQwen3Written {
  /** Shard file names (relative to the folder), in order. */
  shards: string[];
  /** Bytes of tensor data (the index's metadata.total_size). */
  totalBytes: number;
}

/** One tensor to generate: values mean + std * (approximate standard normal). */
interface TensorPlan {
  name: string;
  shape: number[];
  mean: number;
  std: number;
  byteLength: number;
}

const CHUNK_BYTES = 16 * 2 ** 20;
const WEIGHT_STD = 0.02;
const TORCH_DTYPE: Record<RandomQwen3DType, string> = {
  BF16: "bfloat16",
  F16: "float16",
  F32: "float32",
};
/** Config values that Python writes as floats (`0.0`, `1e-06`), whatever their value. */
const FLOAT_KEYS = new Set(["attention_dropout", "initializer_range", "rms_norm_eps"]);
/** Irwin-Hall of four bytes: sums 0..1020, mean 510, variance 4 (256² - 1) / 12. */
const BYTE_SUM_LEVELS = 1021;
const BYTE_SUM_MEAN = 510;
const BYTE_SUM_STD = Math.sqrt((4 * (256 * 256 - 1)) / 12);

function checkSizes(sizes: RandomQwen3Sizes): Qwen3Config {
  const config: Qwen3Config = { ropeTheta: 1e6, rmsNormEps: 1e-6, ...sizes };
  for (const [key, value] of Object.entries(config)) {
    const ok = key === "ropeTheta" || key === "rmsNormEps"
      ? typeof value === "number" && value > 0
      : Number.isInteger(value) && value > 0;
    if (!ok) {
      throw new Error(
        `writeRandomQwen3: sizes.${key} is ${JSON.stringify(value)}; expected a positive ${
          key === "ropeTheta" || key === "rmsNormEps" ? "number" : "integer"
        }`,
      );
    }
  }
  return config;
}

/**
 * The tensors the Qwen3 weight schema declares (transformers' state-dict order, the order
 * shards are filled in), less the optional lm_head; the RMSNorm weights centred on 1.
 */
function tensorPlan(c: Qwen3Config, dtype: RandomQwen3DType): TensorPlan[] {
  return qwen3WeightSchema(c, "none", "config.json").tensors
    .filter((spec) => !spec.optional)
    .map(({ name, shape }) => ({
      name,
      shape,
      mean: name.endsWith("norm.weight") ? 1 : 0,
      std: WEIGHT_STD,
      byteLength: shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[dtype],
    }));
}

/**
 * Splits the plan into `count` shards of about equal bytes in state-dict order (a tensor goes
 * to the shard its first byte falls in); within a shard, data is in name order as the
 * safetensors library lays it out.
 */
function splitShards(plan: TensorPlan[], count: number): TensorPlan[][] {
  const total = plan.reduce((sum, t) => sum + t.byteLength, 0);
  const shards: TensorPlan[][] = Array.from({ length: count }, () => []);
  let start = 0;
  for (const t of plan) {
    shards[Math.min(count - 1, Math.floor((start * count) / total))].push(t);
    start += t.byteLength;
  }
  const empty = shards.findIndex((s) => s.length === 0);
  if (empty >= 0) {
    throw new Error(
      `writeRandomQwen3: shardCount ${count} leaves shard ${empty + 1} empty (the largest ` +
        `tensor holds more than 1/${count} of the bytes); use fewer shards`,
    );
  }
  return shards.map((shard) => shard.sort((a, b) => (a.name < b.name ? -1 : 1)));
}

function shardFileName(index: number, count: number): string {
  const pad = (n: number) => String(n).padStart(5, "0");
  return count === 1 ? "model.safetensors" : `model-${pad(index + 1)}-of-${pad(count)}.safetensors`;
}

/** The safetensors header of `tensors` laid out in order, padded to 8 bytes with spaces. */
function shardHeader(tensors: TensorPlan[], dtype: RandomQwen3DType): Uint8Array {
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + t.byteLength] };
    offset += t.byteLength;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.byteLength / 8) * 8;
  const bytes = new Uint8Array(8 + padded).fill(0x20, 8 + json.byteLength);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(padded), true);
  bytes.set(json, 8);
  return bytes;
}

/** 32-bit FNV-1a of a tensor name, to give every tensor its own stream. */
function nameHash(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/**
 * Every Irwin-Hall level scaled to `mean` and `std`, as the dtype's little-endian bytes viewed
 * as a host array, so that copying table entries into a chunk writes little-endian data.
 */
function levelTable(dtype: RandomQwen3DType, mean: number, std: number): Uint16Array | Uint32Array {
  const width = DTYPE_BYTES[dtype];
  const bytes = new DataView(new ArrayBuffer(BYTE_SUM_LEVELS * width));
  for (let s = 0; s < BYTE_SUM_LEVELS; s++) {
    const value = mean + ((s - BYTE_SUM_MEAN) * std) / BYTE_SUM_STD;
    if (dtype === "F32") bytes.setFloat32(4 * s, value, true);
    else bytes.setUint16(2 * s, (dtype === "BF16" ? f32ToBf16Bits : f32ToF16Bits)(value), true);
  }
  return width === 4 ? new Uint32Array(bytes.buffer) : new Uint16Array(bytes.buffer);
}

/** Fills `out` from the xorshift32 `state` through `table`; returns the advanced state. */
function fillLevels(
  out: Uint16Array | Uint32Array,
  table: Uint16Array | Uint32Array,
  state: number,
): number {
  let x = state | 0;
  for (let i = 0; i < out.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = table[(x & 255) + ((x >>> 8) & 255) + ((x >>> 16) & 255) + (x >>> 24)];
  }
  return x;
}

/** Python's `repr` of a float, as `json.dumps` writes it (`0.0`, `0.02`, `1e-06`). */
function pythonFloat(x: number): string {
  const [digits, exp] = x.toExponential().split("e");
  const e = Number(exp);
  if (e < -4 || e >= 16) {
    return `${digits}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  }
  const fixed = String(x);
  return fixed.includes(".") ? fixed : `${fixed}.0`;
}

/** JSON as Python's `json.dumps(value, indent=2, sort_keys=True)` writes it, plus a newline. */
function pythonJson(value: Record<string, unknown>, floatKeys: ReadonlySet<string>): string {
  const marker = "\u0000float:";
  const sorted = Object.fromEntries(Object.entries(value).sort(([a], [b]) => (a < b ? -1 : 1)));
  const text = JSON.stringify(
    sorted,
    (key, v) => (floatKeys.has(key) && typeof v === "number" ? `${marker}${pythonFloat(v)}` : v),
    2,
  );
  return text.replace(/"\\u0000float:([^"]*)"/g, "$1") + "\n";
}

/** The id of an added token (`<|endoftext|>`, ...) in a tokenizer.json, if it has one. */
function addedTokenId(tokenizerJson: JsonObject, content: string): number | undefined {
  const added = Array.isArray(tokenizerJson.added_tokens) ? tokenizerJson.added_tokens : [];
  const entry = added.find((t: { content?: unknown }) => t?.content === content);
  return typeof entry?.id === "number" ? entry.id : undefined;
}

/** The largest token id of a tokenizer.json (its BPE vocabulary and added tokens). */
function maxTokenId(tokenizerJson: JsonObject): number {
  const model = tokenizerJson.model as { vocab?: Record<string, number> } | undefined;
  const ids = Object.values(model?.vocab ?? {});
  const added = Array.isArray(tokenizerJson.added_tokens) ? tokenizerJson.added_tokens : [];
  for (const t of added) if (typeof t?.id === "number") ids.push(t.id);
  return ids.reduce((a, b) => Math.max(a, b), -1);
}

/** config.json as transformers 4.51 writes it for a Qwen3ForCausalLM with tied embeddings. */
function qwen3ConfigJson(
  c: Qwen3Config,
  dtype: RandomQwen3DType,
  tokenizerJson?: JsonObject,
): string {
  const config: Record<string, unknown> = {
    architectures: ["Qwen3ForCausalLM"],
    attention_bias: false,
    attention_dropout: 0,
    head_dim: c.headDim,
    hidden_act: "silu",
    hidden_size: c.hiddenSize,
    initializer_range: WEIGHT_STD,
    intermediate_size: c.intermediateSize,
    max_position_embeddings: 40960,
    max_window_layers: c.numLayers,
    model_type: "qwen3",
    num_attention_heads: c.numHeads,
    num_hidden_layers: c.numLayers,
    num_key_value_heads: c.numKvHeads,
    rms_norm_eps: c.rmsNormEps,
    rope_scaling: null,
    rope_theta: c.ropeTheta,
    sliding_window: null,
    tie_word_embeddings: true,
    torch_dtype: TORCH_DTYPE[dtype],
    transformers_version: "4.51.0",
    use_cache: true,
    use_sliding_window: false,
    vocab_size: c.vocabSize,
  };
  if (tokenizerJson) {
    // Qwen3's configs name <|endoftext|> as bos and <|im_end|> as eos.
    const bos = addedTokenId(tokenizerJson, "<|endoftext|>");
    const eos = addedTokenId(tokenizerJson, "<|im_end|>");
    if (bos !== undefined) config.bos_token_id = bos;
    if (eos !== undefined) config.eos_token_id = eos;
  }
  return pythonJson(config, FLOAT_KEYS);
}

/** Removes `path` if it exists. */
async function removeIfPresent(path: string): Promise<void> {
  await Deno.remove(path).catch((error) => {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  });
}

/**
 * Writes a random Qwen3 into `dir` (created if needed); see the module comment. Shards are
 * written atomically one by one, then the index, the tokenizer files and config.json last, so
 * a folder with config.json is complete. Weights of the other layout (a single file when
 * writing shards, or an index when writing one file) are removed, since a single file wins.
 */
export async function writeRandomQwen3(
  dir: string,
  sizes: RandomQwen3Sizes,
  opts: RandomQwen3Options,
): Promise<RandomQwen3Written> {
  const config = checkSizes(sizes);
  const dtype = opts.dtype ?? "BF16";
  if (!(dtype in TORCH_DTYPE)) {
    throw new Error(`writeRandomQwen3: dtype ${JSON.stringify(dtype)}; use BF16, F16 or F32`);
  }
  const shardCount = opts.shardCount ?? 1;
  if (!Number.isInteger(shardCount) || shardCount < 1) {
    throw new Error(`writeRandomQwen3: shardCount must be a positive integer, got ${shardCount}`);
  }
  if (!Number.isInteger(opts.seed)) {
    throw new Error(`writeRandomQwen3: seed must be an integer, got ${opts.seed}`);
  }
  if (opts.tokenizer) {
    const maxId = maxTokenId(opts.tokenizer.tokenizerJson);
    if (maxId >= config.vocabSize) {
      throw new Error(
        `writeRandomQwen3: the tokenizer has token id ${maxId}, but vocabSize is ` +
          `${config.vocabSize}; raise vocabSize above ${maxId}`,
      );
    }
  }
  const plan = tensorPlan(config, dtype);
  const shards = splitShards(plan, shardCount);
  const names = shards.map((_, i) => shardFileName(i, shardCount));
  const totalBytes = plan.reduce((sum, t) => sum + t.byteLength, 0);

  await Deno.mkdir(dir, { recursive: true });
  // config.json marks a complete folder: drop an old one before replacing its weights.
  await removeIfPresent(join(dir, "config.json"));
  const elementBytes = DTYPE_BYTES[dtype];
  const chunkElements = CHUNK_BYTES / elementBytes;
  const newChunk = () =>
    elementBytes === 4 ? new Uint32Array(chunkElements) : new Uint16Array(chunkElements);
  // Two chunks: one being written while the other is filled.
  const chunks = [newChunk(), newChunk()];
  let which = 0;
  let bytesDone = 0;
  for (const [s, tensors] of shards.entries()) {
    await writeAtomic(join(dir, names[s]), async (file) => {
      await writeAll(file, shardHeader(tensors, dtype));
      let pending = Promise.resolve();
      for (const t of tensors) {
        const table = levelTable(dtype, t.mean, t.std);
        const rng = new Rng(Math.imul(opts.seed, 0x9e3779b1) ^ nameHash(t.name));
        let state = Math.floor(rng.next() * 2 ** 32) || 1;
        for (let done = 0; done < t.byteLength;) {
          const bytes = Math.min(CHUNK_BYTES, t.byteLength - done);
          const chunk = chunks[which].subarray(0, bytes / elementBytes);
          which ^= 1;
          state = fillLevels(chunk, table, state);
          await pending;
          pending = writeAll(file, new Uint8Array(chunk.buffer, 0, bytes));
          done += bytes;
          bytesDone += bytes;
          opts.onProgress?.({ shard: names[s], tensor: t.name, bytesDone, bytesTotal: totalBytes });
        }
      }
      await pending;
    });
  }

  if (shardCount === 1) {
    await removeIfPresent(join(dir, "model.safetensors.index.json"));
  } else {
    await removeIfPresent(join(dir, "model.safetensors"));
    const weightMap: Record<string, string> = {};
    for (const [s, tensors] of shards.entries()) {
      for (const t of tensors) weightMap[t.name] = names[s];
    }
    const index = {
      metadata: { total_size: totalBytes },
      weight_map: Object.fromEntries(
        Object.entries(weightMap).sort(([a], [b]) => (a < b ? -1 : 1)),
      ),
    };
    await writeFileAtomic(
      join(dir, "model.safetensors.index.json"),
      JSON.stringify(index, null, 2) + "\n",
    );
  }
  if (opts.tokenizer) {
    const { tokenizerJson, tokenizerConfig } = opts.tokenizer;
    await writeFileAtomic(join(dir, "tokenizer.json"), JSON.stringify(tokenizerJson, null, 2));
    await writeFileAtomic(
      join(dir, "tokenizer_config.json"),
      JSON.stringify(tokenizerConfig, null, 2) + "\n",
    );
  }
  await writeFileAtomic(
    join(dir, "config.json"),
    qwen3ConfigJson(config, dtype, opts.tokenizer?.tokenizerJson),
  );
  return { shards: names, totalBytes };
}
