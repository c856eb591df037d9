/**
 * The resampler's parameters: names, shapes and initialisation declared once (`paramSpecs`), the
 * mean start, and `resampler.safetensors` written and read with every name and shape checked.
 */
import { join } from "node:path";
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { writeFileAtomic } from "../io/atomic.ts";
import { SafetensorsFile, writeSafetensors } from "../io/safetensors.ts";
import type { Rng } from "../util/rng.ts";
import {
  checkResamplerConfig,
  checkResamplerFitsStudent,
  readResamplerConfig,
  RESAMPLER_CONFIG_FILE,
  RESAMPLER_WEIGHTS_FILE,
  type ResamplerConfig,
  resamplerConfigJson,
} from "./resampler_config.ts";
import { loadWeights, type WeightSchema } from "./weight_schema.ts";

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
  gpu.write(resamplerParam(weights, "seq_bias"), mean.seq);
  gpu.write(resamplerParam(weights, "proj_pooled.bias"), mean.pooled);
  for (const name of ["proj_out.weight", "proj_out.bias", "proj_pooled.weight"]) {
    gpu.clear(resamplerParam(weights, name));
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

/** The resampler's parameters as a weight schema: all f32 on the GPU, from F32, F16 or BF16. */
export function resamplerWeightSchema(
  config: ResamplerConfig,
  configWhere = "the resampler config",
): WeightSchema {
  return {
    model: `the resampler of depth ${config.depth}`,
    config: configWhere,
    tensors: [...paramSpecs(config)].map(([name, { shape }]) => ({
      name,
      shape,
      placement: "f32",
    })),
  };
}

/** Writes `resampler_config.json` and `resampler.safetensors` (F32) into `dir`, atomically. */
export async function saveResampler(
  gpu: Gpu,
  weights: ResamplerWeights,
  dir: string,
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const specs = resamplerWeightSchema(weights.config).tensors;
  const data = await gpu.readAll(specs.map(({ name }) => resamplerParam(weights, name)));
  await writeSafetensors(
    join(dir, RESAMPLER_WEIGHTS_FILE),
    specs.map(({ name, shape }, i) => ({
      name,
      dtype: "F32",
      shape,
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
  const schema = resamplerWeightSchema(config, configWhere);
  const file = await SafetensorsFile.open(path);
  try {
    const loaded = await loadWeights(gpu, file, schema);
    return {
      config,
      params: new Map(schema.tensors.map(({ name }) => [name, loaded.tensor(name)])),
    };
  } finally {
    file.close();
  }
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

export function resamplerParam(w: ResamplerWeights, name: string): Tensor {
  const t = w.params.get(name);
  if (!t) throw new Error(`resampler: parameter '${name}' is missing from the weights`);
  return t;
}
