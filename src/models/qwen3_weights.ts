import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import type { ModelFolder } from "../io/hf.ts";
import type { Nf4Decode, Nf4Weight } from "../ops/nf4_matmul.ts";
import { type LinearName, type LinearShapes, QWEN3_LINEARS } from "./lora.ts";
import {
  checkWeights,
  loadWeights,
  perLayer,
  type WeightSchema,
  type WeightSpec,
} from "./weight_schema.ts";

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

const EMBED = "model.embed_tokens.weight";
const FINAL_NORM = "model.norm.weight";
const layerPrefix = (i: number) => `model.layers.${i}.`;
/** A decoder layer's RMSNorm weights, by their names in the layer. */
const LAYER_NORMS = {
  inputNorm: "input_layernorm.weight",
  postNorm: "post_attention_layernorm.weight",
  qNorm: "self_attn.q_norm.weight",
  kNorm: "self_attn.k_norm.weight",
} as const;

/**
 * Every tensor of a Qwen3 checkpoint in transformers' state-dict order, with its shape from
 * `c`; decoder linears are quantized to NF4 unless `quantize` is "none". The lm_head a
 * Qwen3ForCausalLM carries is checked but never read.
 */
export function qwen3WeightSchema(
  c: Qwen3Config,
  quantize: "nf4" | "none",
  configPath: string,
): WeightSchema {
  const shapes = qwen3LinearShapes(c);
  const linear = (name: LinearName): WeightSpec => ({
    name: `${QWEN3_LINEARS[name]}.weight`,
    shape: [shapes[name].out, shapes[name].in],
    placement: quantize === "nf4" ? "nf4" : "f32",
  });
  const norm = (name: string, size: number): WeightSpec => ({
    name,
    shape: [size],
    placement: "f32",
  });
  return {
    model: `a Qwen3 decoder with ${c.numLayers} layers`,
    config: configPath,
    tensors: [
      { name: EMBED, shape: [c.vocabSize, c.hiddenSize], placement: "stored" },
      ...perLayer(c.numLayers, layerPrefix, () => [
        ...(["q_proj", "k_proj", "v_proj", "o_proj"] as const).map(linear),
        norm(LAYER_NORMS.qNorm, c.headDim),
        norm(LAYER_NORMS.kNorm, c.headDim),
        ...(["gate_proj", "up_proj", "down_proj"] as const).map(linear),
        norm(LAYER_NORMS.inputNorm, c.hiddenSize),
        norm(LAYER_NORMS.postNorm, c.hiddenSize),
      ]),
      norm(FINAL_NORM, c.hiddenSize),
      {
        name: "lm_head.weight",
        shape: [c.vocabSize, c.hiddenSize],
        placement: "unread",
        optional: true,
      },
    ],
    // Rotary frequencies some checkpoints saved as buffers; computed from rope_theta instead.
    ignore: (name) => name.endsWith("rotary_emb.inv_freq"),
  };
}

/** Checks the folder's tensors against its config before anything is read. */
export function checkQwen3Tensors(folder: ModelFolder, c: Qwen3Config): void {
  checkWeights(folder, qwen3WeightSchema(c, "nf4", `${folder.dir}/config.json`));
}

/**
 * Streams a Qwen3 checkpoint onto the GPU one shard and one tensor at a time (the embedding
 * table in pieces, in its own dtype), quantizing each decoder linear to NF4 as it is read, so
 * host memory peaks at about one linear's worth of arrays beyond the GPU's own.
 */
export async function loadQwen3Weights(
  gpu: Gpu,
  folder: ModelFolder,
  options: LoadQwen3Options = {},
): Promise<Qwen3Weights> {
  const config = qwen3Config(folder);
  const quantize = options.quantize ?? "nf4";
  const embedChunkBytes = options.embedChunkBytes;
  if (embedChunkBytes !== undefined && !(embedChunkBytes > 0)) {
    throw new Error(`loadQwen3Weights: embedChunkBytes must be positive, got ${embedChunkBytes}`);
  }
  const schema = qwen3WeightSchema(config, quantize, `${folder.dir}/config.json`);
  const loaded = await loadWeights(gpu, folder, schema, {
    onTensor: options.onTensor,
    storedChunkBytes: embedChunkBytes,
    nf4Decode: options.nf4Decode,
  });
  const layers: Qwen3Layer[] = [];
  for (let i = 0; i < config.numLayers; i++) {
    const p = layerPrefix(i);
    const linears = {} as Record<LinearName, FrozenLinear>;
    for (const [short, module] of Object.entries(QWEN3_LINEARS)) {
      const name = `${p}${module}.weight`;
      linears[short as LinearName] = quantize === "nf4"
        ? { kind: "nf4", weight: loaded.nf4(name) }
        : { kind: "f32", weight: loaded.tensor(name) };
    }
    layers.push({
      inputNorm: loaded.tensor(p + LAYER_NORMS.inputNorm),
      postNorm: loaded.tensor(p + LAYER_NORMS.postNorm),
      qNorm: loaded.tensor(p + LAYER_NORMS.qNorm),
      kNorm: loaded.tensor(p + LAYER_NORMS.kNorm),
      linears,
    });
  }
  return {
    config,
    embed: loaded.tensor(EMBED),
    layers,
    norm: loaded.tensor(FINAL_NORM),
    gpuBytes: loaded.gpuBytes,
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
