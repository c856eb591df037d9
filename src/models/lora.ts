import { join } from "node:path";
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { writeFileAtomic } from "../io/atomic.ts";
import { SafetensorsFile, writeSafetensors } from "../io/safetensors.ts";
import type { Rng } from "../util/rng.ts";

/** The Qwen3 decoder linears LoRA can target, by PEFT's short name. */
export const QWEN3_LINEARS = {
  q_proj: "self_attn.q_proj",
  k_proj: "self_attn.k_proj",
  v_proj: "self_attn.v_proj",
  o_proj: "self_attn.o_proj",
  gate_proj: "mlp.gate_proj",
  up_proj: "mlp.up_proj",
  down_proj: "mlp.down_proj",
} as const;
/** A Qwen3 decoder linear by PEFT's short name (`q_proj`, ..., `down_proj`). */
export type LinearName = keyof typeof QWEN3_LINEARS;

/** LoRA hyper-parameters, with PEFT's meaning (`r`, `lora_alpha`, ...). */
export interface LoraConfig {
  /** Rank of each low-rank update. */
  r: number;
  /** Scale numerator: updates are multiplied by alpha / r. */
  alpha: number;
  /** Dropout on the LoRA input during training, in [0, 1). */
  dropout: number;
  /** The linears of every decoder layer that get an adapter. */
  targetModules: LinearName[];
}

export const DEFAULT_LORA_CONFIG: Readonly<LoraConfig> = {
  r: 16,
  alpha: 32,
  dropout: 0.05,
  targetModules: ["q_proj", "k_proj", "v_proj", "o_proj"],
};

/** In/out features of each targetable linear, from the base model's config. */
export type LinearShapes = Record<LinearName, { in: number; out: number }>;

/** One adapted linear: y += scaling · (x Aᵀ) Bᵀ with A [r, in], B [out, r]. */
export interface LoraPair {
  /** Down-projection A [r, in], f32. */
  a: Tensor;
  /** Up-projection B [out, r], f32. */
  b: Tensor;
}

/** LoRA weights on the GPU for every targeted linear of every layer. */
export interface LoraAdapter {
  /** The hyper-parameters the weights were made with. */
  config: LoraConfig;
  /** alpha / r, as PEFT uses it (no rsLoRA). */
  scaling: number;
  /** Decoder layers of the base model the adapter covers. */
  numLayers: number;
  /** Keyed by `loraSlot(layer, module)`. */
  pairs: Map<string, LoraPair>;
}

export function loraSlot(layer: number, module: LinearName): string {
  return `${layer}.${module}`;
}

/** PEFT's key for a LoRA matrix of a Qwen3 (causal LM) base model. */
export function peftKey(layer: number, module: LinearName, ab: "A" | "B"): string {
  return `base_model.model.model.layers.${layer}.${QWEN3_LINEARS[module]}.lora_${ab}.weight`;
}

function checkConfig(config: LoraConfig, where: string): void {
  if (!Number.isInteger(config.r) || config.r < 1) {
    throw new Error(`${where}: LoRA rank r must be a positive integer (got ${config.r})`);
  }
  if (!(config.alpha > 0)) {
    throw new Error(`${where}: lora_alpha must be > 0 (got ${config.alpha})`);
  }
  if (!(config.dropout >= 0 && config.dropout < 1)) {
    throw new Error(`${where}: lora_dropout must be in [0, 1) (got ${config.dropout})`);
  }
  for (const m of config.targetModules) {
    if (!(m in QWEN3_LINEARS)) {
      throw new Error(
        `${where}: target module '${m}' is not a Qwen3 decoder linear ` +
          `(choose from ${Object.keys(QWEN3_LINEARS).join(", ")})`,
      );
    }
  }
}

/**
 * PEFT's initialisation: A ~ kaiming-uniform(a=√5) = U(-1/√in, 1/√in), B = 0, so the
 * adapted model starts exactly at the base model.
 */
export function initLora(
  gpu: Gpu,
  shapes: LinearShapes,
  numLayers: number,
  config: LoraConfig,
  rng: Rng,
): LoraAdapter {
  checkConfig(config, "LoRA config");
  const pairs = new Map<string, LoraPair>();
  for (let layer = 0; layer < numLayers; layer++) {
    for (const module of config.targetModules) {
      const { in: fanIn, out } = shapes[module];
      const bound = 1 / Math.sqrt(fanIn);
      const a = rng.fillUniform(new Float32Array(config.r * fanIn), -bound, bound);
      pairs.set(loraSlot(layer, module), {
        a: gpu.upload(a, [config.r, fanIn], "f32", peftKey(layer, module, "A")),
        b: gpu.zeros([out, config.r], "f32", peftKey(layer, module, "B")),
      });
    }
  }
  return { config, scaling: config.alpha / config.r, numLayers, pairs };
}

function adapterConfigJson(config: LoraConfig, baseModel: string): Record<string, unknown> {
  return {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: baseModel,
    bias: "none",
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layers_pattern: null,
    layers_to_transform: null,
    lora_alpha: config.alpha,
    lora_dropout: config.dropout,
    modules_to_save: null,
    peft_type: "LORA",
    r: config.r,
    rank_pattern: {},
    revision: null,
    target_modules: config.targetModules,
    task_type: "FEATURE_EXTRACTION",
    use_dora: false,
    use_rslora: false,
  };
}

/** Writes `adapter_config.json` and `adapter_model.safetensors` (F32) as PEFT does. */
export async function saveLora(
  gpu: Gpu,
  adapter: LoraAdapter,
  dir: string,
  baseModel: string,
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const keys: string[] = [];
  const tensors: Tensor[] = [];
  for (let layer = 0; layer < adapter.numLayers; layer++) {
    for (const module of adapter.config.targetModules) {
      const pair = adapter.pairs.get(loraSlot(layer, module))!;
      keys.push(peftKey(layer, module, "A"), peftKey(layer, module, "B"));
      tensors.push(pair.a, pair.b);
    }
  }
  const data = await gpu.readAll(tensors);
  await writeSafetensors(
    join(dir, "adapter_model.safetensors"),
    tensors.map((t, i) => ({
      name: keys[i],
      dtype: "F32",
      shape: [...t.shape],
      data: data[i] as Float32Array,
    })),
  );
  await writeFileAtomic(
    join(dir, "adapter_config.json"),
    JSON.stringify(adapterConfigJson(adapter.config, baseModel), null, 2) + "\n",
  );
}

function numberField(json: Record<string, unknown>, key: string, path: string, fallback?: number) {
  const value = json[key] ?? fallback;
  if (typeof value !== "number") {
    throw new Error(`${path}: '${key}' must be a number (got ${JSON.stringify(json[key])})`);
  }
  return value;
}

/** Reads a PEFT adapter folder, checking every matrix against the base model's shapes. */
export async function loadLora(
  gpu: Gpu,
  dir: string,
  shapes: LinearShapes,
  numLayers: number,
): Promise<LoraAdapter> {
  const configPath = join(dir, "adapter_config.json");
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(await Deno.readTextFile(configPath));
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new Error(
        `${configPath} not found: a LoRA adapter folder holds adapter_config.json and ` +
          `adapter_model.safetensors (as written by training or by PEFT's save_pretrained)`,
      );
    }
    throw new Error(`${configPath}: invalid JSON (${(err as Error).message})`);
  }
  if (json.use_dora === true || json.use_rslora === true) {
    throw new Error(`${configPath}: DoRA and rsLoRA adapters are not supported`);
  }
  const targets = json.target_modules;
  if (!Array.isArray(targets) || targets.some((t) => typeof t !== "string")) {
    throw new Error(`${configPath}: 'target_modules' must be a list of module names`);
  }
  const config: LoraConfig = {
    r: numberField(json, "r", configPath),
    alpha: numberField(json, "lora_alpha", configPath),
    dropout: numberField(json, "lora_dropout", configPath, 0),
    targetModules: targets as LinearName[],
  };
  checkConfig(config, configPath);
  const weightsPath = join(dir, "adapter_model.safetensors");
  const file = await SafetensorsFile.open(weightsPath);
  try {
    const pairs = new Map<string, LoraPair>();
    for (let layer = 0; layer < numLayers; layer++) {
      for (const module of config.targetModules) {
        const { in: fanIn, out } = shapes[module];
        const pair: Partial<LoraPair> = {};
        for (const [ab, shape] of [["A", [config.r, fanIn]], ["B", [out, config.r]]] as const) {
          const key = peftKey(layer, module, ab);
          const info = file.info(key);
          if (info.shape.join(",") !== shape.join(",")) {
            throw new Error(
              `${weightsPath}: '${key}' has shape [${info.shape}] but the base model needs ` +
                `[${shape}]; this adapter was made for a model of another size ` +
                `(check the Qwen3 folder against the adapter's base_model_name_or_path)`,
            );
          }
          const data = await file.readF32(key);
          pair[ab === "A" ? "a" : "b"] = gpu.upload(data, shape, "f32", key);
        }
        pairs.set(loraSlot(layer, module), pair as LoraPair);
      }
    }
    return { config, scaling: config.alpha / config.r, numLayers, pairs };
  } finally {
    file.close();
  }
}

export function destroyLora(adapter: LoraAdapter): void {
  for (const { a, b } of adapter.pairs.values()) {
    a.destroy();
    b.destroy();
  }
}
