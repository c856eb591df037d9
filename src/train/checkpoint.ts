/**
 * Checkpoints of a training run: the folder layout under `<out>/checkpoints/`, the optimizer
 * state file, the trainer state a resumed run reads, and the checks that it continues the same
 * trajectory (same cache, same settings); writing a checkpoint and the final adapter, each
 * through a temp folder renamed into place.
 */
import { join } from "node:path";
import type { TargetCache } from "../data/target_cache.ts";
import type { TeacherRecord } from "../data/cache_format.ts";
import { SafetensorsFile, writeSafetensors } from "../io/safetensors.ts";
import type { Gpu } from "../gpu/device.ts";
import { writeFileAtomic } from "../io/atomic.ts";
import { type DistillConfig, type PromptSettings, saveAdapter } from "./adapter.ts";
import { EPOCH_ORDER_DESCRIPTION } from "./batching.ts";
import type { EvalResult } from "./evaluation.ts";
import type { AdamWState } from "./optim.ts";
import { type TrainConfig, type TrajectoryConfig, trajectoryOf } from "./options.ts";
import type { StudentModel } from "./step.ts";

export const CHECKPOINTS_DIR = "checkpoints";

export const LATEST_FILE = "latest.json";

export const OPTIMIZER_FILE = "optimizer.safetensors";

export const TRAINER_STATE_FILE = "trainer_state.json";

export const TRAINER_STATE_FORMAT = "distill-trainer-state";

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

export function cacheIdentity(cache: TargetCache): CacheIdentity {
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

export function checkpointName(step: number): string {
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

export async function removeIfPresent(path: string): Promise<void> {
  await Deno.remove(path, { recursive: true }).catch((err) => {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  });
}

/** Checkpoint folders by step, and leftover temp folders of interrupted writes. */
export async function listCheckpoints(root: string): Promise<{ steps: number[]; temps: string[] }> {
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

export async function writeOptimizerState(path: string, state: AdamWState): Promise<void> {
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

export async function readOptimizerState(path: string): Promise<AdamWState> {
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

/** What a resumed run reads from its checkpoint, checked against this run. */
export async function readResumeState(
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

/** The run folder's subfolder that holds the final adapter `encode` reads. */
export const ADAPTER_DIR = "adapter";

/** What writing a checkpoint or the final adapter reads from the running trainer. */
export interface CheckpointSession {
  config: TrainConfig;
  gpu: Gpu;
  cache: TargetCache;
  baseModel: DistillConfig["baseModel"];
  student: Pick<StudentModel, "lora" | "resampler">;
  distill: { optimizer: { state(): Promise<AdamWState> } };
}

function distillConfig(s: CheckpointSession, training: Record<string, unknown>): DistillConfig {
  return {
    format: "distill-adapter",
    version: 1,
    prompt: s.config.prompt,
    baseModel: s.baseModel,
    teacher: s.cache.teacher.identity,
    training,
  };
}

export interface CheckpointContents {
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
export async function saveCheckpoint(s: CheckpointSession, c: CheckpointContents): Promise<string> {
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
export async function saveFinalAdapter(
  s: CheckpointSession,
  training: Record<string, unknown>,
): Promise<string> {
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
