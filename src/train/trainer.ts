/**
 * The distillation training loop (SPEC 5): reads captions and teacher targets from a target
 * cache, trains LoRA on an NF4 Qwen3 plus a Perceiver Resampler with `DistillStep`, evaluates
 * on a held-out split, writes resumable checkpoints and finally the adapter folder `encode`
 * reads.
 *
 * Run folder (`out`):
 *
 *   metrics.jsonl                    one record per step and evaluation (src/train/metrics.ts)
 *   report.html                      written at the end (src/train/report.ts)
 *   adapter/                         the trained adapter (src/train/adapter.ts)
 *   checkpoints/latest.json          {"step": N, "dir": "step-000000N"}: the newest checkpoint
 *   checkpoints/step-000000N/        adapter files + optimizer.safetensors + trainer_state.json
 *
 * Determinism: nothing random is carried from step to step. The batches of epoch `e` (rows
 * bucketed by token length, src/train/batching.ts) are drawn from `mixSeed(seed, e)`, the LoRA
 * dropout of micro-batch `i` of step `s` from `mixSeed(seed, s, i)`, and the GPU math has no atomics, so a run resumed from a
 * checkpoint takes exactly the steps an uninterrupted run takes: the final parameters are
 * bitwise identical.
 *
 * Checkpoints and the adapter are written into `.tmp-*` folders renamed into place, so a
 * folder under its final name is always complete. The temp names are fixed, so one trainer
 * at a time may use a run folder; a later run removes what an interrupted one left.
 */
import { basename, join } from "node:path";
import { Gpu } from "../gpu/device.ts";
import { writeFileAtomic } from "../io/atomic.ts";
import { ModelFolder } from "../io/hf.ts";
import { SafetensorsFile, writeSafetensors } from "../io/safetensors.ts";
import { type CaptionRow, heldOutScore, splitHeldOut } from "../data/captions.ts";
import { openTargetCache, type TargetCache, type TeacherRecord } from "../data/target_cache.ts";
import {
  DEFAULT_LORA_CONFIG,
  destroyLora,
  initLora,
  type LoraConfig,
  QWEN3_LINEARS,
} from "../models/lora.ts";
import type { TokenBatch } from "../models/qwen3.ts";
import {
  checkQwen3Tensors,
  destroyQwen3Weights,
  loadQwen3Weights,
  type Qwen3Config,
  qwen3Config,
  qwen3LinearShapes,
} from "../models/qwen3_weights.ts";
import {
  checkResamplerConfig,
  destroyResampler,
  initResampler,
  RESAMPLER_DEFAULTS,
  type ResamplerConfig,
  resamplerParamCount,
} from "../models/resampler.ts";
import {
  loadQwenTokenizer,
  QWEN_DEFAULT_MAX_TOKENS,
  QWEN_PROMPT_MODES,
  type QwenTokenizer,
} from "../text/qwen_tokenizer.ts";
import {
  baseModelRecord,
  type DistillConfig,
  loadAdapter,
  type PromptSettings,
  saveAdapter,
} from "./adapter.ts";
import { type EvalRecord, MetricsLog } from "./metrics.ts";
import {
  type AdamWState,
  DEFAULT_LR,
  DEFAULT_MAX_GRAD_NORM,
  DEFAULT_WARMUP_RATIO,
  DEFAULT_WEIGHT_DECAY,
  lrFactor,
  warmupSteps,
} from "./optim.ts";
import { writeReport } from "./report.ts";
import { EPOCH_ORDER_DESCRIPTION, paddingFraction, StepOrder } from "./batching.ts";
import { Rng } from "./rng.ts";
import { DistillStep, type MicroBatch, studentForward, type StudentModel } from "./step.ts";

export const DEFAULT_BATCH_SIZE = 16;
export const DEFAULT_HELD_OUT_FRACTION = 0.05;
export const DEFAULT_EVAL_EVERY = 200;
export const DEFAULT_EVAL_ROWS = 256;
export const DEFAULT_CHECKPOINT_EVERY = 500;
export const DEFAULT_KEEP_CHECKPOINTS = 2;
/** Models deeper than this train with gradient checkpointing unless told otherwise. */
export const CHECKPOINTING_MIN_LAYERS = 9;

export const CHECKPOINTS_DIR = "checkpoints";
export const LATEST_FILE = "latest.json";
export const OPTIMIZER_FILE = "optimizer.safetensors";
export const TRAINER_STATE_FILE = "trainer_state.json";
export const ADAPTER_DIR = "adapter";
const TRAINER_STATE_FORMAT = "distill-trainer-state";

/** The resampler sizes a run chooses; its outputs' sizes come from the cache. */
export type ResamplerShape = Pick<
  ResamplerConfig,
  "dim" | "depth" | "heads" | "dimHead" | "ffMult"
>;

/** What `train` is asked to do. Omitted fields take the defaults above and SPEC 5's. */
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
  /** Resampler sizes; missing fields take SPEC section 4's defaults. */
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

/** Where training stands after an optimizer step, as `TrainHooks.onProgress` gets it. */
export interface TrainProgress {
  /** Optimizer steps done. */
  step: number;
  /** Optimizer steps the schedule spans. */
  totalSteps: number;
  /** 0-based epoch of the last step. */
  epoch: number;
  /** Epochs the run makes in all. */
  epochs: number;
  /** Training loss of the step: `lossSeq + lossPooled`. */
  loss: number;
  /** Mean squared error of the sequence output against the teacher's. */
  lossSeq: number;
  /** Mean squared error of the pooled output against the teacher's. */
  lossPooled: number;
  /** Learning rates the step used, per parameter group. */
  lr: { resampler: number; lora: number };
  /** Samples per second over this session's steps. */
  samplesPerSecond: number;
  /** Training time so far, sessions before a resume included. */
  elapsedSeconds: number;
  /** Estimated time to the last step, at this session's pace. */
  etaSeconds: number;
}

/** Optional ways to observe and host a `train` run. */
export interface TrainHooks {
  /** Device to train on (tests share one); default: a new one, destroyed at the end. */
  gpu?: Gpu;
  /** Notes and warnings, one line each; default stderr. */
  log?: (line: string) => void;
  /** After every optimizer step. */
  onProgress?: (progress: TrainProgress) => void;
  /** After every checkpoint is complete (and `latest.json` points at it). */
  onCheckpoint?: (step: number, dir: string) => void | Promise<void>;
}

/** Held-out evaluation: the training loss and cosine similarities to the teacher. */
export interface EvalResult {
  /** `lossSeq + lossPooled` over the evaluated rows. */
  loss: number;
  /** Mean squared error of the sequence output. */
  lossSeq: number;
  /** Mean squared error of the pooled output. */
  lossPooled: number;
  /** Mean over rows and tokens of the cosine similarity of each sequence row to the teacher's. */
  cosSeq: number;
  /** Mean over rows of the pooled embedding's cosine similarity to the teacher's. */
  cosPooled: number;
  /** Held-out rows evaluated. */
  rows: number;
}

/** What a finished `train` run produced. */
export interface TrainResult {
  /** Optimizer steps of the whole run. */
  steps: number;
  /** The final adapter folder, ready for `loadStudent` and `encode`. */
  adapterDir: string;
  /** Held-out evaluation before the first step and after the last (null without a split). */
  evalBefore: EvalResult | null;
  /** See `evalBefore`. */
  evalAfter: EvalResult | null;
}

/** Which cache a run trained on: a resumed run must read the same teacher and rows. */
export interface CacheIdentity {
  dir: string;
  teacher: TeacherRecord;
  rows: number;
  rowsSha256: string;
}

/** `trainer_state.json` of a checkpoint. */
export interface TrainerState {
  format: typeof TRAINER_STATE_FORMAT;
  version: 1;
  /** Optimizer steps done. */
  step: number;
  totalSteps: number;
  /** Epoch (0-based) the next step belongs to, and how many of its samples are done. */
  epoch: number;
  position: number;
  samples: number;
  /**
   * The random streams are functions of (seed, epoch) and (seed, step, micro-batch), so the
   * seed and the step are their whole state.
   */
  rng: { seed: number; epochOrder: string; dropout: string };
  config: TrajectoryConfig;
  cache: CacheIdentity;
  baseModel: DistillConfig["baseModel"];
  prompt: PromptSettings;
  /** Lines of metrics.jsonl at this step (the log is cut back to them on resume). */
  metricsLines: number;
  elapsedSeconds: number;
  evalBefore: EvalResult | null;
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
  };
  const prompt: PromptSettings = {
    mode: options.prompt?.mode ?? "chat",
    maxTokens: positiveInteger(
      "prompt.maxTokens",
      options.prompt?.maxTokens ?? QWEN_DEFAULT_MAX_TOKENS,
    ),
  };
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

/** Stream tags, so the streams of one seed differ. */
const STREAM = { epochOrder: 1, dropout: 2, loraInit: 3, resamplerInit: 4 } as const;

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

/** Cosine similarity as torch.nn.functional.cosine_similarity (each norm clamped to eps). */
function cosine(a: Float32Array, b: Float32Array, offset: number, length: number): number {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = offset; i < offset + length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  const eps = 1e-8;
  return dot / (Math.max(Math.sqrt(na), eps) * Math.max(Math.sqrt(nb), eps));
}

/** Running sums of an evaluation, in f64. */
export class EvalAccumulator {
  #rows = 0;
  #sqSeq = 0;
  #sqPooled = 0;
  #cosSeq = 0;
  #cosPooled = 0;
  #seqCount = 0;
  #pooledCount = 0;
  readonly #seqLen: number;

  constructor(seqLen: number) {
    this.#seqLen = seqLen;
  }

  /** One batch: `seq` [b, seqLen, seqDim] and `pooled` [b, pooledDim], student and teacher. */
  add(
    student: { seq: Float32Array; pooled: Float32Array },
    teacher: { seq: Float32Array; pooled: Float32Array },
    rows: number,
  ): void {
    const seqDim = student.seq.length / (rows * this.#seqLen);
    const pooledDim = student.pooled.length / rows;
    for (let i = 0; i < student.seq.length; i++) {
      const d = student.seq[i] - teacher.seq[i];
      this.#sqSeq += d * d;
    }
    for (let i = 0; i < student.pooled.length; i++) {
      const d = student.pooled[i] - teacher.pooled[i];
      this.#sqPooled += d * d;
    }
    for (let t = 0; t < rows * this.#seqLen; t++) {
      this.#cosSeq += cosine(student.seq, teacher.seq, t * seqDim, seqDim);
    }
    for (let r = 0; r < rows; r++) {
      this.#cosPooled += cosine(student.pooled, teacher.pooled, r * pooledDim, pooledDim);
    }
    this.#seqCount += student.seq.length;
    this.#pooledCount += student.pooled.length;
    this.#rows += rows;
  }

  result(): EvalResult {
    const lossSeq = this.#sqSeq / this.#seqCount;
    const lossPooled = this.#sqPooled / this.#pooledCount;
    return {
      loss: lossSeq + lossPooled,
      lossSeq,
      lossPooled,
      cosSeq: this.#cosSeq / (this.#rows * this.#seqLen),
      cosPooled: this.#cosPooled / this.#rows,
      rows: this.#rows,
    };
  }
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

function cacheIdentity(cache: TargetCache): CacheIdentity {
  return {
    dir: cache.dir,
    teacher: cache.teacher,
    rows: cache.rows,
    rowsSha256: cache.manifest.rowsSha256,
  };
}

function describeCache(c: CacheIdentity): string {
  const identity = Object.entries(c.teacher.identity).map(([k, v]) => `${k}=${v}`).join(", ");
  return `${c.dir} (teacher ${identity}; targets [${c.teacher.seqLen}, ${c.teacher.seqDim}] + ` +
    `[${c.teacher.pooledDim}]; ${c.rows} rows, rows sha256 ${c.rowsSha256.slice(0, 16)}...)`;
}

/** The differences between two JSON-like values, as `path: a vs b` lines. */
function differences(a: unknown, b: unknown, path = ""): string[] {
  if (
    typeof a === "object" && a !== null && typeof b === "object" && b !== null &&
    !Array.isArray(a) && !Array.isArray(b)
  ) {
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])];
    return keys.flatMap((k) =>
      differences(
        (a as Record<string, unknown>)[k],
        (b as Record<string, unknown>)[k],
        path ? `${path}.${k}` : k,
      )
    );
  }
  return JSON.stringify(a) === JSON.stringify(b)
    ? []
    : [`${path}: ${JSON.stringify(a)} (checkpoint) vs ${JSON.stringify(b)} (now)`];
}

function checkpointName(step: number): string {
  return `step-${String(step).padStart(7, "0")}`;
}

async function readJson<T>(path: string, what: string): Promise<T> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) throw new Error(`${path} not found (${what})`);
    throw err;
  }
  try {
    return JSON.parse(text) as T;
  } catch (err) {
    throw new Error(`${path}: invalid JSON (${(err as Error).message}); ${what}`);
  }
}

/** `checkpoints/latest.json`, or undefined when the run has no checkpoint. */
export async function readLatestCheckpoint(
  out: string,
): Promise<{ step: number; dir: string } | undefined> {
  const path = join(out, CHECKPOINTS_DIR, LATEST_FILE);
  try {
    await Deno.stat(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
  const latest = await readJson<{ step: number; dir: string }>(path, "the newest checkpoint");
  if (!Number.isSafeInteger(latest.step) || typeof latest.dir !== "string") {
    throw new Error(`${path}: expected {"step": <n>, "dir": "step-..."}`);
  }
  return { step: latest.step, dir: join(out, CHECKPOINTS_DIR, latest.dir) };
}

async function removeIfPresent(path: string): Promise<void> {
  await Deno.remove(path, { recursive: true }).catch((err) => {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  });
}

/** Checkpoint folders by step, and leftover temp folders of interrupted writes. */
async function listCheckpoints(root: string): Promise<{ steps: number[]; temps: string[] }> {
  const steps: number[] = [];
  const temps: string[] = [];
  try {
    for await (const entry of Deno.readDir(root)) {
      const m = /^step-(\d+)$/.exec(entry.name);
      if (m && entry.isDirectory) steps.push(Number(m[1]));
      if (entry.name.startsWith(".tmp-")) temps.push(entry.name);
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  return { steps: steps.sort((a, b) => a - b), temps };
}

async function writeOptimizerState(path: string, state: AdamWState): Promise<void> {
  const tensors = [];
  for (const [moment, values] of [["exp_avg", state.m], ["exp_avg_sq", state.v]] as const) {
    for (const [name, data] of values) {
      tensors.push({
        name: `${moment}/${name}`,
        dtype: "F32" as const,
        shape: [data.length],
        data,
      });
    }
  }
  await writeSafetensors(path, tensors, { format: "distill-adamw", step: String(state.step) });
}

async function readOptimizerState(path: string): Promise<AdamWState> {
  const file = await SafetensorsFile.open(path);
  try {
    const step = Number(file.metadata.step);
    if (file.metadata.format !== "distill-adamw" || !Number.isSafeInteger(step)) {
      throw new Error(`${path}: not an optimizer state written by distill train`);
    }
    const m = new Map<string, Float32Array>();
    const v = new Map<string, Float32Array>();
    for (const key of file.names()) {
      const slash = key.indexOf("/");
      const moment = key.slice(0, slash);
      const target = moment === "exp_avg" ? m : moment === "exp_avg_sq" ? v : undefined;
      if (!target) throw new Error(`${path}: unexpected tensor '${key}'`);
      target.set(key.slice(slash + 1), await file.readF32(key));
    }
    return { step, m, v };
  } finally {
    file.close();
  }
}

interface Session {
  config: TrainConfig;
  gpu: Gpu;
  cache: TargetCache;
  tokenizer: QwenTokenizer;
  qwenConfig: Qwen3Config;
  baseModel: DistillConfig["baseModel"];
  student: StudentModel;
  distill: DistillStep;
  log: (line: string) => void;
  truncated: number;
}

/** Tokens and targets of some cache rows. */
async function loadMicroBatch(s: Session, rows: readonly number[]): Promise<MicroBatch> {
  const captions = rows.map((r) => s.cache.captions[r]);
  const enc = s.tokenizer.encodeBatch(captions, s.config.prompt);
  const cut = enc.truncated.filter(Boolean).length;
  if (cut > 0 && s.truncated === 0) {
    s.log(
      `train: warning: some prompts are longer than ${s.config.prompt.maxTokens} tokens and are ` +
        `cut (--max-tokens); encode cuts them the same way. The count is reported at the end`,
    );
  }
  s.truncated += cut;
  const tokens: TokenBatch = {
    ids: enc.ids,
    lengths: enc.lengths,
    batch: rows.length,
    seqLen: enc.T,
  };
  const targets = await s.cache.readRows(rows);
  return { tokens, targetSeq: targets.seq, targetPooled: targets.pooled };
}

async function loadStepBatches(s: Session, rows: readonly number[]): Promise<MicroBatch[]> {
  const micros: MicroBatch[] = [];
  let start = 0;
  for (const size of s.config.microBatches) {
    micros.push(await loadMicroBatch(s, rows.slice(start, start + size)));
    start += size;
  }
  return micros;
}

/** Student vs teacher on the held-out rows, without dropout. */
async function evaluate(s: Session, rows: readonly number[]): Promise<EvalResult> {
  const acc = new EvalAccumulator(s.cache.seqLen);
  const size = Math.max(...s.config.microBatches);
  for (let start = 0; start < rows.length; start += size) {
    const chunk = rows.slice(start, start + size);
    const micro = await loadMicroBatch(s, chunk);
    const { seq, pooled } = studentForward(s.gpu, s.student, micro.tokens);
    const [seqOut, pooledOut] = (await s.gpu.readAll([seq, pooled])) as Float32Array[];
    seq.destroy();
    pooled.destroy();
    acc.add(
      { seq: seqOut, pooled: pooledOut },
      { seq: micro.targetSeq, pooled: micro.targetPooled },
      chunk.length,
    );
  }
  return acc.result();
}

function distillConfig(s: Session, training: Record<string, unknown>): DistillConfig {
  return {
    format: "distill-adapter",
    version: 1,
    prompt: s.config.prompt,
    baseModel: s.baseModel,
    teacher: s.cache.teacher.identity,
    training,
  };
}

interface CheckpointContents {
  step: number;
  totalSteps: number;
  stepsPerEpoch: number;
  metricsLines: number;
  elapsedSeconds: number;
  evalBefore: EvalResult | null;
}

/**
 * Writes `checkpoints/step-N` into a temp folder renamed into place, then points
 * `latest.json` at it and removes all but the newest `keepCheckpoints`.
 */
async function saveCheckpoint(s: Session, c: CheckpointContents): Promise<string> {
  const root = join(s.config.out, CHECKPOINTS_DIR);
  await Deno.mkdir(root, { recursive: true });
  const name = checkpointName(c.step);
  const tmp = join(root, `.tmp-${name}`);
  const dir = join(root, name);
  await removeIfPresent(tmp);
  await saveAdapter(s.gpu, tmp, {
    config: distillConfig(s, { step: c.step, total_steps: c.totalSteps }),
    lora: s.student.lora,
    resampler: s.student.resampler,
  });
  await writeOptimizerState(join(tmp, OPTIMIZER_FILE), await s.distill.optimizer.state());
  const epoch = Math.floor(c.step / c.stepsPerEpoch);
  const state: TrainerState = {
    format: TRAINER_STATE_FORMAT,
    version: 1,
    step: c.step,
    totalSteps: c.totalSteps,
    epoch,
    position: (c.step - epoch * c.stepsPerEpoch) * s.config.stepBatch,
    samples: c.step * s.config.stepBatch,
    rng: {
      seed: s.config.seed,
      epochOrder: EPOCH_ORDER_DESCRIPTION,
      dropout: "mixSeed(seed, 2, step, microBatch)",
    },
    config: trajectoryOf(s.config),
    cache: cacheIdentity(s.cache),
    baseModel: s.baseModel,
    prompt: s.config.prompt,
    metricsLines: c.metricsLines,
    elapsedSeconds: c.elapsedSeconds,
    evalBefore: c.evalBefore,
  };
  await writeFileAtomic(join(tmp, TRAINER_STATE_FILE), JSON.stringify(state, null, 2) + "\n");
  // A folder of this step can only be left from an abandoned later part of the same run.
  await removeIfPresent(dir);
  await Deno.rename(tmp, dir);
  await writeFileAtomic(
    join(root, LATEST_FILE),
    JSON.stringify({ step: c.step, dir: name }, null, 2) + "\n",
  );
  const older = (await listCheckpoints(root)).steps.filter((st) => st < c.step);
  for (const old of older.slice(0, Math.max(0, older.length - (s.config.keepCheckpoints - 1)))) {
    await removeIfPresent(join(root, checkpointName(old)));
  }
  return dir;
}

/** Writes `<out>/adapter` through a temp folder, so a complete adapter replaces the old one. */
async function saveFinalAdapter(s: Session, training: Record<string, unknown>): Promise<string> {
  const dir = join(s.config.out, ADAPTER_DIR);
  const tmp = join(s.config.out, `.tmp-${ADAPTER_DIR}`);
  await removeIfPresent(tmp);
  await saveAdapter(s.gpu, tmp, {
    config: distillConfig(s, training),
    lora: s.student.lora,
    resampler: s.student.resampler,
  });
  await removeIfPresent(dir);
  await Deno.rename(tmp, dir);
  return dir;
}

function evalRecord(step: number, e: EvalResult): Omit<EvalRecord, "type"> {
  return {
    step,
    heldout_loss: e.loss,
    heldout_loss_seq: e.lossSeq,
    heldout_loss_pooled: e.lossPooled,
    cos_seq: e.cosSeq,
    cos_pooled: e.cosPooled,
  };
}

/** What a resumed run reads from its checkpoint, checked against this run. */
async function readResumeState(
  dir: string,
  config: TrainConfig,
  cache: TargetCache,
  baseModel: DistillConfig["baseModel"],
): Promise<TrainerState> {
  const path = join(dir, TRAINER_STATE_FILE);
  const state = await readJson<TrainerState>(path, "written with each checkpoint");
  if (state.format !== TRAINER_STATE_FORMAT || state.version !== 1) {
    throw new Error(`${path}: not a trainer state of this version of distill train`);
  }
  const now = cacheIdentity(cache);
  if (
    JSON.stringify(state.cache.teacher) !== JSON.stringify(now.teacher) ||
    state.cache.rowsSha256 !== now.rowsSha256
  ) {
    throw new Error(
      `cannot resume ${config.out}: its checkpoint ${dir} was trained on the cache ` +
        `${describeCache(state.cache)}, but this run reads ${describeCache(now)}. Resume with ` +
        `--cache ${state.cache.dir}, or start a new run in another --out folder`,
    );
  }
  const changed = [
    ...(state.rng.epochOrder === EPOCH_ORDER_DESCRIPTION
      ? []
      : [`epoch order: ${state.rng.epochOrder} (this version: ${EPOCH_ORDER_DESCRIPTION})`]),
    ...differences(state.config, trajectoryOf(config)),
    ...differences(state.baseModel, baseModel).map((d) => `base model ${d}`),
  ];
  if (changed.length) {
    throw new Error(
      `cannot resume ${config.out} from ${dir}: these settings differ from the ones it was ` +
        `trained with, so the run would not continue the same trajectory:\n  ` +
        `${changed.join("\n  ")}\nRerun with the checkpoint's settings, or start a new run ` +
        `in another --out folder`,
    );
  }
  return state;
}

function etaOf(stepsLeft: number, secondsPerStep: number): number {
  return secondsPerStep > 0 ? stepsLeft * secondsPerStep : Infinity;
}

/** Trains a student on a target cache; see the module comment for what lands in `out`. */
export async function train(options: TrainOptions, hooks: TrainHooks = {}): Promise<TrainResult> {
  const config = resolveTrainConfig(options);
  const log = hooks.log ?? ((line: string) => console.error(line));
  checkLoraTargets(config.lora.targetModules, config.qwen);
  // Fails fast when the run folder cannot be written (e.g. outside the task's permissions).
  await Deno.mkdir(config.out, { recursive: true });

  // Everything cheap is checked before the weights are read.
  const cache = await openTargetCache(config.cache);
  const split = splitCacheRows(cache.captions, config.heldOutFraction);
  for (const warning of split.warnings) log(`train: warning: ${warning}`);
  if (split.train.length < config.stepBatch) {
    throw new Error(
      `the batch of ${config.stepBatch} samples per step is larger than the training split: ` +
        `the cache ${cache.dir} has ${cache.rows} rows, ${split.heldOut.length} held out, ` +
        `${split.train.length} to train on. Use a smaller --batch-size (or --grad-accum)`,
    );
  }
  const evalRows = config.evalRows > 0 ? split.heldOut.slice(0, config.evalRows) : split.heldOut;
  const { stepsPerEpoch, totalSteps } = stepCounts(split.train.length, config);
  const folder = await ModelFolder.open(config.qwen);
  const qwenConfig = qwen3Config(folder);
  checkQwen3Tensors(folder, qwenConfig);
  const tokenizer = await loadQwenTokenizer(config.qwen);
  const baseModel = baseModelRecord(basename(config.qwen), qwenConfig);
  const resamplerConfig: ResamplerConfig = {
    dimIn: qwenConfig.hiddenSize,
    ...config.resampler,
    numQueries: cache.seqLen,
    dimSeq: cache.seqDim,
    dimPooled: cache.pooledDim,
  };
  checkResamplerConfig(resamplerConfig, "resampler options");

  const found = await readLatestCheckpoint(config.out);
  if (found && !config.resume) {
    throw new Error(
      `${config.out} already holds a run with checkpoints: pass --resume to continue it, or ` +
        `choose another --out folder`,
    );
  }
  if (!found && config.resume) {
    log(`train: no checkpoint in ${join(config.out, CHECKPOINTS_DIR)}: starting from step 0`);
  }
  const latest = config.resume ? found : undefined;
  const resumeState = latest
    ? await readResumeState(latest.dir, config, cache, baseModel)
    : undefined;

  const gpu = hooks.gpu ?? (await Gpu.create());
  const owned: Array<() => void> = [];
  try {
    const qwen = await loadQwen3Weights(gpu, folder, { quantize: "nf4" });
    owned.push(() => destroyQwen3Weights(qwen));
    folder.close();
    let student: StudentModel;
    if (latest) {
      const adapter = await loadAdapter(gpu, latest.dir, qwenConfig);
      checkResamplerFitsCache(adapter.resampler.config, cache, latest.dir);
      student = { qwen, lora: adapter.lora, resampler: adapter.resampler };
    } else {
      const lora = initLora(
        gpu,
        qwen3LinearShapes(qwenConfig),
        qwenConfig.numLayers,
        config.lora,
        new Rng(mixSeed(config.seed, STREAM.loraInit)),
      );
      const resampler = initResampler(
        gpu,
        resamplerConfig,
        new Rng(mixSeed(config.seed, STREAM.resamplerInit)),
      );
      student = { qwen, lora, resampler };
    }
    owned.push(() => destroyLora(student.lora), () => destroyResampler(student.resampler));
    const gradientCheckpointing = config.gradientCheckpointing === "auto"
      ? qwenConfig.numLayers >= CHECKPOINTING_MIN_LAYERS
      : config.gradientCheckpointing;
    const distill = new DistillStep(gpu, student, {
      lr: config.lr,
      weightDecay: config.weightDecay,
      maxGradNorm: config.maxGradNorm,
    }, { gradientCheckpointing });
    owned.push(() => distill.destroy());
    if (latest) {
      distill.optimizer.loadState(await readOptimizerState(join(latest.dir, OPTIMIZER_FILE)));
    }

    const s: Session = {
      config,
      gpu,
      cache,
      tokenizer,
      qwenConfig,
      baseModel,
      student,
      distill,
      log,
      truncated: 0,
    };
    return await runLoop(s, {
      split,
      evalRows,
      stepsPerEpoch,
      totalSteps,
      resumeState,
      gradientCheckpointing,
      hooks,
    });
  } finally {
    for (const release of owned.reverse()) release();
    if (!hooks.gpu) gpu.destroy();
  }
}

interface LoopPlan {
  split: DataSplit;
  evalRows: number[];
  stepsPerEpoch: number;
  totalSteps: number;
  resumeState: TrainerState | undefined;
  gradientCheckpointing: boolean;
  hooks: TrainHooks;
}

async function runLoop(s: Session, plan: LoopPlan): Promise<TrainResult> {
  const { config, log } = s;
  const { totalSteps, stepsPerEpoch, resumeState, hooks } = plan;
  const startStep = resumeState?.step ?? 0;
  const root = join(config.out, CHECKPOINTS_DIR);
  // Folders past the starting step belong to an abandoned continuation (or, at step 0, to a
  // first checkpoint that never reached latest.json); temp folders to interrupted writes.
  const { steps, temps } = await listCheckpoints(root);
  for (const st of steps.filter((st) => st > startStep)) {
    await removeIfPresent(join(root, checkpointName(st)));
  }
  for (const t of temps) await removeIfPresent(join(root, t));
  const metrics = await MetricsLog.open(
    config.out,
    resumeState ? { resumeFromStep: startStep } : { overwrite: config.resume },
  );
  let metricsLines = resumeState?.metricsLines ?? 0;
  let result: TrainResult;
  try {
    const warmup = warmupSteps(totalSteps, config.warmupRatio);
    const p = s.student.resampler.config;
    if (!resumeState) {
      await metrics.logRun({
        cache: cacheIdentity(s.cache),
        qwen: config.qwen,
        base_model: s.baseModel,
        ...trajectoryOf(config),
        total_steps: totalSteps,
        steps_per_epoch: stepsPerEpoch,
        warmup_steps: warmup,
        train_rows: plan.split.train.length,
        heldout_rows: plan.split.heldOut.length,
        eval_rows: plan.evalRows.length,
        gradient_checkpointing: plan.gradientCheckpointing,
        resampler_params: resamplerParamCount(p),
      });
      metricsLines++;
    }
    log(
      `train: ${plan.split.train.length} training rows, ${plan.split.heldOut.length} held out ` +
        `(evaluating on ${plan.evalRows.length}); ${totalSteps} steps of ${config.stepBatch} ` +
        `samples (${config.microBatches.length} micro-batch${
          config.microBatches.length > 1 ? "es" : ""
        } of ${config.microBatches.join("/")}), ${stepsPerEpoch} per epoch; gradient ` +
        `checkpointing ${plan.gradientCheckpointing ? "on" : "off"}` +
        (resumeState ? `; resuming after step ${startStep}` : ""),
    );
    const canEval = plan.evalRows.length > 0;
    let evalBefore = resumeState?.evalBefore ?? null;
    let evalAfter: EvalResult | null = null;
    if (!resumeState && canEval) {
      evalBefore = await evaluate(s, plan.evalRows);
      await metrics.logEval(evalRecord(0, evalBefore));
      metricsLines++;
      log(`train: held-out loss before training ${evalBefore.loss.toPrecision(5)}`);
    }
    if (startStep === totalSteps && canEval) evalAfter = await evaluate(s, plan.evalRows);

    const order = new StepOrder({
      train: plan.split.train,
      lengths: plan.split.train.map((row) =>
        Math.max(1, s.tokenizer.encode(s.cache.captions[row], config.prompt).ids.length)
      ),
      stepBatch: config.stepBatch,
      stepsPerEpoch,
      epochSeed: (epoch) => mixSeed(config.seed, STREAM.epochOrder, epoch),
    });
    const elapsedBefore = resumeState?.elapsedSeconds ?? 0;
    const sessionStart = performance.now();
    const sessionSeconds = () => (performance.now() - sessionStart) / 1000;
    const prefetch = (step: number) => {
      const pending = loadStepBatches(s, order.rows(step));
      pending.catch(() => {}); // awaited (and thrown) when its step comes
      return pending;
    };
    let next = startStep < totalSteps ? prefetch(startStep) : undefined;
    try {
      for (let step = startStep; step < totalSteps; step++) {
        const micros = await next!;
        micros.forEach((micro, i) =>
          s.distill.accumulate(
            micro,
            micro.tokens.batch / config.stepBatch,
            mixSeed(config.seed, STREAM.dropout, step, i),
          )
        );
        next = step + 1 < totalSteps ? prefetch(step + 1) : undefined;
        const measured = await s.distill.measure();
        const factor = lrFactor(step, totalSteps, warmup);
        const lr = { resampler: config.lr.resampler * factor, lora: config.lr.lora * factor };
        const done = step + 1;
        const epoch = Math.floor(step / stepsPerEpoch);
        const seconds = sessionSeconds();
        const samplesPerSecond = (done - startStep) * config.stepBatch / seconds;
        const finite = Number.isFinite(measured.loss) && Number.isFinite(measured.gradNorm.total);
        const clipCoef = finite ? s.distill.apply(measured.gradNorm.total, factor) : NaN;
        await metrics.logStep({
          step: done,
          epoch,
          samples: done * config.stepBatch,
          loss: measured.loss,
          loss_seq: measured.lossSeq,
          loss_pooled: measured.lossPooled,
          lr,
          grad_norm: measured.gradNorm,
          clip_coef: clipCoef,
          padding: paddingFraction(micros.map((micro) => micro.tokens)),
          samples_per_s: samplesPerSecond,
          elapsed_s: elapsedBefore + seconds,
        });
        metricsLines++;
        if (!finite) {
          const latest = await readLatestCheckpoint(config.out);
          throw new Error(
            `training diverged at step ${done}: loss ${measured.loss}, gradient norm ` +
              `${measured.gradNorm.total}. Start a new run with lower learning rates ` +
              `(--lr-resampler, --lr-lora) or a lower --max-grad-norm` +
              (latest ? `; the last finite checkpoint is ${latest.dir}` : ""),
          );
        }
        hooks.onProgress?.({
          step: done,
          totalSteps,
          epoch,
          epochs: config.epochs,
          loss: measured.loss,
          lossSeq: measured.lossSeq,
          lossPooled: measured.lossPooled,
          lr,
          samplesPerSecond,
          elapsedSeconds: elapsedBefore + seconds,
          etaSeconds: etaOf(totalSteps - done, seconds / (done - startStep)),
        });
        const last = done === totalSteps;
        if (canEval && (last || (config.evalEvery > 0 && done % config.evalEvery === 0))) {
          const result = await evaluate(s, plan.evalRows);
          await metrics.logEval(evalRecord(done, result));
          metricsLines++;
          if (last) evalAfter = result;
        }
        if (last || (config.checkpointEvery > 0 && done % config.checkpointEvery === 0)) {
          const dir = await saveCheckpoint(s, {
            step: done,
            totalSteps,
            stepsPerEpoch,
            metricsLines,
            elapsedSeconds: elapsedBefore + sessionSeconds(),
            evalBefore,
          });
          await hooks.onCheckpoint?.(done, dir);
        }
      }
    } finally {
      // A step that failed may leave the next one's reads in flight: let them settle.
      await next?.catch(() => {});
    }
    if (s.truncated > 0) {
      log(
        `train: warning: ${s.truncated} prompts were cut to ${config.prompt.maxTokens} tokens ` +
          `(--max-tokens); encode cuts them the same way`,
      );
    }
    const training: Record<string, unknown> = {
      steps: totalSteps,
      samples: totalSteps * config.stepBatch,
      epochs: config.epochs,
      heldout_rows: plan.evalRows.length,
      heldout_loss_before: evalBefore?.loss ?? null,
      heldout_loss_after: evalAfter?.loss ?? null,
      cos_seq_after: evalAfter?.cosSeq ?? null,
      cos_pooled_after: evalAfter?.cosPooled ?? null,
    };
    const adapterDir = await saveFinalAdapter(s, training);
    log(
      `train: done after ${totalSteps} steps` +
        (evalBefore && evalAfter
          ? `; held-out loss ${evalBefore.loss.toPrecision(5)} -> ${evalAfter.loss.toPrecision(5)}`
          : "") +
        `; adapter in ${adapterDir}`,
    );
    result = { steps: totalSteps, adapterDir, evalBefore, evalAfter };
  } finally {
    metrics.close();
  }
  await writeReport(config.out);
  return result;
}
