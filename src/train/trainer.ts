/**
 * The distillation training loop (docs/numerics.md §5): reads captions and teacher targets from a target
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
 *   verified-shards.json             cache shards whose SHA-256 was checked (src/data/cache_verify.ts)
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
import { VERIFIED_SHARDS_FILE } from "../data/cache_verify.ts";
import { openTargetCache, type TargetCache } from "../data/target_cache.ts";
import { Gpu } from "../gpu/device.ts";
import { ModelFolder } from "../io/hf.ts";
import { prepareOutputFolder } from "../io/output_path.ts";
import { destroyLora, initLora } from "../models/lora.ts";
import type { TokenBatch } from "../models/qwen3.ts";
import {
  checkQwen3Tensors,
  destroyQwen3Weights,
  loadQwen3Weights,
  type Qwen3Config,
  qwen3Config,
  qwen3LinearShapes,
} from "../models/qwen3_weights.ts";
import { checkResamplerConfig, type ResamplerConfig } from "../models/resampler_config.ts";
import {
  destroyResampler,
  initResampler,
  resamplerParamCount,
  startResamplerAtMean,
} from "../models/resampler_weights.ts";
import { loadQwenTokenizer, type QwenTokenizer } from "../text/qwen_tokenizer.ts";
import { Rng } from "../util/rng.ts";
import { baseModelRecord, type DistillConfig, loadAdapter } from "./adapter.ts";
import { paddingFraction, StepOrder } from "./batching.ts";
import {
  cacheIdentity,
  checkpointName,
  CHECKPOINTS_DIR,
  listCheckpoints,
  OPTIMIZER_FILE,
  readLatestCheckpoint,
  readOptimizerState,
  readResumeState,
  removeIfPresent,
  saveCheckpoint,
  saveFinalAdapter,
  type TrainerState,
} from "./checkpoint.ts";
import {
  describeHeldOut,
  EvalAccumulator,
  evalRecord,
  type EvalResult,
  HeldOutEvaluator,
  type Predictions,
  referencePool,
  targetMeans,
} from "./evaluation.ts";
import { MetricsLog, type MetricsRecord } from "./metrics.ts";
import { lrFactor, warmupSteps } from "./optim.ts";
import {
  checkLoraTargets,
  CHECKPOINTING_MIN_LAYERS,
  checkResamplerFitsCache,
  type DataSplit,
  mixSeed,
  resolveTrainConfig,
  splitCacheRows,
  splitCacheRowsByFile,
  stepCounts,
  type TrainConfig,
  type TrainOptions,
  trajectoryOf,
} from "./options.ts";
import { writeReport } from "./report.ts";
import { DistillStep, type MicroBatch, studentForward, type StudentModel } from "./step.ts";

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
  /** Every metrics.jsonl record once written (e.g. W&B tracking); must not throw. */
  onMetrics?: (record: MetricsRecord) => void;
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

/** Stream tags, so the streams of one seed differ. */
const STREAM = { epochOrder: 1, dropout: 2, loraInit: 3, resamplerInit: 4 } as const;

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

/** Student tokens of some cache rows (counting prompts cut to the token limit). */
function tokenizeRows(s: Session, rows: readonly number[]): TokenBatch {
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
  return { ids: enc.ids, lengths: enc.lengths, batch: rows.length, seqLen: enc.T };
}

/** Tokens and targets of some cache rows. */
async function loadMicroBatch(s: Session, rows: readonly number[]): Promise<MicroBatch> {
  const tokens = tokenizeRows(s, rows);
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

/** Student vs teacher on the held-out rows, without dropout, beside the references. */
async function evaluate(
  s: Session,
  rows: readonly number[],
  evaluator: HeldOutEvaluator,
): Promise<EvalResult> {
  const acc = new EvalAccumulator(s.cache.seqLen);
  const size = Math.max(...s.config.microBatches);
  const outputs: Predictions = {
    seq: new Float32Array(rows.length * evaluator.mean.seq.length),
    pooled: new Float32Array(rows.length * evaluator.mean.pooled.length),
  };
  for (let start = 0; start < rows.length; start += size) {
    const chunk = rows.slice(start, start + size);
    const { seq, pooled } = studentForward(s.gpu, s.student, tokenizeRows(s, chunk));
    const [seqOut, pooledOut] = (await s.gpu.readAll([seq, pooled])) as Float32Array[];
    seq.destroy();
    pooled.destroy();
    outputs.seq.set(seqOut, start * evaluator.mean.seq.length);
    outputs.pooled.set(pooledOut, start * evaluator.mean.pooled.length);
    acc.add(
      { seq: seqOut, pooled: pooledOut },
      evaluator.targets(start, chunk.length),
      chunk.length,
    );
  }
  return { ...acc.result(), heldOut: evaluator.report(outputs) };
}

function etaOf(stepsLeft: number, secondsPerStep: number): number {
  return secondsPerStep > 0 ? stepsLeft * secondsPerStep : Infinity;
}

/** Trains a student on a target cache; see the module comment for what lands in `out`. */
export async function train(options: TrainOptions, hooks: TrainHooks = {}): Promise<TrainResult> {
  const config = resolveTrainConfig(options);
  const log = hooks.log ?? ((line: string) => console.error(line));
  checkLoraTargets(config.lora.targetModules, config.qwen);
  // Fails fast when the run folder cannot be written (outside the task's permissions, or
  // reached through a link that leads outside them).
  await prepareOutputFolder(config.out);

  // Everything cheap is checked before the weights are read.
  const cache = await openTargetCache(config.cache, {
    verifiedShardsFile: join(config.out, VERIFIED_SHARDS_FILE),
  });
  const split = config.heldOutFiles.length
    ? splitCacheRowsByFile(cache.ids, cache.captions, config.heldOutFiles)
    : splitCacheRows(cache.captions, config.heldOutFraction);
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
  if (evalRows.length === 0) {
    log(
      `train: no held-out rows (held-out fraction ${config.heldOutFraction}), so no held-out ` +
        `figures; hold some captions out (--held-out 0.05) to see whether the student learns`,
    );
  }
  // The per-position mean of the training targets: the reference every held-out figure is
  // measured against, and where a mean-start resampler's outputs begin.
  let mean: Predictions | undefined;
  let evaluator: HeldOutEvaluator | undefined;
  if (evalRows.length > 0 || (config.resampler.seqBias && !latest)) {
    const pool = referencePool(split.train);
    log(`train: reading ${pool.length} training rows for the mean target`);
    mean = await targetMeans(cache, pool);
    if (evalRows.length > 0) {
      evaluator = await HeldOutEvaluator.create(cache, evalRows, pool, mean);
    }
  }

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
      if (resamplerConfig.seqBias) startResamplerAtMean(gpu, resampler, mean!);
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
      evaluator,
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
  /** Held-out evaluation; absent without held-out rows. */
  evaluator: HeldOutEvaluator | undefined;
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
  const metrics = await MetricsLog.open(config.out, {
    ...(resumeState ? { resumeFromStep: startStep } : { overwrite: config.resume }),
    onRecord: hooks.onMetrics,
  });
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
    const evaluator = plan.evaluator;
    let evalBefore = resumeState?.evalBefore ?? null;
    let evalAfter: EvalResult | null = null;
    if (!resumeState && evaluator) {
      evalBefore = await evaluate(s, plan.evalRows, evaluator);
      await metrics.logEval(evalRecord(0, evalBefore));
      metricsLines++;
      log(`train: held-out loss before training ${evalBefore.loss.toPrecision(5)}`);
    }
    if (startStep === totalSteps && evaluator) {
      evalAfter = await evaluate(s, plan.evalRows, evaluator);
    }

    const order = new StepOrder({
      train: plan.split.train,
      lengths: plan.split.train.map((row) =>
        Math.max(1, s.tokenizer.encode(s.cache.captions[row], config.prompt).ids.length)
      ),
      stepBatch: config.stepBatch,
      stepsPerEpoch,
      epochSeed: (epoch) => mixSeed(config.seed, STREAM.epochOrder, epoch),
      windowBatches: config.bucketWindow,
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
        if (evaluator && (last || (config.evalEvery > 0 && done % config.evalEvery === 0))) {
          const result = await evaluate(s, plan.evalRows, evaluator);
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
      r2_seq_after: evalAfter?.heldOut?.student.r2Seq ?? null,
      r2_pooled_after: evalAfter?.heldOut?.student.r2Pooled ?? null,
      top1_seq_after: evalAfter?.heldOut?.student.top1Seq ?? null,
      top1_pooled_after: evalAfter?.heldOut?.student.top1Pooled ?? null,
    };
    const adapterDir = await saveFinalAdapter(s, training);
    log(
      `train: done after ${totalSteps} steps` +
        (evalBefore && evalAfter
          ? `; held-out loss ${evalBefore.loss.toPrecision(5)} -> ${evalAfter.loss.toPrecision(5)}`
          : "") +
        `; adapter in ${adapterDir}`,
    );
    if (evalAfter?.heldOut) {
      for (const line of describeHeldOut(evalAfter.heldOut)) log(`train: ${line}`);
    }
    result = { steps: totalSteps, adapterDir, evalBefore, evalAfter };
  } finally {
    metrics.close();
  }
  await writeReport(config.out);
  return result;
}
