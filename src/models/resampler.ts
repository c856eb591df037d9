/**
 * The Perceiver Resampler (docs/numerics.md §4): learned latent queries cross-attend to the
 * student's hidden states and become SDXL's conditioning, `seq` [B, Q, dim_seq] (prompt_embeds)
 * and `pooled` [B, dim_pooled] (pooled text embeds). It is trained, so the forward can keep
 * what the backward reads (`ResamplerActivations`, llm.c style) and `resamplerBackward`
 * returns the gradient of every parameter and of the input hidden states (which flows on into
 * the student's LoRA).
 *
 * Parameters live in one map keyed by their safetensors names (the oracle's, see
 * tests/fixtures/resampler/README.md), which is also what the optimiser and the gradient map
 * use. A checkpoint folder holds `resampler_config.json` and `resampler.safetensors`.
 */
import { join } from "node:path";
import type { Gpu } from "../gpu/device.ts";
import { Tensor } from "../gpu/tensor.ts";
import { writeFileAtomic } from "../io/atomic.ts";
import { SafetensorsFile, writeSafetensors } from "../io/safetensors.ts";
import { gelu, geluBackward } from "../ops/activation.ts";
import { ATTENTION_MAX_HEAD_DIM, attentionBackward, attentionWithStats } from "../ops/attention.ts";
import { addInPlace } from "../ops/elementwise.ts";
import { type IndexInput, type IndexTensor, indexTensor } from "../ops/indices.ts";
import {
  concatLastAxis,
  concatRows,
  concatRowsBackward,
  meanOverSequence,
  meanOverSequenceBackward,
  splitLastAxis,
} from "../ops/layout.ts";
import { matmul } from "../ops/matmul.ts";
import {
  layerNormBackward,
  type LayerNormBackwardOptions,
  type LayerNormResult,
  layerNormWithStats,
} from "../ops/norm.ts";
import { columnSum } from "../ops/reduce.ts";
import type { Rng } from "../util/rng.ts";

export const RESAMPLER_CONFIG_FILE = "resampler_config.json";
export const RESAMPLER_WEIGHTS_FILE = "resampler.safetensors";

/** All LayerNorms of the resampler use this eps. */
const LN_EPS = 1e-5;

/** Sizes of a Perceiver Resampler (docs/numerics.md §4); `resampler_config.json` in snake_case. */
export interface ResamplerConfig {
  /** The student's hidden size. */
  dimIn: number;
  /** Width of the latents and of the projected input. */
  dim: number;
  /** Number of attention + feed-forward blocks. */
  depth: number;
  /** Attention heads per block. */
  heads: number;
  /** Features per attention head (a multiple of 4). */
  dimHead: number;
  /** Feed-forward hidden width as a multiple of `dim`. */
  ffMult: number;
  /** Learned latent queries: the tokens of the output sequence (77 for SDXL). */
  numQueries: number;
  /** Features per output token, `prompt_embeds` (2048 for SDXL). */
  dimSeq: number;
  /** Features of the pooled output, `pooled_prompt_embeds` (1280 for SDXL). */
  dimPooled: number;
  /**
   * Learned absolute positions added to the projected student states (`pos_emb`
   * [num_positions, dim]); 0: none. The student's hidden states carry no absolute position
   * (RoPE is relative), so without them a latent query cannot ask for "the i-th token", which
   * is what most of the teacher's sequence depends on. Prompts may have at most this many tokens.
   */
  numPositions: number;
  /**
   * A learned offset per output token (`seq_bias` [num_queries, dim_seq]) added to `seq`, so
   * training can start from the per-position mean of the targets (`initOutputsAtMean`).
   */
  seqBias: boolean;
}

export const RESAMPLER_DEFAULTS: Readonly<Omit<ResamplerConfig, "dimIn">> = {
  dim: 2048,
  depth: 4,
  heads: 16,
  dimHead: 128,
  ffMult: 4,
  numQueries: 77,
  dimSeq: 2048,
  dimPooled: 1280,
  numPositions: 0,
  seqBias: false,
};

type SizeField = Exclude<keyof ResamplerConfig, "numPositions" | "seqBias">;

/** JSON key of each size field, in the order they are written. */
const JSON_KEYS: ReadonlyArray<readonly [SizeField, string]> = [
  ["dimIn", "dim_in"],
  ["dim", "dim"],
  ["depth", "depth"],
  ["heads", "heads"],
  ["dimHead", "dim_head"],
  ["ffMult", "ff_mult"],
  ["numQueries", "num_queries"],
  ["dimSeq", "dim_seq"],
  ["dimPooled", "dim_pooled"],
];

/** Checks sizes the kernels can run; `where` names the file or flag the config came from. */
export function checkResamplerConfig(config: ResamplerConfig, where: string): void {
  for (const [field, key] of JSON_KEYS) {
    const value = config[field];
    if (!Number.isInteger(value) || value < 1) {
      throw new Error(`${where}: '${key}' must be a positive integer (got ${value})`);
    }
  }
  if (!Number.isInteger(config.numPositions) || config.numPositions < 0) {
    throw new Error(
      `${where}: 'num_positions' must be an integer >= 0 (got ${config.numPositions})`,
    );
  }
  if (typeof config.seqBias !== "boolean") {
    throw new Error(`${where}: 'seq_bias' must be true or false (got ${config.seqBias})`);
  }
  if (config.dimHead % 4 !== 0 || config.dimHead > ATTENTION_MAX_HEAD_DIM) {
    throw new Error(
      `${where}: 'dim_head' ${config.dimHead} must be a multiple of 4 up to ` +
        `${ATTENTION_MAX_HEAD_DIM} (what the attention kernel supports)`,
    );
  }
}

/** A config from its JSON form: missing keys take the defaults, except the required dim_in. */
export function parseResamplerConfig(json: unknown, where: string): ResamplerConfig {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new Error(`${where}: expected a JSON object with the resampler's sizes`);
  }
  const fields = json as Record<string, unknown>;
  const known = new Set([...JSON_KEYS.map(([, key]) => key), "num_positions", "seq_bias"]);
  for (const key of Object.keys(fields)) {
    if (!known.has(key)) {
      throw new Error(
        `${where}: unknown key '${key}'; a resampler config has ${[...known].join(", ")}`,
      );
    }
  }
  if (fields.dim_in === undefined) {
    throw new Error(`${where}: 'dim_in' (the student's hidden size) is required`);
  }
  const config = { ...RESAMPLER_DEFAULTS } as ResamplerConfig;
  for (const [field, key] of JSON_KEYS) {
    const value = fields[key];
    if (value === undefined) continue;
    if (typeof value !== "number") {
      throw new Error(`${where}: '${key}' must be a number (got ${JSON.stringify(value)})`);
    }
    config[field] = value;
  }
  if (fields.num_positions !== undefined) {
    if (typeof fields.num_positions !== "number") {
      throw new Error(
        `${where}: 'num_positions' must be a number (got ${JSON.stringify(fields.num_positions)})`,
      );
    }
    config.numPositions = fields.num_positions;
  }
  if (fields.seq_bias !== undefined) {
    if (typeof fields.seq_bias !== "boolean") {
      throw new Error(
        `${where}: 'seq_bias' must be true or false (got ${JSON.stringify(fields.seq_bias)})`,
      );
    }
    config.seqBias = fields.seq_bias;
  }
  checkResamplerConfig(config, where);
  return config;
}

/**
 * The config in its JSON form. The optional parts are written only when used, so a resampler
 * without them has the seed's file format.
 */
export function resamplerConfigJson(config: ResamplerConfig): Record<string, number | boolean> {
  const json: Record<string, number | boolean> = Object.fromEntries(
    JSON_KEYS.map(([field, key]) => [key, config[field]]),
  );
  if (config.numPositions > 0) json.num_positions = config.numPositions;
  if (config.seqBias) json.seq_bias = true;
  return json;
}

export async function readResamplerConfig(path: string): Promise<ResamplerConfig> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new Error(
        `${path} not found: a resampler folder holds ${RESAMPLER_CONFIG_FILE} and ${RESAMPLER_WEIGHTS_FILE}`,
      );
    }
    throw err;
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new Error(`${path}: invalid JSON (${(err as Error).message})`);
  }
  return parseResamplerConfig(json, path);
}

/** Throws unless the resampler reads hidden states of the student's size. */
export function checkResamplerFitsStudent(
  config: ResamplerConfig,
  studentHiddenSize: number,
  where: string,
): void {
  if (config.dimIn !== studentHiddenSize) {
    throw new Error(
      `${where}: this resampler expects dim_in ${config.dimIn} but the student has hidden ` +
        `size ${studentHiddenSize}; use a resampler trained for this student, or start a new one`,
    );
  }
}

type ParamInit = "latents" | "linear" | "ones" | "zeros" | "sinusoid";

interface ParamSpec {
  shape: number[];
  init: ParamInit;
  /** Input features of the Linear layer a weight or bias belongs to. */
  fanIn: number;
}

/** Every parameter's name, shape and initialisation, in file order. */
function paramSpecs(c: ResamplerConfig): Map<string, ParamSpec> {
  const inner = c.heads * c.dimHead;
  const specs = new Map<string, ParamSpec>();
  const linear = (name: string, out: number, fanIn: number, bias: boolean) => {
    specs.set(`${name}.weight`, { shape: [out, fanIn], init: "linear", fanIn });
    if (bias) specs.set(`${name}.bias`, { shape: [out], init: "linear", fanIn });
  };
  const norm = (name: string) => {
    specs.set(`${name}.weight`, { shape: [c.dim], init: "ones", fanIn: 0 });
    specs.set(`${name}.bias`, { shape: [c.dim], init: "zeros", fanIn: 0 });
  };
  specs.set("latents", { shape: [c.numQueries, c.dim], init: "latents", fanIn: 0 });
  linear("proj_in", c.dim, c.dimIn, true);
  if (c.numPositions > 0) {
    specs.set("pos_emb", { shape: [c.numPositions, c.dim], init: "sinusoid", fanIn: 0 });
  }
  for (let i = 0; i < c.depth; i++) {
    norm(`layers.${i}.attn.norm_x`);
    norm(`layers.${i}.attn.norm_l`);
    linear(`layers.${i}.attn.to_q`, inner, c.dim, false);
    linear(`layers.${i}.attn.to_kv`, 2 * inner, c.dim, false);
    linear(`layers.${i}.attn.to_out`, c.dim, inner, false);
    norm(`layers.${i}.ff.norm`);
    linear(`layers.${i}.ff.w1`, c.dim * c.ffMult, c.dim, false);
    linear(`layers.${i}.ff.w2`, c.dim, c.dim * c.ffMult, false);
  }
  linear("proj_out", c.dimSeq, c.dim, true);
  if (c.seqBias) {
    specs.set("seq_bias", { shape: [c.numQueries, c.dimSeq], init: "zeros", fanIn: 0 });
  }
  norm("norm_pool");
  linear("proj_pooled", c.dimPooled, c.dim, true);
  return specs;
}

/** Parameter names and shapes in file order. */
export function resamplerParamShapes(config: ResamplerConfig): Map<string, number[]> {
  return new Map([...paramSpecs(config)].map(([name, spec]) => [name, spec.shape]));
}

export function resamplerParamCount(config: ResamplerConfig): number {
  let count = 0;
  for (const { shape } of paramSpecs(config).values()) count += shape.reduce((a, b) => a * b, 1);
  return count;
}

/** A resampler's parameters on the GPU with the sizes they were made for. */
export interface ResamplerWeights {
  /** The sizes of the parameters. */
  config: ResamplerConfig;
  /** Every parameter (f32, trainable) by its safetensors name, in file order. */
  params: Map<string, Tensor>;
}

/**
 * Fresh weights: latents N(0, 1) * dim^-0.5; Linear weights and biases as PyTorch's default
 * (kaiming-uniform with a = √5, i.e. U(-1/√in, 1/√in), and the bias from the same range);
 * LayerNorm weight 1, bias 0; `seq_bias` 0 and `pos_emb` the sinusoids of "Attention Is All
 * You Need" (nearby positions start similar, so a query learns an offset, not 77 separate
 * positions). Values are drawn in file order; the optional parts draw none, so the other
 * parameters are the same with and without them.
 */
export function initResampler(gpu: Gpu, config: ResamplerConfig, rng: Rng): ResamplerWeights {
  checkResamplerConfig(config, "resampler config");
  const params = new Map<string, Tensor>();
  for (const [name, { shape, init, fanIn }] of paramSpecs(config)) {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    if (init === "latents") rng.fillNormal(data, config.dim ** -0.5);
    if (init === "linear") rng.fillUniform(data, -1 / Math.sqrt(fanIn), 1 / Math.sqrt(fanIn));
    if (init === "ones") data.fill(1);
    if (init === "sinusoid") fillSinusoid(data, config.dim);
    params.set(name, gpu.upload(data, shape, "f32", name));
  }
  return { config, params };
}

/**
 * Makes a fresh resampler (with `seq_bias`) output the given means for every input: `seq_bias`
 * = the per-position mean, `proj_pooled.bias` = the pooled mean, and the weights and bias of
 * both output projections 0. Training then starts from the best prompt-independent output and
 * learns only what depends on the prompt; the zero projections get gradients from the first
 * step on, as LoRA's zero B does.
 */
export function startResamplerAtMean(
  gpu: Gpu,
  weights: ResamplerWeights,
  mean: { seq: Float32Array; pooled: Float32Array },
): void {
  if (!weights.config.seqBias) {
    throw new Error(`startResamplerAtMean: the resampler has no seq_bias to hold the mean`);
  }
  gpu.write(param(weights, "seq_bias"), mean.seq);
  gpu.write(param(weights, "proj_pooled.bias"), mean.pooled);
  for (const name of ["proj_out.weight", "proj_out.bias", "proj_pooled.weight"]) {
    gpu.clear(param(weights, name));
  }
}

/** rows x dim sinusoids: [p, 2i] = sin(p / 10000^(2i/dim)), [p, 2i+1] = cos of the same. */
function fillSinusoid(data: Float32Array, dim: number): void {
  for (let p = 0; p < data.length / dim; p++) {
    for (let i = 0; i < dim; i++) {
      const angle = p / 10000 ** ((i - (i % 2)) / dim);
      data[p * dim + i] = i % 2 === 0 ? Math.sin(angle) : Math.cos(angle);
    }
  }
}

/** Writes `resampler_config.json` and `resampler.safetensors` (F32) into `dir`, atomically. */
export async function saveResampler(
  gpu: Gpu,
  weights: ResamplerWeights,
  dir: string,
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const names = [...weights.params.keys()];
  const data = await gpu.readAll([...weights.params.values()]);
  await writeSafetensors(
    join(dir, RESAMPLER_WEIGHTS_FILE),
    names.map((name, i) => ({
      name,
      dtype: "F32",
      shape: [...weights.params.get(name)!.shape],
      data: data[i] as Float32Array,
    })),
    { format: "pt" },
  );
  await writeFileAtomic(
    join(dir, RESAMPLER_CONFIG_FILE),
    JSON.stringify(resamplerConfigJson(weights.config), null, 2) + "\n",
  );
}

/**
 * Reads weights for `config` from a safetensors file (F32, F16 or BF16; uploaded as f32),
 * checking that the file holds exactly the tensors the config implies, with their shapes.
 */
export async function loadResamplerWeights(
  gpu: Gpu,
  config: ResamplerConfig,
  path: string,
  configWhere = "the resampler config",
): Promise<ResamplerWeights> {
  checkResamplerConfig(config, configWhere);
  const shapes = resamplerParamShapes(config);
  const file = await SafetensorsFile.open(path);
  const params = new Map<string, Tensor>();
  try {
    for (const name of file.names()) {
      if (!shapes.has(name)) {
        throw new Error(
          `${path}: tensor '${name}' is not a parameter of the resampler ${configWhere} ` +
            `describes (depth ${config.depth}); the config and the weights disagree`,
        );
      }
    }
    for (const [name, shape] of shapes) {
      if (!file.has(name)) {
        throw new Error(
          `${path}: tensor '${name}' is missing, but ${configWhere} (depth ${config.depth}) ` +
            `needs it; the config and the weights disagree, or the file is incomplete`,
        );
      }
      const info = file.info(name);
      if (info.shape.join(",") !== shape.join(",")) {
        throw new Error(
          `${path}: tensor '${name}' has shape [${info.shape}] but ${configWhere} implies ` +
            `[${shape}]; the config and the weights disagree`,
        );
      }
      if (!["F32", "F16", "BF16"].includes(info.dtype)) {
        throw new Error(`${path}: tensor '${name}' is ${info.dtype}; expected F32, F16 or BF16`);
      }
      params.set(name, gpu.upload(await file.readF32(name), shape, "f32", name));
    }
  } catch (err) {
    for (const t of params.values()) t.destroy();
    throw err;
  } finally {
    file.close();
  }
  return { config, params };
}

export interface LoadResamplerOptions {
  /** The student's hidden size; a resampler with another dim_in is refused. */
  studentHiddenSize?: number;
}

/** Reads a folder written by `saveResampler`. */
export async function loadResampler(
  gpu: Gpu,
  dir: string,
  options: LoadResamplerOptions = {},
): Promise<ResamplerWeights> {
  const configPath = join(dir, RESAMPLER_CONFIG_FILE);
  const config = await readResamplerConfig(configPath);
  if (options.studentHiddenSize !== undefined) {
    checkResamplerFitsStudent(config, options.studentHiddenSize, configPath);
  }
  return await loadResamplerWeights(gpu, config, join(dir, RESAMPLER_WEIGHTS_FILE), configPath);
}

export function destroyResampler(weights: ResamplerWeights): void {
  for (const t of weights.params.values()) t.destroy();
}

function param(w: ResamplerWeights, name: string): Tensor {
  const t = w.params.get(name);
  if (!t) throw new Error(`resampler: parameter '${name}' is missing from the weights`);
  return t;
}

/** What one block's backward reads. */
interface BlockActivations {
  /** The latents entering the block, [B, Q, dim]. */
  latentsIn: Tensor;
  /** norm_x statistics over x (its output lives on only inside `kvInput`). */
  normX: { mean: Tensor; rstd: Tensor };
  /** norm_l(latentsIn): y [B, Q, dim] and statistics. */
  normL: LayerNormResult;
  /** concat_seq(norm_x(x), norm_l(latents)) [B, T + Q, dim]. */
  kvInput: Tensor;
  q: Tensor;
  k: Tensor;
  v: Tensor;
  /** Attention output [B, Q, inner] and its log-sum-exp [B, heads, Q]. */
  attn: Tensor;
  lse: Tensor;
  /** Latents after the attention residual, [B, Q, dim]. */
  latentsMid: Tensor;
  normFf: LayerNormResult;
  /** w1 output before GELU [B, Q, dim * ff_mult], and after. */
  ffHidden: Tensor;
  ffAct: Tensor;
}

/** Everything `resamplerBackward` needs from the forward; free it with `destroyResamplerActivations`. */
export interface ResamplerActivations {
  batch: number;
  seqLen: number;
  /** The caller's input [B, T, dim_in]: borrowed, not destroyed with the activations. */
  hidden: Tensor;
  keyLengths: IndexTensor;
  /** proj_in(hidden) [B, T, dim]. */
  x: Tensor;
  blocks: BlockActivations[];
  /** Latents after the last block [B, Q, dim]. */
  latentsOut: Tensor;
  /** mean over Q of latentsOut [B, dim] and norm_pool of it. */
  pooledMean: Tensor;
  normPool: LayerNormResult;
}

export interface ResamplerOutputs {
  /** [B, Q, dim_seq] */
  seq: Tensor;
  /** [B, dim_pooled] */
  pooled: Tensor;
}

export interface ResamplerTrainOutputs extends ResamplerOutputs {
  acts: ResamplerActivations;
}

function destroyBlock(block: BlockActivations): void {
  for (const value of Object.values(block)) {
    const tensors = value instanceof Tensor ? [value] : Object.values(value) as Tensor[];
    for (const t of tensors) t.destroy();
  }
}

export function destroyResamplerActivations(acts: ResamplerActivations): void {
  if (acts.keyLengths.owned) acts.keyLengths.tensor.destroy();
  for (const block of acts.blocks) destroyBlock(block);
  for (const t of [acts.x, acts.latentsOut, acts.pooledMean, ...Object.values(acts.normPool)]) {
    t.destroy();
  }
}

/** The first `rows` rows of a parameter [R, n] copied for every batch row: [B, rows, n]. */
function repeatForBatch(gpu: Gpu, param: Tensor, rows: number, batch: number): Tensor {
  const width = param.shape[1];
  const bytes = rows * width * 4;
  const out = gpu.empty([batch, rows, width], "f32", param.name);
  for (let b = 0; b < batch; b++) gpu.copy(param, 0, out, b * bytes, bytes);
  return out;
}

/**
 * Gradient of a parameter [R, n] whose first `rows` rows were repeated over the batch: the sum
 * over batch rows of dy [B, rows, n], zero in the rows past `rows`.
 */
function repeatForBatchBackward(gpu: Gpu, dy: Tensor, param: Tensor): Tensor {
  const [batch, rows, width] = dy.shape;
  const name = `grad.${param.name}`;
  if (rows === param.shape[0]) {
    return columnSum(gpu, dy.reshape([batch, rows * width]), gpu.empty(param.shape, "f32", name));
  }
  const grad = gpu.zeros(param.shape, "f32", name);
  const sum = columnSum(gpu, dy.reshape([batch, rows * width]));
  gpu.copy(sum, 0, grad, 0, sum.byteLength);
  sum.destroy();
  return grad;
}

/** A view of t as [rows, last axis], the 2-D operand a weight gradient needs. */
function rows2d(t: Tensor): Tensor {
  const last = t.shape.at(-1)!;
  return t.reshape([t.size / last, last]);
}

function resamplerForwardImpl(
  gpu: Gpu,
  w: ResamplerWeights,
  hidden: Tensor,
  keyLengths: IndexInput,
  keep: boolean,
): ResamplerTrainOutputs {
  const c = w.config;
  const op = "resamplerForward";
  if (hidden.dtype !== "f32" || hidden.shape.length !== 3) {
    throw new Error(
      `${op}: hidden '${hidden.name}' [${hidden.shape}] ${hidden.dtype} must be f32 [B, T, dim_in]`,
    );
  }
  const [batch, seqLen, width] = hidden.shape;
  checkResamplerFitsStudent(c, width, op);
  const lengths = indexTensor(gpu, op, "keyLengths", keyLengths, {
    length: { count: batch, meaning: "one number of real student positions per batch row" },
    check: (len, b) => {
      if (len < 0 || len > seqLen) {
        throw new Error(`${op}: keyLengths[${b}] = ${len} is outside [0, ${seqLen}]`);
      }
    },
  });
  const inner = c.heads * c.dimHead;
  const attnOptions = { numHeads: c.heads, keyLengths: lengths.tensor, alwaysVisibleFrom: seqLen };
  if (c.numPositions > 0 && seqLen > c.numPositions) {
    throw new Error(
      `${op}: ${seqLen} student positions, but this resampler has positions for at most ` +
        `${c.numPositions} (num_positions); cut prompts to ${c.numPositions} tokens (--max-tokens)`,
    );
  }
  const x = matmul(gpu, hidden, param(w, "proj_in.weight"), { bias: param(w, "proj_in.bias") });
  if (c.numPositions > 0) {
    const positions = repeatForBatch(gpu, param(w, "pos_emb"), seqLen, batch);
    addInPlace(gpu, x, positions);
    positions.destroy();
  }
  const latentsParam = param(w, "latents");
  let latents = repeatForBatch(gpu, latentsParam, latentsParam.shape[0], batch);
  const blocks: BlockActivations[] = [];
  for (let i = 0; i < c.depth; i++) {
    const p = (name: string) => param(w, `layers.${i}.${name}`);
    const latentsIn = latents;
    const normX = layerNormWithStats(
      gpu,
      x,
      p("attn.norm_x.weight"),
      p("attn.norm_x.bias"),
      LN_EPS,
    );
    const normL = layerNormWithStats(
      gpu,
      latentsIn,
      p("attn.norm_l.weight"),
      p("attn.norm_l.bias"),
      LN_EPS,
    );
    const q = matmul(gpu, normL.y, p("attn.to_q.weight"));
    const kvInput = concatRows(gpu, normX.y, normL.y);
    normX.y.destroy();
    const kv = matmul(gpu, kvInput, p("attn.to_kv.weight"));
    const [k, v] = splitLastAxis(gpu, kv, [inner, inner]);
    kv.destroy();
    const { out: attn, lse } = attentionWithStats(gpu, q, k, v, attnOptions);
    const latentsMid = matmul(gpu, attn, p("attn.to_out.weight"));
    addInPlace(gpu, latentsMid, latentsIn);
    const normFf = layerNormWithStats(
      gpu,
      latentsMid,
      p("ff.norm.weight"),
      p("ff.norm.bias"),
      LN_EPS,
    );
    const ffHidden = matmul(gpu, normFf.y, p("ff.w1.weight"));
    const ffAct = gelu(gpu, ffHidden);
    latents = matmul(gpu, ffAct, p("ff.w2.weight"));
    addInPlace(gpu, latents, latentsMid);
    const block: BlockActivations = {
      latentsIn,
      normX: { mean: normX.mean, rstd: normX.rstd },
      normL,
      kvInput,
      q,
      k,
      v,
      attn,
      lse,
      latentsMid,
      normFf,
      ffHidden,
      ffAct,
    };
    if (keep) blocks.push(block);
    else destroyBlock(block);
  }
  const seq = matmul(gpu, latents, param(w, "proj_out.weight"), {
    bias: param(w, "proj_out.bias"),
  });
  if (c.seqBias) {
    const offsets = repeatForBatch(gpu, param(w, "seq_bias"), c.numQueries, batch);
    addInPlace(gpu, seq, offsets);
    offsets.destroy();
  }
  const pooledMean = meanOverSequence(gpu, latents);
  const normPool = layerNormWithStats(
    gpu,
    pooledMean,
    param(w, "norm_pool.weight"),
    param(w, "norm_pool.bias"),
    LN_EPS,
  );
  const pooled = matmul(gpu, normPool.y, param(w, "proj_pooled.weight"), {
    bias: param(w, "proj_pooled.bias"),
  });
  const acts: ResamplerActivations = {
    batch,
    seqLen,
    hidden,
    keyLengths: lengths,
    x,
    blocks,
    latentsOut: latents,
    pooledMean,
    normPool,
  };
  return { seq, pooled, acts };
}

/**
 * hidden [B, T, dim_in] (the student's last hidden states) and keyLengths [B] (real positions
 * per row; the padded ones are hidden from the attention) -> seq and pooled, keeping the
 * activations `resamplerBackward` needs.
 */
export function resamplerForwardTrain(
  gpu: Gpu,
  weights: ResamplerWeights,
  hidden: Tensor,
  keyLengths: IndexInput,
): ResamplerTrainOutputs {
  return resamplerForwardImpl(gpu, weights, hidden, keyLengths, true);
}

/** The forward for inference: each block's intermediates are freed as soon as it is done. */
export function resamplerForward(
  gpu: Gpu,
  weights: ResamplerWeights,
  hidden: Tensor,
  keyLengths: IndexInput,
): ResamplerOutputs {
  const { seq, pooled, acts } = resamplerForwardImpl(gpu, weights, hidden, keyLengths, false);
  destroyResamplerActivations(acts);
  return { seq, pooled };
}

export interface ResamplerGrads {
  /** d loss / d parameter for every parameter, by the parameters' names. */
  grads: Map<string, Tensor>;
  /** d loss / d hidden [B, T, dim_in]; zero at padded positions. */
  dHidden: Tensor;
}

/**
 * Backward of `resamplerForwardTrain` from dSeq [B, Q, dim_seq] and dPooled [B, dim_pooled]
 * (the loss gradients). The activations are only read: free them afterwards.
 */
export function resamplerBackward(
  gpu: Gpu,
  w: ResamplerWeights,
  acts: ResamplerActivations,
  dSeq: Tensor,
  dPooled: Tensor,
): ResamplerGrads {
  const c = w.config;
  const op = "resamplerBackward";
  const { batch, seqLen } = acts;
  const expect = (arg: string, t: Tensor, shape: number[]) => {
    if (t.dtype !== "f32" || t.shape.join(",") !== shape.join(",")) {
      throw new Error(`${op}: ${arg} '${t.name}' [${t.shape}] ${t.dtype} must be f32 [${shape}]`);
    }
  };
  expect("dSeq", dSeq, [batch, c.numQueries, c.dimSeq]);
  expect("dPooled", dPooled, [batch, c.dimPooled]);
  if (acts.blocks.length !== c.depth) {
    throw new Error(
      `${op}: the activations hold ${acts.blocks.length} blocks, not ${c.depth}: pass those of resamplerForwardTrain`,
    );
  }
  const grads = new Map<string, Tensor>();
  /** dW = dYᵀ X for a Linear y = x Wᵀ, over all rows. */
  const weightGrad = (name: string, dy: Tensor, input: Tensor) =>
    grads.set(
      name,
      matmul(gpu, rows2d(dy), rows2d(input), { transposeX: true, transposeW: false }),
    );
  const inputGrad = (dy: Tensor, name: string) =>
    matmul(gpu, dy, param(w, name), { transposeW: false });
  /** Backward of the LayerNorm `name` from its forward statistics; records its grads, gives dx. */
  const normBackward = (
    name: string,
    dy: Tensor,
    x: Tensor,
    stats: { mean: Tensor; rstd: Tensor },
    options: LayerNormBackwardOptions = {},
  ) => {
    const weight = param(w, `${name}.weight`);
    const g = layerNormBackward(gpu, dy, x, weight, stats.mean, stats.rstd, options);
    grads.set(`${name}.weight`, g.dweight!);
    grads.set(`${name}.bias`, g.dbias!);
    return g.dx;
  };

  // Heads: seq = proj_out(latents), pooled = proj_pooled(norm_pool(mean_q(latents))).
  weightGrad("proj_out.weight", dSeq, acts.latentsOut);
  grads.set("proj_out.bias", columnSum(gpu, dSeq));
  if (c.seqBias) grads.set("seq_bias", repeatForBatchBackward(gpu, dSeq, param(w, "seq_bias")));
  const dLatents = inputGrad(dSeq, "proj_out.weight");
  weightGrad("proj_pooled.weight", dPooled, acts.normPool.y);
  grads.set("proj_pooled.bias", columnSum(gpu, dPooled));
  const dNormPool = inputGrad(dPooled, "proj_pooled.weight");
  const dPooledMean = normBackward("norm_pool", dNormPool, acts.pooledMean, acts.normPool);
  const dFromMean = meanOverSequenceBackward(gpu, dPooledMean, c.numQueries);
  addInPlace(gpu, dLatents, dFromMean);
  for (const t of [dNormPool, dPooledMean, dFromMean]) t.destroy();

  let dX: Tensor | undefined;
  for (let i = c.depth - 1; i >= 0; i--) {
    const a = acts.blocks[i];
    const name = (suffix: string) => `layers.${i}.${suffix}`;
    // latents += w2(gelu(w1(norm_ff(latents)))); dLatents holds d latents_out.
    weightGrad(name("ff.w2.weight"), dLatents, a.ffAct);
    const dAct = inputGrad(dLatents, name("ff.w2.weight"));
    const dFfHidden = geluBackward(gpu, dAct, a.ffHidden);
    weightGrad(name("ff.w1.weight"), dFfHidden, a.normFf.y);
    const dNormFf = inputGrad(dFfHidden, name("ff.w1.weight"));
    const addToLatents = { out: dLatents, accumulate: true };
    normBackward(name("ff.norm"), dNormFf, a.latentsMid, a.normFf, addToLatents);
    for (const t of [dAct, dFfHidden, dNormFf]) t.destroy();

    // latents += to_out(attention(q, k, v)); dLatents now holds d latents_mid.
    weightGrad(name("attn.to_out.weight"), dLatents, a.attn);
    const dAttn = inputGrad(dLatents, name("attn.to_out.weight"));
    const { dq, dk, dv } = attentionBackward(gpu, dAttn, a.q, a.k, a.v, a.attn, a.lse, {
      numHeads: c.heads,
      keyLengths: acts.keyLengths.tensor,
      alwaysVisibleFrom: seqLen,
    });
    weightGrad(name("attn.to_q.weight"), dq, a.normL.y);
    const dNormL = inputGrad(dq, name("attn.to_q.weight"));
    const dKv = concatLastAxis(gpu, dk, dv);
    weightGrad(name("attn.to_kv.weight"), dKv, a.kvInput);
    const dKvInput = inputGrad(dKv, name("attn.to_kv.weight"));
    const { da: dNormX, db: dNormLFromKv } = concatRowsBackward(
      gpu,
      dKvInput,
      [batch, seqLen, c.dim],
      a.normL.y.shape,
    );
    addInPlace(gpu, dNormL, dNormLFromKv);
    normBackward(name("attn.norm_l"), dNormL, a.latentsIn, a.normL, addToLatents);
    const addToX = dX ? { out: dX, accumulate: true } : {};
    dX = normBackward(name("attn.norm_x"), dNormX, acts.x, a.normX, addToX);
    for (const t of [dAttn, dq, dk, dv, dNormL, dKv, dKvInput, dNormX, dNormLFromKv]) t.destroy();
  }

  // The latents parameter is shared by every batch row: its gradient is the sum over rows.
  grads.set("latents", repeatForBatchBackward(gpu, dLatents, param(w, "latents")));
  dLatents.destroy();
  const dx = dX!;
  if (c.numPositions > 0) {
    grads.set("pos_emb", repeatForBatchBackward(gpu, dx, param(w, "pos_emb")));
  }
  weightGrad("proj_in.weight", dx, acts.hidden);
  grads.set("proj_in.bias", columnSum(gpu, dx));
  const dHidden = inputGrad(dx, "proj_in.weight");
  dx.destroy();
  // Same order as the parameters, so callers can walk both maps together.
  const ordered = new Map([...w.params.keys()].map((key) => [key, grads.get(key)!]));
  return { grads: ordered, dHidden };
}
