/**
 * What a training run is asked to do (`TrainOptions`) and the checked config every default is
 * filled into (`resolveTrainConfig`), the part of it a checkpoint pins (`trajectoryOf`), and how
 * the cache rows split into training and held-out rows.
 */
import { type CaptionRow, heldOutScore, splitHeldOut } from "../data/captions.ts";
import type { TargetCache } from "../data/target_cache.ts";
import { DEFAULT_LORA_CONFIG, type LoraConfig, QWEN3_LINEARS } from "../models/lora.ts";
import { RESAMPLER_DEFAULTS, type ResamplerConfig } from "../models/resampler_config.ts";
import { QWEN_DEFAULT_MAX_TOKENS, QWEN_PROMPT_MODES } from "../text/qwen_tokenizer.ts";
import type { PromptSettings } from "./adapter.ts";
import { captionFileStem } from "./evaluation.ts";
import {
  DEFAULT_LR,
  DEFAULT_MAX_GRAD_NORM,
  DEFAULT_WARMUP_RATIO,
  DEFAULT_WEIGHT_DECAY,
} from "./optim.ts";

export const DEFAULT_BATCH_SIZE = 16;

/**
 * Train with `seq_bias` started at the mean target (`startResamplerAtMean`). Without it the
 * randomly initialised output projection starts ten times further from the targets than their
 * mean is, and the student spends its first hundreds of steps unlearning that while the
 * sequence output stays worse than ignoring the prompt (README, "Does it learn the prompt?").
 */
export const DEFAULT_MEAN_START = true;

export const DEFAULT_HELD_OUT_FRACTION = 0.05;

/**
 * Plain shuffled batches by default: length-sorted windows pad far less (the demo: 38% padding
 * at 1, 17% at 4, 5% at 16) but batches of alike prompts learned less from the same steps (the
 * demo's held-out R² seq 0.131 at 1, 0.074 at 4, 0.042 at 16; README, "Speed").
 */
export const DEFAULT_BUCKET_WINDOW = 1;

export const DEFAULT_EVAL_EVERY = 200;

export const DEFAULT_EVAL_ROWS = 256;

export const DEFAULT_CHECKPOINT_EVERY = 500;

export const DEFAULT_KEEP_CHECKPOINTS = 2;

/** Models deeper than this train with gradient checkpointing unless told otherwise. */
export const CHECKPOINTING_MIN_LAYERS = 9;

/** The resampler sizes a run chooses; its outputs' sizes come from the cache. */
export type ResamplerShape = Pick<
  ResamplerConfig,
  "dim" | "depth" | "heads" | "dimHead" | "ffMult" | "numPositions" | "seqBias"
>;

/** What `train` is asked to do. Omitted fields take the defaults above and docs/numerics.md §5's. */
export interface TrainOptions {
  /** Target cache folder (deno task cache). */
  cache: string;
  /** Qwen3 model folder: config.json, safetensors weights, tokenizer.json, tokenizer_config.json. */
  qwen: string;
  /** Run folder. */
  out: string;
  /**
   * Samples per micro-batch group. Alone: samples per optimizer step. With `gradAccum` k, each
   * optimizer step takes k micro-batches of `batchSize` samples (k × batchSize in all).
   */
  batchSize?: number;
  /**
   * Samples per forward/backward pass (at most `batchSize`): a step of `batchSize` samples is
   * cut into k = ceil(batchSize / microBatch) micro-batches of nearly equal size whose
   * gradients are accumulated. Give this or `gradAccum`, not both.
   */
  microBatch?: number;
  /** Micro-batches (of `batchSize` samples each) per optimizer step. */
  gradAccum?: number;
  /** Passes over the training rows (default 1). */
  epochs?: number;
  /** Stop after this many optimizer steps (the schedule spans them). */
  maxSteps?: number;
  /** Peak learning rate per parameter group (default 1e-4 resampler, 2e-5 LoRA). */
  lr?: { resampler: number; lora: number };
  /** AdamW decoupled weight decay on every trainable tensor (default 0.01). */
  weightDecay?: number;
  /** Clip the global gradient L2 norm to this (default 1). */
  maxGradNorm?: number;
  /** Share of the steps spent warming the learning rate up from 0 (default 0.03). */
  warmupRatio?: number;
  /** Seeds initialisation, shuffling and dropout; equal seeds give equal runs (default 0). */
  seed?: number;
  /** Share of the captions held out for evaluation (by caption hash); 0 disables evaluation. */
  heldOutFraction?: number;
  /**
   * Instead of a fraction: hold out every row from these caption files (the file name of its
   * id without the extension, e.g. `color_val` for `t2i/color_val.txt:12`). Rows of those files
   * whose caption also occurs among the training rows are dropped, so no held-out caption was
   * trained on.
   */
  heldOutFiles?: string[];
  /**
   * Batches per window of rows sorted by token length (src/train/batching.ts): larger windows
   * pad less but make each batch's prompts alike; 1 gives batches of plain shuffled rows.
   */
  bucketWindow?: number;
  /** Evaluate every this many steps (also before the first and after the last); 0: only those. */
  evalEvery?: number;
  /** Evaluate on at most this many held-out rows (the same ones each time); 0: all. */
  evalRows?: number;
  /** Checkpoint every this many steps (and after the last); 0: only after the last. */
  checkpointEvery?: number;
  /** How many of the newest checkpoints to keep on disk (default 2). */
  keepCheckpoints?: number;
  /** LoRA hyper-parameters; missing fields take the defaults (r 16, alpha 32, q/k/v/o). */
  lora?: Partial<LoraConfig>;
  /** Resampler sizes; missing fields take the defaults of docs/numerics.md §4. */
  resampler?: Partial<ResamplerShape>;
  /** How captions become student tokens (default chat template, 256 tokens). */
  prompt?: Partial<PromptSettings>;
  /** Default: on when the student has more than 8 layers. */
  gradientCheckpointing?: boolean;
  /** Continue from `<out>/checkpoints/latest.json` (a fresh start when there is none). */
  resume?: boolean;
}

/**
 * Everything that decides the parameters a run ends with. A resumed run must have the same
 * values, or its trajectory would differ from the one its checkpoint started.
 */
export interface TrajectoryConfig {
  stepBatch: number;
  microBatches: number[];
  epochs: number;
  maxSteps: number | null;
  lr: { resampler: number; lora: number };
  weightDecay: number;
  maxGradNorm: number;
  warmupRatio: number;
  seed: number;
  heldOutFraction: number;
  heldOutFiles: string[];
  bucketWindow: number;
  lora: LoraConfig;
  resampler: ResamplerShape;
  prompt: PromptSettings;
}

/** The options with every default filled in and checked. */
export interface TrainConfig extends TrajectoryConfig {
  cache: string;
  qwen: string;
  out: string;
  evalEvery: number;
  evalRows: number;
  checkpointEvery: number;
  keepCheckpoints: number;
  gradientCheckpointing: boolean | "auto";
  resume: boolean;
}

function positiveInteger(name: string, value: number): number {
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new Error(`${name} must be a positive integer (got ${value})`);
  }
  return value;
}

function nonNegativeInteger(name: string, value: number): number {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new Error(`${name} must be an integer >= 0 (got ${value})`);
  }
  return value;
}

function nonNegativeNumber(name: string, value: number): number {
  if (!(Number.isFinite(value) && value >= 0)) {
    throw new Error(`${name} must be a number >= 0 (got ${value})`);
  }
  return value;
}

/**
 * Samples per micro-batch: `stepBatch` cut into ceil(stepBatch / micro) parts whose sizes
 * differ by at most one (16 by 6 gives 6, 5, 5), so no micro-batch is a runt.
 */
export function microBatchSizes(stepBatch: number, micro: number): number[] {
  const k = Math.ceil(stepBatch / micro);
  const base = Math.floor(stepBatch / k);
  return Array.from({ length: k }, (_, i) => base + (i < stepBatch % k ? 1 : 0));
}

/** Fills in defaults and checks every value; errors name the option. */
export function resolveTrainConfig(options: TrainOptions): TrainConfig {
  for (const key of ["cache", "qwen", "out"] as const) {
    if (!options[key]) throw new Error(`train: the ${key} folder is required`);
  }
  const batchSize = positiveInteger("batchSize", options.batchSize ?? DEFAULT_BATCH_SIZE);
  let stepBatch = batchSize;
  let micro = batchSize;
  if (options.gradAccum !== undefined && options.microBatch !== undefined) {
    throw new Error(
      `give microBatch (${options.microBatch}) or gradAccum (${options.gradAccum}), not both: ` +
        `microBatch m splits each batch of batchSize samples into ceil(batchSize / m) ` +
        `micro-batches; gradAccum k takes k micro-batches of batchSize samples per step`,
    );
  }
  if (options.gradAccum !== undefined) {
    stepBatch = batchSize * positiveInteger("gradAccum", options.gradAccum);
  } else if (options.microBatch !== undefined) {
    micro = positiveInteger("microBatch", options.microBatch);
    if (micro > batchSize) {
      throw new Error(`microBatch ${micro} is larger than batchSize ${batchSize}`);
    }
  }
  const lr = options.lr ?? { ...DEFAULT_LR };
  for (const group of ["resampler", "lora"] as const) nonNegativeNumber(`lr.${group}`, lr[group]);
  const lora: LoraConfig = {
    r: options.lora?.r ?? DEFAULT_LORA_CONFIG.r,
    alpha: options.lora?.alpha ?? DEFAULT_LORA_CONFIG.alpha,
    dropout: options.lora?.dropout ?? DEFAULT_LORA_CONFIG.dropout,
    targetModules: [...(options.lora?.targetModules ?? DEFAULT_LORA_CONFIG.targetModules)],
  };
  const resampler: ResamplerShape = {
    dim: options.resampler?.dim ?? RESAMPLER_DEFAULTS.dim,
    depth: options.resampler?.depth ?? RESAMPLER_DEFAULTS.depth,
    heads: options.resampler?.heads ?? RESAMPLER_DEFAULTS.heads,
    dimHead: options.resampler?.dimHead ?? RESAMPLER_DEFAULTS.dimHead,
    ffMult: options.resampler?.ffMult ?? RESAMPLER_DEFAULTS.ffMult,
    numPositions: nonNegativeInteger(
      "resampler.numPositions",
      options.resampler?.numPositions ?? RESAMPLER_DEFAULTS.numPositions,
    ),
    seqBias: options.resampler?.seqBias ?? DEFAULT_MEAN_START,
  };
  const prompt: PromptSettings = {
    mode: options.prompt?.mode ?? "chat",
    maxTokens: positiveInteger(
      "prompt.maxTokens",
      options.prompt?.maxTokens ?? QWEN_DEFAULT_MAX_TOKENS,
    ),
  };
  if (resampler.numPositions > 0 && resampler.numPositions < prompt.maxTokens) {
    throw new Error(
      `resampler.numPositions ${resampler.numPositions} is below prompt.maxTokens ` +
        `${prompt.maxTokens}: the resampler needs a position for every prompt token`,
    );
  }
  if (!QWEN_PROMPT_MODES.includes(prompt.mode)) {
    throw new Error(
      `prompt mode '${prompt.mode}' is not one of ${QWEN_PROMPT_MODES.join(", ")}`,
    );
  }
  const heldOutFraction = options.heldOutFraction ?? DEFAULT_HELD_OUT_FRACTION;
  if (!(heldOutFraction >= 0 && heldOutFraction < 1)) {
    throw new Error(`heldOutFraction must be in [0, 1) (got ${heldOutFraction})`);
  }
  const warmupRatio = options.warmupRatio ?? DEFAULT_WARMUP_RATIO;
  if (!(warmupRatio >= 0 && warmupRatio <= 1)) {
    throw new Error(`warmupRatio must be in [0, 1] (got ${warmupRatio})`);
  }
  return {
    cache: options.cache,
    qwen: options.qwen,
    out: options.out,
    stepBatch,
    microBatches: microBatchSizes(stepBatch, micro),
    epochs: positiveInteger("epochs", options.epochs ?? 1),
    maxSteps: options.maxSteps === undefined ? null : positiveInteger("maxSteps", options.maxSteps),
    lr: { resampler: lr.resampler, lora: lr.lora },
    weightDecay: nonNegativeNumber("weightDecay", options.weightDecay ?? DEFAULT_WEIGHT_DECAY),
    maxGradNorm: nonNegativeNumber("maxGradNorm", options.maxGradNorm ?? DEFAULT_MAX_GRAD_NORM),
    warmupRatio,
    seed: nonNegativeInteger("seed", options.seed ?? 0) >>> 0,
    heldOutFraction,
    heldOutFiles: [...(options.heldOutFiles ?? [])],
    bucketWindow: positiveInteger("bucketWindow", options.bucketWindow ?? DEFAULT_BUCKET_WINDOW),
    lora,
    resampler,
    prompt,
    evalEvery: nonNegativeInteger("evalEvery", options.evalEvery ?? DEFAULT_EVAL_EVERY),
    evalRows: nonNegativeInteger("evalRows", options.evalRows ?? DEFAULT_EVAL_ROWS),
    checkpointEvery: nonNegativeInteger(
      "checkpointEvery",
      options.checkpointEvery ?? DEFAULT_CHECKPOINT_EVERY,
    ),
    keepCheckpoints: positiveInteger(
      "keepCheckpoints",
      options.keepCheckpoints ?? DEFAULT_KEEP_CHECKPOINTS,
    ),
    gradientCheckpointing: options.gradientCheckpointing ?? "auto",
    resume: options.resume ?? false,
  };
}

/** The trajectory fields alone: what a checkpoint stores and a resumed run must match. */
export function trajectoryOf(c: TrainConfig): TrajectoryConfig {
  return {
    stepBatch: c.stepBatch,
    microBatches: c.microBatches,
    epochs: c.epochs,
    maxSteps: c.maxSteps,
    lr: c.lr,
    weightDecay: c.weightDecay,
    maxGradNorm: c.maxGradNorm,
    warmupRatio: c.warmupRatio,
    seed: c.seed,
    heldOutFraction: c.heldOutFraction,
    heldOutFiles: c.heldOutFiles,
    bucketWindow: c.bucketWindow,
    lora: c.lora,
    resampler: c.resampler,
    prompt: c.prompt,
  };
}

/** A u32 from several integers (murmur3's finaliser after each), for seeding streams. */
export function mixSeed(...values: number[]): number {
  let h = 0x9e3779b9;
  for (const v of values) {
    h = Math.imul(h ^ (v >>> 0), 0x85ebca6b);
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35);
    h ^= h >>> 16;
  }
  return h >>> 0;
}

/** Row indices of the cache for training and for evaluation. */
export interface DataSplit {
  train: number[];
  heldOut: number[];
  warnings: string[];
}

/**
 * Splits the cache rows by caption hash (`splitHeldOut`). A positive fraction that leaves no
 * row held out (a small cache) holds out the one row with the lowest score instead, and says so.
 */
export function splitCacheRows(captions: readonly string[], fraction: number): DataSplit {
  const rows: CaptionRow[] = captions.map((caption, i) => ({
    id: String(i),
    caption,
    source: "cache",
  }));
  const index = new Map(rows.map((row, i) => [row, i]));
  const split = splitHeldOut(rows, { fraction });
  const warnings: string[] = [];
  let heldOut = split.heldOut.map((row) => index.get(row)!);
  let train = split.train.map((row) => index.get(row)!);
  if (fraction > 0 && heldOut.length === 0 && captions.length > 1) {
    // The caption the hash ranks first: the one a slightly larger fraction would hold out.
    let best = 0;
    for (let i = 1; i < captions.length; i++) {
      if (heldOutScore(captions[i]) < heldOutScore(captions[best])) best = i;
    }
    heldOut = [best];
    train = train.filter((i) => i !== best);
    warnings.push(
      `held-out fraction ${fraction} of ${captions.length} captions holds out none; ` +
        `evaluating on 1 caption instead (row ${best}). Use a larger fraction for a ` +
        `meaningful held-out loss, or 0 to train without one`,
    );
  }
  return { train, heldOut, warnings };
}

/**
 * Holds out the rows of the caption files `files` (see `TrainOptions.heldOutFiles`), ordered by
 * caption hash so any first n of them are a random sample; a held-out caption that also occurs
 * among the training rows is dropped from both sides.
 */
export function splitCacheRowsByFile(
  ids: readonly string[],
  captions: readonly string[],
  files: readonly string[],
): DataSplit {
  const wanted = new Set(files);
  const train: number[] = [];
  const candidates: number[] = [];
  ids.forEach((id, i) => (wanted.has(captionFileStem(id)) ? candidates : train).push(i));
  const found = new Set(candidates.map((i) => captionFileStem(ids[i])));
  const missing = files.filter((f) => !found.has(f));
  if (missing.length) {
    throw new Error(
      `held-out files ${missing.join(", ")} hold no row of the cache; its files are ` +
        `${[...new Set(ids.map(captionFileStem))].slice(0, 12).join(", ")}`,
    );
  }
  const trained = new Set(train.map((i) => captions[i]));
  const heldOut = candidates.filter((i) => !trained.has(captions[i]))
    .sort((a, b) => heldOutScore(captions[a]) - heldOutScore(captions[b]) || a - b);
  const dropped = candidates.length - heldOut.length;
  return {
    train,
    heldOut,
    warnings: dropped
      ? [`${dropped} held-out rows repeat a training caption and are left out of both sides`]
      : [],
  };
}

/** Optimizer steps per epoch (the last incomplete batch of an epoch is dropped) and in all. */
export function stepCounts(
  trainRows: number,
  config: Pick<TrajectoryConfig, "stepBatch" | "epochs" | "maxSteps">,
): { stepsPerEpoch: number; totalSteps: number } {
  const stepsPerEpoch = Math.floor(trainRows / config.stepBatch);
  const all = stepsPerEpoch * config.epochs;
  return {
    stepsPerEpoch,
    totalSteps: config.maxSteps === null ? all : Math.min(all, config.maxSteps),
  };
}

/** Throws unless the resampler's outputs have the shapes of the cache's targets. */
export function checkResamplerFitsCache(
  config: ResamplerConfig,
  cache: Pick<TargetCache, "dir" | "seqLen" | "seqDim" | "pooledDim">,
  where: string,
): void {
  const have = `seq [${config.numQueries}, ${config.dimSeq}], pooled [${config.dimPooled}]`;
  const want = `seq [${cache.seqLen}, ${cache.seqDim}], pooled [${cache.pooledDim}]`;
  if (have !== want) {
    throw new Error(
      `${where}: the resampler outputs ${have} but the cache ${cache.dir} holds targets ` +
        `${want}; a resampler can only be trained on targets of its own shapes`,
    );
  }
}

/** Throws unless every LoRA target is a decoder linear of the student in `qwenDir`. */
export function checkLoraTargets(targets: readonly string[], qwenDir: string): void {
  if (targets.length === 0) {
    throw new Error(`LoRA needs at least one target module (e.g. q_proj,k_proj,v_proj,o_proj)`);
  }
  for (const target of targets) {
    if (!(target in QWEN3_LINEARS)) {
      throw new Error(
        `LoRA target module '${target}' is not a linear layer of the Qwen3 in ${qwenDir}: ` +
          `its decoder layers have ${Object.keys(QWEN3_LINEARS).join(", ")}`,
      );
    }
  }
}
