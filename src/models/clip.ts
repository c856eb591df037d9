/**
 * One CLIP text transformer as SDXL uses it (docs/numerics.md §2): OpenAI CLIP ViT-L/14 text
 * (`text_encoder/`) or OpenCLIP ViT-bigG/14 text with its projection (`text_encoder_2/`), read
 * from a Hugging Face folder with every size taken from its config.json.
 *
 *     x = tok_emb[ids] + pos_emb[0..T-1]
 *     per layer: x += out_proj(attn_causal(q, k, v of layer_norm1(x)))
 *                x += fc2(act(fc1(layer_norm2(x))))
 *     penultimate = x after layer L-2 (no final norm)
 *     pooled = text_projection(final_layer_norm(x after layer L-1)[eos])
 *
 * Activations are f32; linear weights stay on the GPU in the file's dtype (F16/BF16 are
 * unpacked exactly to f32 inside the matmul, so keeping them halves memory at no cost in
 * accuracy), LayerNorm parameters and biases are f32.
 *
 * Only the pooled vector needs the last layer, and of it only the row at `eos`: a model loaded
 * without `pooled` skips that layer's weights and work entirely, and with `pooled` the last
 * layer computes keys and values for every position but queries, out_proj and the MLP for the
 * `eos` rows alone (each query attends to keys 0..eos, exactly the causal row).
 */
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import type { ModelFolder } from "../io/hf.ts";
import { gelu, quickGelu } from "../ops/activation.ts";
import { attention } from "../ops/attention.ts";
import { addInPlace } from "../ops/elementwise.ts";
import { embeddingGather } from "../ops/embedding.ts";
import { matmul } from "../ops/matmul.ts";
import { layerNorm } from "../ops/norm.ts";
import { loadWeights, perLayer, type WeightSchema, type WeightSpec } from "./weight_schema.ts";

/** The activations CLIP text configs name in `hidden_act`. */
export const CLIP_ACTIVATIONS = ["quick_gelu", "gelu"] as const;
export type ClipActivation = (typeof CLIP_ACTIVATIONS)[number];

/** The sizes of one CLIP text transformer, from its config.json. */
export interface ClipTextConfig {
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  headDim: number;
  intermediateSize: number;
  vocabSize: number;
  /** Longest sequence the position table covers (77). */
  maxPositions: number;
  layerNormEps: number;
  hiddenAct: ClipActivation;
}

const PREFIX = "text_model.";
const TOKEN_EMBEDDING = `${PREFIX}embeddings.token_embedding.weight`;
const POSITION_EMBEDDING = `${PREFIX}embeddings.position_embedding.weight`;
const FINAL_NORM = `${PREFIX}final_layer_norm`;
const TEXT_PROJECTION = "text_projection.weight";
/** A buffer older transformers versions saved with the weights; never read. */
const POSITION_IDS = `${PREFIX}embeddings.position_ids`;

/** Reads and checks the sizes of a CLIP text config. */
export function clipTextConfig(folder: ModelFolder): ClipTextConfig {
  const configPath = `${folder.dir}/config.json`;
  const hiddenAct = folder.configString("hidden_act", "quick_gelu");
  if (!(CLIP_ACTIVATIONS as readonly string[]).includes(hiddenAct)) {
    throw new Error(
      `${configPath}: hidden_act "${hiddenAct}" is not supported; a CLIP text encoder uses ` +
        `${CLIP_ACTIVATIONS.join(" or ")}`,
    );
  }
  const hiddenSize = folder.configInteger("hidden_size");
  const numHeads = folder.configInteger("num_attention_heads");
  const numLayers = folder.configInteger("num_hidden_layers");
  if (hiddenSize % numHeads !== 0) {
    throw new Error(
      `${configPath}: hidden_size ${hiddenSize} is not a multiple of num_attention_heads ${numHeads}`,
    );
  }
  if (numLayers < 2) {
    throw new Error(
      `${configPath}: num_hidden_layers is ${numLayers}; SDXL reads the penultimate layer, ` +
        `so a CLIP text encoder needs at least 2`,
    );
  }
  return {
    hiddenSize,
    numLayers,
    numHeads,
    headDim: hiddenSize / numHeads,
    intermediateSize: folder.configInteger("intermediate_size"),
    vocabSize: folder.configInteger("vocab_size"),
    maxPositions: folder.configInteger("max_position_embeddings"),
    layerNormEps: folder.configNumber("layer_norm_eps", 1e-5),
    hiddenAct: hiddenAct as ClipActivation,
  };
}

export interface Linear {
  /** [out, in], the file's dtype. */
  weight: Tensor;
  /** [out] f32. */
  bias: Tensor;
}

export interface Norm {
  weight: Tensor;
  bias: Tensor;
}

export interface ClipLayer {
  layerNorm1: Norm;
  layerNorm2: Norm;
  q: Linear;
  k: Linear;
  v: Linear;
  out: Linear;
  fc1: Linear;
  fc2: Linear;
}

/** What the pooled output needs beyond the penultimate layer. */
export interface ClipPoolingWeights {
  lastLayer: ClipLayer;
  finalNorm: Norm;
  /** [projection, hidden], no bias. */
  projection: Tensor;
}

export interface ClipTextModel {
  config: ClipTextConfig;
  /** [vocab, hidden], the file's dtype (gathered in windows when over one binding). */
  tokenEmbedding: Tensor;
  /** [maxPositions, hidden] f32. */
  positionEmbedding: Tensor;
  /** Layers 0..L-2: the ones the penultimate output runs through. */
  layers: ClipLayer[];
  /** Present when loaded with `pooled`. */
  pooling?: ClipPoolingWeights;
  /** Features of the pooled output (text_projection rows), when loaded with `pooled`. */
  pooledDim?: number;
  /** Bytes of GPU memory the weights take. */
  gpuBytes: number;
  /** Where the weights came from, for error messages. */
  source: string;
}

export interface LoadClipOptions {
  /**
   * Load the last layer, final_layer_norm and text_projection for the pooled output (needs a
   * CLIPTextModelWithProjection checkpoint). Without it only the penultimate output exists.
   */
  pooled?: boolean;
  /** Called after each tensor is on the GPU. */
  onTensor?: (name: string, done: number, total: number) => void;
}

const layerPrefix = (i: number) => `${PREFIX}encoder.layers.${i}.`;

/** A layer's LayerNorm and Linear modules, by their names in the layer. */
const LAYER_NORMS = { layerNorm1: "layer_norm1", layerNorm2: "layer_norm2" } as const;
const LAYER_LINEARS = {
  q: "self_attn.q_proj",
  k: "self_attn.k_proj",
  v: "self_attn.v_proj",
  out: "self_attn.out_proj",
  fc1: "mlp.fc1",
  fc2: "mlp.fc2",
} as const;

/**
 * One layer's tensors: weight matrices stay in the file's dtype, the rest is f32; none is read
 * unless `read`.
 */
function layerSpecs(c: ClipTextConfig, read: boolean): WeightSpec[] {
  const h = c.hiddenSize;
  const f32 = read ? "f32" : "unread";
  const stored = read ? "stored" : "unread";
  const inOut: Record<keyof typeof LAYER_LINEARS, [number, number]> = {
    q: [h, h],
    k: [h, h],
    v: [h, h],
    out: [h, h],
    fc1: [h, c.intermediateSize],
    fc2: [c.intermediateSize, h],
  };
  return [
    ...Object.values(LAYER_NORMS).flatMap((norm): WeightSpec[] => [
      { name: `${norm}.weight`, shape: [h], placement: f32 },
      { name: `${norm}.bias`, shape: [h], placement: f32 },
    ]),
    ...Object.entries(LAYER_LINEARS).flatMap(([key, linear]): WeightSpec[] => {
      const [inFeatures, out] = inOut[key as keyof typeof LAYER_LINEARS];
      return [
        { name: `${linear}.weight`, shape: [out, inFeatures], placement: stored },
        { name: `${linear}.bias`, shape: [out], placement: f32 },
      ];
    }),
  ];
}

/**
 * Every tensor of a CLIP text model (Hugging Face names) with its shape from `c`;
 * `projectionDim` declares a `text_projection` (CLIPTextModelWithProjection). Without `pooled`,
 * the last layer, final_layer_norm and text_projection are checked but not read.
 */
export function clipWeightSchema(
  c: ClipTextConfig,
  options: { pooled: boolean; projectionDim?: number; configPath: string },
): WeightSchema {
  const h = c.hiddenSize;
  const pooling = options.pooled ? "f32" : "unread";
  const tensors: WeightSpec[] = [
    { name: TOKEN_EMBEDDING, shape: [c.vocabSize, h], placement: "stored" },
    { name: POSITION_EMBEDDING, shape: [c.maxPositions, h], placement: "f32" },
    ...perLayer(
      c.numLayers,
      layerPrefix,
      (i) => layerSpecs(c, i < c.numLayers - 1 || options.pooled),
    ),
    { name: `${FINAL_NORM}.weight`, shape: [h], placement: pooling },
    { name: `${FINAL_NORM}.bias`, shape: [h], placement: pooling },
  ];
  if (options.projectionDim !== undefined) {
    tensors.push({
      name: TEXT_PROJECTION,
      shape: [options.projectionDim, h],
      placement: options.pooled ? "stored" : "unread",
    });
  }
  return {
    model: `a CLIP text model with ${c.numLayers} layers`,
    config: options.configPath,
    tensors,
    ignore: (name) => name === POSITION_IDS,
  };
}

/**
 * Streams a CLIP text model onto the GPU one shard and one tensor at a time (host memory peaks
 * at about one tensor), after checking every tensor's name and shape against the config.
 */
export async function loadClipTextModel(
  gpu: Gpu,
  folder: ModelFolder,
  options: LoadClipOptions = {},
): Promise<ClipTextModel> {
  const pooled = options.pooled ?? false;
  const config = clipTextConfig(folder);
  const hasProjection = folder.has(TEXT_PROJECTION);
  if (pooled && !hasProjection) {
    throw new Error(
      `${folder.weightsPath}: no tensor "${TEXT_PROJECTION}", which the pooled output needs; ` +
        `${folder.dir} must hold a CLIPTextModelWithProjection (SDXL's text_encoder_2/)`,
    );
  }
  const schema = clipWeightSchema(config, {
    pooled,
    projectionDim: hasProjection ? folder.configInteger("projection_dim") : undefined,
    configPath: `${folder.dir}/config.json`,
  });
  const loaded = await loadWeights(gpu, folder, schema, { onTensor: options.onTensor });
  /** A Linear's or a LayerNorm's weight and bias. */
  const pair = (name: string): Linear & Norm => ({
    weight: loaded.tensor(`${name}.weight`),
    bias: loaded.tensor(`${name}.bias`),
  });
  const layer = (i: number): ClipLayer => {
    const p = layerPrefix(i);
    return {
      layerNorm1: pair(p + LAYER_NORMS.layerNorm1),
      layerNorm2: pair(p + LAYER_NORMS.layerNorm2),
      q: pair(p + LAYER_LINEARS.q),
      k: pair(p + LAYER_LINEARS.k),
      v: pair(p + LAYER_LINEARS.v),
      out: pair(p + LAYER_LINEARS.out),
      fc1: pair(p + LAYER_LINEARS.fc1),
      fc2: pair(p + LAYER_LINEARS.fc2),
    };
  };
  const model: ClipTextModel = {
    config,
    tokenEmbedding: loaded.tensor(TOKEN_EMBEDDING),
    positionEmbedding: loaded.tensor(POSITION_EMBEDDING),
    layers: Array.from({ length: config.numLayers - 1 }, (_, i) => layer(i)),
    gpuBytes: loaded.gpuBytes,
    source: folder.dir,
  };
  if (pooled) {
    const projection = loaded.tensor(TEXT_PROJECTION);
    model.pooling = {
      lastLayer: layer(config.numLayers - 1),
      finalNorm: pair(FINAL_NORM),
      projection,
    };
    model.pooledDim = projection.shape[0];
  }
  return model;
}

export function destroyClipTextModel(model: ClipTextModel): void {
  const layers = model.pooling ? [...model.layers, model.pooling.lastLayer] : model.layers;
  const tensors = [model.tokenEmbedding, model.positionEmbedding];
  for (const l of layers) {
    for (const part of [l.layerNorm1, l.layerNorm2, l.q, l.k, l.v, l.out, l.fc1, l.fc2]) {
      tensors.push(part.weight, part.bias);
    }
  }
  if (model.pooling) {
    const { finalNorm, projection } = model.pooling;
    tensors.push(finalNorm.weight, finalNorm.bias, projection);
  }
  for (const t of tensors) t.destroy();
}

/**
 * The pooling position of each row of `ids` ([batch, seqLen]): the first position of the
 * largest id, Hugging Face's rule for configs whose `eos_token_id` is the legacy 2 (SDXL's);
 * with the real vocabulary that is the first `<|endoftext|>`.
 */
export function clipPoolingPositions(
  ids: ArrayLike<number>,
  batch: number,
  seqLen: number,
): number[] {
  const positions: number[] = [];
  for (let b = 0; b < batch; b++) {
    let best = 0;
    for (let t = 1; t < seqLen; t++) {
      if (ids[b * seqLen + t] > ids[b * seqLen + best]) best = t;
    }
    positions.push(best);
  }
  return positions;
}

/** The outputs of a forward pass, f32 on the GPU; the caller destroys them. */
export interface ClipTextOutputs {
  /** [batch * seqLen, hidden]: the output of layer L-2. */
  penultimate: Tensor;
  /** [batch, pooledDim], when the model was loaded with `pooled`. */
  pooled?: Tensor;
  /** The pooling position of each row. */
  eos: number[];
}

function checkIds(model: ClipTextModel, ids: ArrayLike<number>, batch: number, seqLen: number) {
  const { vocabSize, maxPositions } = model.config;
  if (!Number.isInteger(batch) || batch < 1 || ids.length !== batch * seqLen) {
    throw new Error(
      `CLIP text model ${model.source}: ${ids.length} ids for batch ${batch} x ${seqLen}`,
    );
  }
  if (seqLen > maxPositions) {
    throw new Error(
      `CLIP text model ${model.source}: sequences of ${seqLen} tokens exceed its ` +
        `max_position_embeddings ${maxPositions}`,
    );
  }
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
      throw new Error(
        `CLIP text model ${model.source}: token id ${id} (row ${Math.floor(i / seqLen)}, ` +
          `position ${i % seqLen}) is outside its vocabulary 0..${vocabSize - 1}; the tokenizer ` +
          `and the text encoder do not belong together`,
      );
    }
  }
}

function linear(gpu: Gpu, x: Tensor, l: Linear): Tensor {
  return matmul(gpu, x, l.weight, { bias: l.bias });
}

/** fc2(act(fc1(layer_norm2(x)))) added into x. */
function mlpResidual(gpu: Gpu, c: ClipTextConfig, layer: ClipLayer, x: Tensor): void {
  const h = layerNorm(gpu, x, layer.layerNorm2.weight, layer.layerNorm2.bias, c.layerNormEps);
  const up = linear(gpu, h, layer.fc1);
  h.destroy();
  const act = c.hiddenAct === "gelu" ? gelu(gpu, up) : quickGelu(gpu, up);
  up.destroy();
  const down = linear(gpu, act, layer.fc2);
  act.destroy();
  addInPlace(gpu, x, down);
  down.destroy();
}

/** One full layer, updating the residual stream `x` [batch * seqLen, hidden] in place. */
function clipLayer(
  gpu: Gpu,
  c: ClipTextConfig,
  layer: ClipLayer,
  x: Tensor,
  batch: number,
  seqLen: number,
): void {
  const h = layerNorm(gpu, x, layer.layerNorm1.weight, layer.layerNorm1.bias, c.layerNormEps);
  const [q, k, v] = [layer.q, layer.k, layer.v].map((l) => linear(gpu, h, l));
  h.destroy();
  const shape = [batch, seqLen, c.hiddenSize];
  const a = attention(gpu, q.reshape(shape), k.reshape(shape), v.reshape(shape), {
    numHeads: c.numHeads,
    causal: true,
  });
  for (const t of [q, k, v]) t.destroy();
  const o = linear(gpu, a.reshape([batch * seqLen, c.hiddenSize]), layer.out);
  a.destroy();
  addInPlace(gpu, x, o);
  o.destroy();
  mlpResidual(gpu, c, layer, x);
}

/**
 * The pooled output from the penultimate stream `x`: the last layer at the `eos` rows only
 * (keys and values at every position), final_layer_norm, text_projection.
 */
function clipPooled(
  gpu: Gpu,
  model: ClipTextModel,
  x: Tensor,
  batch: number,
  seqLen: number,
  eos: number[],
): Tensor {
  const c = model.config;
  const { lastLayer: layer, finalNorm, projection } = model.pooling!;
  // Uploaded once for both gathers (a host upload submits pending work).
  const eosRows = gpu.upload(Int32Array.from(eos, (t, b) => b * seqLen + t), [batch], "i32", "eos");
  const h = layerNorm(gpu, x, layer.layerNorm1.weight, layer.layerNorm1.bias, c.layerNormEps);
  const k = linear(gpu, h, layer.k);
  const v = linear(gpu, h, layer.v);
  const hEos = embeddingGather(gpu, h, eosRows);
  h.destroy();
  const q = linear(gpu, hEos, layer.q);
  hEos.destroy();
  const kvShape = [batch, seqLen, c.hiddenSize];
  // Query eos of row b sees keys 0..eos[b], the keys its causal row sees.
  const a = attention(
    gpu,
    q.reshape([batch, 1, c.hiddenSize]),
    k.reshape(kvShape),
    v.reshape(kvShape),
    {
      numHeads: c.numHeads,
      keyLengths: eos.map((t) => t + 1),
    },
  );
  for (const t of [q, k, v]) t.destroy();
  const o = linear(gpu, a.reshape([batch, c.hiddenSize]), layer.out);
  a.destroy();
  const xEos = embeddingGather(gpu, x, eosRows);
  addInPlace(gpu, xEos, o);
  o.destroy();
  eosRows.destroy();
  mlpResidual(gpu, c, layer, xEos);
  const last = layerNorm(gpu, xEos, finalNorm.weight, finalNorm.bias, c.layerNormEps);
  xEos.destroy();
  const pooled = matmul(gpu, last, projection);
  last.destroy();
  return pooled;
}

/**
 * Runs the model on `ids` ([batch, seqLen] row-major, no attention mask besides the causal
 * one: padding positions are computed like any other, as diffusers does). Records GPU work
 * only; read the outputs to run it.
 */
export function clipTextForward(
  gpu: Gpu,
  model: ClipTextModel,
  ids: ArrayLike<number>,
  batch: number,
  seqLen: number,
): ClipTextOutputs {
  checkIds(model, ids, batch, seqLen);
  const c = model.config;
  const positions = Int32Array.from({ length: batch * seqLen }, (_, i) => i % seqLen);
  const tokens = embeddingGather(gpu, model.tokenEmbedding, Int32Array.from(ids));
  const pos = embeddingGather(gpu, model.positionEmbedding, positions);
  const x = addInPlace(gpu, tokens, pos);
  pos.destroy();
  for (const layer of model.layers) clipLayer(gpu, c, layer, x, batch, seqLen);
  const eos = clipPoolingPositions(ids, batch, seqLen);
  const pooled = model.pooling ? clipPooled(gpu, model, x, batch, seqLen, eos) : undefined;
  return { penultimate: x, pooled, eos };
}
