/**
 * The trained adapter folder that `train` writes and `encode` reads:
 *
 *   adapter_config.json, adapter_model.safetensors   LoRA in PEFT's format
 *   resampler_config.json, resampler.safetensors     the Perceiver Resampler
 *   distill_config.json                              prompt mode, token limit, base model
 *
 * The base model's sizes are recorded so an adapter made for another Qwen3 is refused with
 * a message naming both, before any weight is read.
 */
import { join } from "node:path";
import type { Gpu } from "../gpu/device.ts";
import { writeFileAtomic } from "../io/atomic.ts";
import { destroyLora, loadLora, type LoraAdapter, saveLora } from "../models/lora.ts";
import type { Qwen3Config } from "../models/qwen3_weights.ts";
import { qwen3LinearShapes } from "../models/qwen3_weights.ts";
import {
  destroyResampler,
  loadResampler,
  type ResamplerWeights,
  saveResampler,
} from "../models/resampler_weights.ts";
import { QWEN_PROMPT_MODES, type QwenPromptMode } from "../text/qwen_tokenizer.ts";

export const DISTILL_CONFIG_FILE = "distill_config.json";

/** How captions become student tokens; fixed at training time and reused by `encode`. */
export interface PromptSettings {
  /** Chat template around the caption, or the caption alone. */
  mode: QwenPromptMode;
  /** Student tokens per prompt; longer prompts are cut. */
  maxTokens: number;
}

/** A Qwen3's name and sizes: its config less the numerics (rope theta, norm eps). */
export interface BaseModelRecord extends Omit<Qwen3Config, "ropeTheta" | "rmsNormEps"> {
  /** The model folder's name, to tell users which Qwen3 to pass. */
  name: string;
}

/** `distill_config.json` of an adapter folder: how to use the adapter and what it was made from. */
export interface DistillConfig {
  /** Marks the folder as a distill adapter. */
  format: "distill-adapter";
  /** Layout version; a different one is refused. */
  version: 1;
  /** The prompt settings training used; `encode` must use the same. */
  prompt: PromptSettings;
  /** The Qwen3 this adapter was trained on (sizes checked on load). */
  baseModel: BaseModelRecord;
  /** Teacher identity from the target cache, so users can tell what an adapter imitates. */
  teacher: Record<string, string>;
  /** Free-form facts about the run (steps, held-out loss). */
  training?: Record<string, unknown>;
}

/** An adapter folder loaded onto the GPU: what the student adds to its frozen base model. */
export interface TrainedAdapter {
  /** The folder's `distill_config.json`. */
  config: DistillConfig;
  /** The LoRA weights of the Qwen3 decoder. */
  lora: LoraAdapter;
  /** The resampler mapping the decoder's hidden states to SDXL conditioning. */
  resampler: ResamplerWeights;
}

export function baseModelRecord(name: string, c: Qwen3Config): BaseModelRecord {
  return {
    name,
    hiddenSize: c.hiddenSize,
    numLayers: c.numLayers,
    numHeads: c.numHeads,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    intermediateSize: c.intermediateSize,
    vocabSize: c.vocabSize,
  };
}

/** Writes every file of the adapter folder (each atomically). */
export async function saveAdapter(
  gpu: Gpu,
  dir: string,
  adapter: TrainedAdapter,
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  await saveLora(gpu, adapter.lora, dir, adapter.config.baseModel.name);
  await saveResampler(gpu, adapter.resampler, dir);
  await writeFileAtomic(
    join(dir, DISTILL_CONFIG_FILE),
    JSON.stringify(adapter.config, null, 2) + "\n",
  );
}

/** Reads `distill_config.json`, checking it against the student it will run on. */
export async function readDistillConfig(dir: string, student: Qwen3Config): Promise<DistillConfig> {
  const path = join(dir, DISTILL_CONFIG_FILE);
  let config: DistillConfig;
  try {
    config = JSON.parse(await Deno.readTextFile(path));
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new Error(
        `${path} not found: an adapter folder (written by 'distill train' as <out>/adapter) holds ` +
          `${DISTILL_CONFIG_FILE}, adapter_config.json, adapter_model.safetensors, ` +
          `resampler_config.json and resampler.safetensors`,
      );
    }
    throw new Error(`${path}: invalid JSON (${(err as Error).message})`);
  }
  if (config.format !== "distill-adapter") {
    throw new Error(`${path}: not a distill adapter config (format '${config.format}')`);
  }
  if (!QWEN_PROMPT_MODES.includes(config.prompt?.mode)) {
    throw new Error(`${path}: prompt.mode must be one of ${QWEN_PROMPT_MODES.join(", ")}`);
  }
  if (!Number.isInteger(config.prompt.maxTokens) || config.prompt.maxTokens < 1) {
    throw new Error(`${path}: prompt.maxTokens must be a positive integer`);
  }
  const base = config.baseModel;
  const mismatches: string[] = [];
  for (const key of Object.keys(base) as Array<keyof typeof base>) {
    if (key === "name") continue;
    const want = base[key];
    const have = (student as unknown as Record<string, number>)[key];
    if (have !== want) mismatches.push(`${key} ${want} (adapter) vs ${have} (student)`);
  }
  if (mismatches.length) {
    throw new Error(
      `${path}: this adapter was trained on another base model (${base.name}): ` +
        `${mismatches.join(", ")}; pass the Qwen3 folder it was trained with`,
    );
  }
  return config;
}

/** Loads an adapter folder onto the GPU for a student with config `student`. */
export async function loadAdapter(
  gpu: Gpu,
  dir: string,
  student: Qwen3Config,
): Promise<TrainedAdapter> {
  const config = await readDistillConfig(dir, student);
  const lora = await loadLora(gpu, dir, qwen3LinearShapes(student), student.numLayers);
  const resampler = await loadResampler(gpu, dir, { studentHiddenSize: student.hiddenSize });
  return { config, lora, resampler };
}

export function destroyAdapter(adapter: TrainedAdapter): void {
  destroyLora(adapter.lora);
  destroyResampler(adapter.resampler);
}
