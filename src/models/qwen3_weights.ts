import type { Gpu } from "../gpu/device.ts";
import { type DType, dtypeBytes, type Tensor } from "../gpu/tensor.ts";
import type { ModelFolder } from "../io/hf.ts";
import { type LinearName, type LinearShapes, QWEN3_LINEARS } from "./lora.ts";
import { NF4_BLOCK_SIZE, nf4Quantize, type Nf4Quantized } from "../ops/nf4.ts";
import { type Nf4Decode, type Nf4Weight, uploadNf4Weight } from "../ops/nf4_matmul.ts";

/** The sizes a Qwen3 decoder needs, read from its config.json. */
export interface Qwen3Config {
  /** Width of the residual stream (`hidden_size`). */
  hiddenSize: number;
  /** Decoder layers (`num_hidden_layers`). */
  numLayers: number;
  /** Query heads (`num_attention_heads`). */
  numHeads: number;
  /** Key/value heads (`num_key_value_heads`); query heads share them in groups. */
  numKvHeads: number;
  /** Features per attention head (`head_dim`). */
  headDim: number;
  /** Hidden width of the SwiGLU MLP (`intermediate_size`). */
  intermediateSize: number;
  /** Rotary embedding base (`rope_theta`). */
  ropeTheta: number;
  /** Epsilon of every RMSNorm (`rms_norm_eps`). */
  rmsNormEps: number;
  /** Rows of the embedding table (`vocab_size`). */
  vocabSize: number;
}

export function qwen3Config(folder: ModelFolder): Qwen3Config {
  const act = folder.configString("hidden_act", "silu");
  if (act !== "silu") {
    throw new Error(
      `${folder.dir}/config.json: hidden_act '${act}' is not supported (Qwen3 uses silu)`,
    );
  }
  const hiddenSize = folder.configInteger("hidden_size");
  const numHeads = folder.configInteger("num_attention_heads");
  const config: Qwen3Config = {
    hiddenSize,
    numLayers: folder.configInteger("num_hidden_layers"),
    numHeads,
    numKvHeads: folder.configInteger("num_key_value_heads", numHeads),
    headDim: folder.configInteger("head_dim", Math.floor(hiddenSize / numHeads)),
    intermediateSize: folder.configInteger("intermediate_size"),
    ropeTheta: folder.configNumber("rope_theta", 1e6),
    rmsNormEps: folder.configNumber("rms_norm_eps", 1e-6),
    vocabSize: folder.configInteger("vocab_size"),
  };
  if (config.numHeads % config.numKvHeads !== 0) {
    throw new Error(
      `${folder.dir}/config.json: num_attention_heads (${numHeads}) must be a multiple of ` +
        `num_key_value_heads (${config.numKvHeads})`,
    );
  }
  if (config.headDim % 2 !== 0) {
    throw new Error(
      `${folder.dir}/config.json: head_dim ${config.headDim} must be even for rotary`,
    );
  }
  return config;
}

/** In/out features of each decoder linear. */
export function qwen3LinearShapes(c: Qwen3Config): LinearShapes {
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  return {
    q_proj: { in: c.hiddenSize, out: q },
    k_proj: { in: c.hiddenSize, out: kv },
    v_proj: { in: c.hiddenSize, out: kv },
    o_proj: { in: q, out: c.hiddenSize },
    gate_proj: { in: c.hiddenSize, out: c.intermediateSize },
    up_proj: { in: c.hiddenSize, out: c.intermediateSize },
    down_proj: { in: c.intermediateSize, out: c.hiddenSize },
  };
}

/** A frozen decoder linear: NF4 for the student, or f32 for full-precision reference runs. */
export type FrozenLinear = { kind: "nf4"; weight: Nf4Weight } | { kind: "f32"; weight: Tensor };

/** One decoder layer's frozen weights on the GPU. */
export interface Qwen3Layer {
  /** RMSNorm weight before attention (`input_layernorm`). */
  inputNorm: Tensor;
  /** RMSNorm weight before the MLP (`post_attention_layernorm`). */
  postNorm: Tensor;
  /** Per-head RMSNorm weight on queries (`self_attn.q_norm`). */
  qNorm: Tensor;
  /** Per-head RMSNorm weight on keys (`self_attn.k_norm`). */
  kNorm: Tensor;
  /** The attention and MLP projections. */
  linears: Record<LinearName, FrozenLinear>;
}

/** A Qwen3 decoder's frozen weights on the GPU, as the student encoder runs them. */
export interface Qwen3Weights {
  /** The sizes read from config.json. */
  config: Qwen3Config;
  /** [vocab, hidden] in the checkpoint's own dtype, gathered row by row (may exceed one binding). */
  embed: Tensor;
  /** Decoder layers, first to last. */
  layers: Qwen3Layer[];
  /** Final RMSNorm weight (`model.norm`). */
  norm: Tensor;
  /** Bytes of GPU memory the weights take. */
  gpuBytes: number;
}

export interface LoadQwen3Options {
  /** "nf4" (default) quantizes every decoder *_proj as it is read; "none" keeps f32. */
  quantize?: "nf4" | "none";
  /** What products over many rows decode the NF4 weights to (`uploadNf4Weight`); default "f32". */
  nf4Decode?: Nf4Decode;
  /** Called after each tensor is on the GPU. */
  onTensor?: (name: string, done: number, total: number) => void;
  /**
   * The embedding table is streamed in row-aligned pieces of about this many bytes (default
   * 64 MiB), so the host holds one piece of it at a time rather than the whole table.
   */
  embedChunkBytes?: number;
}

const DTYPE_OF: Record<string, DType> = { F32: "f32", F16: "f16", BF16: "bf16" };

function expectedTensors(c: Qwen3Config): Map<string, number[]> {
  const shapes = qwen3LinearShapes(c);
  const expected = new Map<string, number[]>();
  expected.set("model.embed_tokens.weight", [c.vocabSize, c.hiddenSize]);
  expected.set("model.norm.weight", [c.hiddenSize]);
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}.`;
    expected.set(`${p}input_layernorm.weight`, [c.hiddenSize]);
    expected.set(`${p}post_attention_layernorm.weight`, [c.hiddenSize]);
    expected.set(`${p}self_attn.q_norm.weight`, [c.headDim]);
    expected.set(`${p}self_attn.k_norm.weight`, [c.headDim]);
    for (const [name, module] of Object.entries(QWEN3_LINEARS)) {
      const { in: k, out: n } = shapes[name as LinearName];
      expected.set(`${p}${module}.weight`, [n, k]);
    }
  }
  return expected;
}

/** Tensors a Qwen3 checkpoint may carry that the encoder never reads. */
function isIgnored(name: string): boolean {
  return name === "lm_head.weight" || name.endsWith("rotary_emb.inv_freq");
}

/** Checks the folder's tensors against its config before anything is read. */
export function checkQwen3Tensors(folder: ModelFolder, c: Qwen3Config): Map<string, number[]> {
  const expected = expectedTensors(c);
  const configPath = `${folder.dir}/config.json`;
  for (const [name, shape] of expected) {
    if (!folder.has(name)) {
      throw new Error(
        `${folder.weightsPath}: tensor '${name}' is missing, but ${configPath} ` +
          `(num_hidden_layers ${c.numLayers}) needs it; is the download complete?`,
      );
    }
    const info = folder.info(name);
    if (info.shape.join(",") !== shape.join(",")) {
      throw new Error(
        `${folder.dir}/${info.shard}: tensor '${name}' has shape [${info.shape}] but ` +
          `${configPath} implies [${shape}]; the config and the weights disagree`,
      );
    }
    if (!(info.dtype in DTYPE_OF)) {
      throw new Error(
        `${folder.dir}/${info.shard}: tensor '${name}' is ${info.dtype}; expected F32, F16 or BF16`,
      );
    }
  }
  for (const name of folder.names()) {
    if (!expected.has(name) && !isIgnored(name)) {
      throw new Error(
        `${folder.dir}/${folder.shardOf(name)}: unexpected tensor '${name}' for a Qwen3 with ` +
          `${c.numLayers} layers per ${configPath}; the config and the weights disagree`,
      );
    }
  }
  return expected;
}

const DEFAULT_EMBED_CHUNK_BYTES = 64 << 20;

/**
 * Streams the [vocab, hidden] embedding table onto the GPU in row-aligned pieces of about
 * `targetChunkBytes`, in the checkpoint's own dtype, so the host never holds all of it.
 */
async function uploadEmbedding(
  gpu: Gpu,
  folder: ModelFolder,
  name: string,
  shape: number[],
  dtype: DType,
  targetChunkBytes: number,
): Promise<Tensor> {
  const t = gpu.empty(shape, dtype, name);
  const rowBytes = shape[1] * dtypeBytes(dtype);
  let rows = Math.max(1, Math.floor(targetChunkBytes / rowBytes));
  // Queue writes need 4-byte aligned offsets: 2-byte rows of odd width go in pairs.
  if (rowBytes % 4 !== 0 && rows % 2 !== 0) rows++;
  const chunkBytes = rows * rowBytes;
  const totalBytes = shape[0] * rowBytes;
  for (let offset = 0; offset < totalBytes; offset += chunkBytes) {
    const length = Math.min(chunkBytes, totalBytes - offset);
    gpu.write(t, await folder.readRange(name, offset, length), offset);
  }
  return t;
}

/**
 * Host arrays reused for every tensor, sized for the largest decoder linear: a loader that
 * allocated each tensor's f32 values and NF4 arrays afresh would hand gigabytes to the garbage
 * collector over a load. Safe because each upload copies the data before the next read.
 */
interface LoadScratch {
  values: Float32Array;
  nf4: Nf4Quantized;
}

function loadScratch(c: Qwen3Config): LoadScratch {
  // Every other tensor read through here (the norms) is smaller than any linear.
  const largest = Math.max(...Object.values(qwen3LinearShapes(c)).map((s) => s.in * s.out));
  return {
    values: new Float32Array(largest),
    nf4: {
      packed: new Uint8Array(Math.ceil(largest / 2)),
      absmax: new Float32Array(Math.ceil(largest / NF4_BLOCK_SIZE)),
    },
  };
}

/**
 * Streams a Qwen3 checkpoint onto the GPU one shard and one tensor at a time (the embedding
 * table in pieces), quantizing each decoder linear to NF4 as it is read into reused scratch
 * arrays, so host memory peaks at about one linear's worth of arrays beyond the GPU's own.
 */
export async function loadQwen3Weights(
  gpu: Gpu,
  folder: ModelFolder,
  options: LoadQwen3Options = {},
): Promise<Qwen3Weights> {
  const config = qwen3Config(folder);
  const expected = checkQwen3Tensors(folder, config);
  const quantize = options.quantize ?? "nf4";
  const embedChunkBytes = options.embedChunkBytes ?? DEFAULT_EMBED_CHUNK_BYTES;
  if (!(embedChunkBytes > 0)) {
    throw new Error(`loadQwen3Weights: embedChunkBytes must be positive, got ${embedChunkBytes}`);
  }
  const scratch = loadScratch(config);
  const byName = new Map<string, Tensor | Nf4Weight>();
  let gpuBytes = 0;
  let done = 0;
  for (const shard of folder.shards()) {
    for (const name of folder.namesInShard(shard)) {
      const shape = expected.get(name);
      if (!shape) continue;
      if (name === "model.embed_tokens.weight") {
        const dtype = DTYPE_OF[folder.info(name).dtype];
        const t = await uploadEmbedding(gpu, folder, name, shape, dtype, embedChunkBytes);
        gpuBytes += t.byteLength;
        byName.set(name, t);
      } else if (name.endsWith("_proj.weight") && quantize === "nf4") {
        const values = await folder.readF32(name, scratch.values);
        const q = nf4Quantize(values, NF4_BLOCK_SIZE, scratch.nf4);
        const w = uploadNf4Weight(
          gpu,
          q,
          shape[0],
          shape[1],
          name,
          NF4_BLOCK_SIZE,
          options.nf4Decode,
        );
        gpuBytes += w.packed.byteLength + w.absmax.byteLength;
        byName.set(name, w);
      } else {
        const t = gpu.upload(await folder.readF32(name, scratch.values), shape, "f32", name);
        gpuBytes += t.byteLength;
        byName.set(name, t);
      }
      options.onTensor?.(name, ++done, expected.size);
    }
    folder.closeShard(shard);
  }
  const tensor = (name: string) => byName.get(name) as Tensor;
  const layers: Qwen3Layer[] = [];
  for (let i = 0; i < config.numLayers; i++) {
    const p = `model.layers.${i}.`;
    const linears = {} as Record<LinearName, FrozenLinear>;
    for (const [short, module] of Object.entries(QWEN3_LINEARS)) {
      const w = byName.get(`${p}${module}.weight`)!;
      linears[short as LinearName] = quantize === "nf4"
        ? { kind: "nf4", weight: w as Nf4Weight }
        : { kind: "f32", weight: w as Tensor };
    }
    layers.push({
      inputNorm: tensor(`${p}input_layernorm.weight`),
      postNorm: tensor(`${p}post_attention_layernorm.weight`),
      qNorm: tensor(`${p}self_attn.q_norm.weight`),
      kNorm: tensor(`${p}self_attn.k_norm.weight`),
      linears,
    });
  }
  return {
    config,
    embed: tensor("model.embed_tokens.weight"),
    layers,
    norm: tensor("model.norm.weight"),
    gpuBytes,
  };
}

export function destroyQwen3Weights(w: Qwen3Weights): void {
  w.embed.destroy();
  w.norm.destroy();
  for (const layer of w.layers) {
    for (const t of [layer.inputNorm, layer.postNorm, layer.qNorm, layer.kNorm]) t.destroy();
    for (const l of Object.values(layer.linears)) {
      if (l.kind === "nf4") {
        l.weight.packed.destroy();
        l.weight.absmax.destroy();
      } else l.weight.destroy();
    }
  }
}
