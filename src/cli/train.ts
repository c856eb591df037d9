import { DEFAULT_LORA_CONFIG, type LinearName, QWEN3_LINEARS } from "../models/lora.ts";
import { RESAMPLER_DEFAULTS } from "../models/resampler_config.ts";
import {
  QWEN_DEFAULT_MAX_TOKENS,
  QWEN_PROMPT_MODES,
  type QwenPromptMode,
} from "../text/qwen_tokenizer.ts";
import {
  DEFAULT_LR,
  DEFAULT_MAX_GRAD_NORM,
  DEFAULT_WARMUP_RATIO,
  DEFAULT_WEIGHT_DECAY,
} from "../train/optim.ts";
import {
  CHECKPOINTING_MIN_LAYERS,
  DEFAULT_BATCH_SIZE,
  DEFAULT_BUCKET_WINDOW,
  DEFAULT_CHECKPOINT_EVERY,
  DEFAULT_EVAL_EVERY,
  DEFAULT_EVAL_ROWS,
  DEFAULT_HELD_OUT_FRACTION,
  DEFAULT_KEEP_CHECKPOINTS,
  resolveTrainConfig,
  type TrainOptions,
} from "../train/options.ts";
import { train, type TrainProgress } from "../train/trainer.ts";
import { type Command, parseCommandArgs, UsageError } from "./args.ts";
import { explainPermission, type ScopedTask } from "./progress.ts";
import { formatDuration, progressThrottle } from "../util/progress.ts";
import {
  startWandbTracking,
  WANDB_FLAGS_HELP,
  WANDB_OPTIONS,
  wandbRunOptions,
} from "./wandb_sync.ts";
import type { WandbRunOptions } from "../train/wandb.ts";

const TRAIN_TASK: ScopedTask = {
  name: "train",
  writeFolder: "runs",
  allowEnv: "--allow-env=DISTILL_DEBUG,DENO_WEBGPU_BACKEND",
};

export const TRAIN_HELP =
  `distill train: distil SDXL's text encoders into a 4-bit Qwen3 student: LoRA on the
NF4 Qwen3 plus a Perceiver Resampler, trained on a target cache (deno task cache).

Usage: deno task train --cache <folder> --qwen <folder> --out <folder> [options]

Data and model:
  --cache <folder>            target cache written by 'deno task cache'
  --qwen <folder>             Qwen3 model folder (config.json, *.safetensors, tokenizer.json,
                              tokenizer_config.json), e.g. a download of Qwen/Qwen3-4B
  --out <folder>              run folder: metrics.jsonl, report.html, checkpoints/, and the
                              trained adapter in <out>/adapter (what 'encode' reads)
  --held-out <fraction>       share of captions held out for evaluation, chosen by caption
                              hash (default ${DEFAULT_HELD_OUT_FRACTION}; 0: no evaluation)
  --held-out-files <list>     instead of --held-out: hold out the rows of these caption files
                              (comma-separated names without extension, e.g. color_val); a
                              held-out caption that also occurs in training is left out
  --bucket-window <n>         form batches from windows of n batches' worth of rows sorted by
                              token length: less padding, faster steps, but batches of alike
                              prompts (default ${DEFAULT_BUCKET_WINDOW}: plain shuffled batches,
                              which learned more per step here; see the README's Speed section)
  --prompt-mode <mode>        ${
    QWEN_PROMPT_MODES.join(" or ")
  }: wrap each caption in the chat template, or
                              not (default chat; saved with the adapter)
  --max-tokens <n>            cut prompts to n tokens (default ${QWEN_DEFAULT_MAX_TOKENS}; saved with the adapter)

Batches and schedule:
  --batch-size <n>            samples per optimizer step (default ${DEFAULT_BATCH_SIZE})
  --micro-batch <n>           samples per forward/backward pass: each step's batch is cut into
                              ceil(batch-size / n) micro-batches of nearly equal size and their
                              gradients accumulated (default: the whole batch at once)
  --grad-accum <k>            instead of --micro-batch: k micro-batches of --batch-size samples
                              per step (k x batch-size samples per step)
  --epochs <n>                passes over the training split (default 1); the last incomplete
                              batch of each epoch is dropped
  --max-steps <n>             stop after n optimizer steps (the schedule spans them)
  --lr-resampler <x>          peak learning rate of the resampler (default ${DEFAULT_LR.resampler})
  --lr-lora <x>               peak learning rate of the LoRA matrices (default ${DEFAULT_LR.lora})
  --weight-decay <x>          AdamW decoupled weight decay (default ${DEFAULT_WEIGHT_DECAY})
  --max-grad-norm <x>         clip the global gradient norm to x (default ${DEFAULT_MAX_GRAD_NORM})
  --warmup-ratio <x>          linear warm-up over this share of the steps, then cosine decay to
                              0.1 x the peak (default ${DEFAULT_WARMUP_RATIO})
  --seed <n>                  initialisation, data order and dropout (default 0)

LoRA and resampler:
  --lora-r <n>                LoRA rank (default ${DEFAULT_LORA_CONFIG.r})
  --lora-alpha <x>            LoRA alpha; scaling = alpha / r (default ${DEFAULT_LORA_CONFIG.alpha})
  --lora-dropout <x>          dropout on the LoRA input while training (default ${DEFAULT_LORA_CONFIG.dropout})
  --lora-targets <list>       comma-separated decoder linears to adapt (default
                              ${DEFAULT_LORA_CONFIG.targetModules.join(",")}; any of
                              ${Object.keys(QWEN3_LINEARS).join(",")})
  --resampler-dim <n>         width of the latents (default ${RESAMPLER_DEFAULTS.dim})
  --resampler-depth <n>       cross-attention blocks (default ${RESAMPLER_DEFAULTS.depth})
  --resampler-heads <n>       attention heads (default ${RESAMPLER_DEFAULTS.heads})
  --resampler-dim-head <n>    features per head (default ${RESAMPLER_DEFAULTS.dimHead})
  --resampler-ff-mult <n>     feed-forward width multiplier (default ${RESAMPLER_DEFAULTS.ffMult})
                              (the output shapes come from the cache: 77 x 2048 and 1280 for SDXL)
  --no-mean-start             start the resampler's outputs from its random initialisation
                              instead of from the mean training target (default: a per-token
                              output offset, seq_bias, starts at the per-position mean, the pooled
                              bias at the pooled mean, and both output projections at 0; see
                              the README's learning section for why)
  --resampler-positions <n>   learned absolute positions for up to n student tokens, added to the
                              projected states the latents attend to (default 0: none; n must be
                              at least --max-tokens)

Evaluation, checkpoints, memory:
  --eval-every <n>            held-out evaluation every n steps, besides before the first and
                              after the last (default ${DEFAULT_EVAL_EVERY}; 0: only those two)
  --eval-rows <n>             evaluate on the first n held-out captions (default ${DEFAULT_EVAL_ROWS}; 0: all)
  --checkpoint-every <n>      checkpoint every n steps and after the last (default ${DEFAULT_CHECKPOINT_EVERY};
                              0: only after the last)
  --keep-checkpoints <n>      keep the newest n checkpoints (default ${DEFAULT_KEEP_CHECKPOINTS})
  --gradient-checkpointing    recompute each decoder layer's activations in the backward pass
  --no-gradient-checkpointing keep them (default: on for models with more than
                              ${
    CHECKPOINTING_MIN_LAYERS - 1
  } layers; saves memory, costs one more forward pass)
  --resume                    continue from <out>/checkpoints/latest.json with the same options
                              (starts from step 0 when there is no checkpoint yet)

Weights & Biases (live; metrics.jsonl stays the full record, see 'deno task wandb-sync'):
${WANDB_FLAGS_HELP}

  -h, --help                  show this help

A resumed run takes exactly the steps the uninterrupted run would have taken (same data
order, dropout and arithmetic), so kill it at any time (Ctrl-C, SIGKILL, power loss) and run
the same command with --resume. Resuming with another cache, or with settings that change the
trajectory (batch, learning rates, seed, LoRA, resampler, prompt...), is refused; evaluation and
checkpoint options may change.

Example (Qwen3-4B):
  deno task train --cache cache/sdxl-coco --qwen models/Qwen3-4B --out runs/qwen3-4b-coco \\
    --batch-size 16 --micro-batch 4 --epochs 2 --eval-every 500 --checkpoint-every 1000
  then, after an interruption, the same command with --resume.

Permissions: the 'train' task may read any file, write only under ./runs and reach no network.
'train:wandb' adds WANDB_API_KEY, WANDB_BASE_URL and the host api.wandb.ai (see the README for
a self-hosted server).
To write elsewhere, widen the write permission to that folder alone:
  deno run --allow-read --allow-write=<out> --allow-env=DISTILL_DEBUG,DENO_WEBGPU_BACKEND \\
    scripts/train.ts --out <out> ...`;

export const TRAIN_OPTIONS = {
  cache: { type: "string" },
  qwen: { type: "string" },
  out: { type: "string" },
  "held-out": { type: "string" },
  "held-out-files": { type: "string" },
  "bucket-window": { type: "string" },
  "prompt-mode": { type: "string" },
  "max-tokens": { type: "string" },
  "batch-size": { type: "string" },
  "micro-batch": { type: "string" },
  "grad-accum": { type: "string" },
  epochs: { type: "string" },
  "max-steps": { type: "string" },
  "lr-resampler": { type: "string" },
  "lr-lora": { type: "string" },
  "weight-decay": { type: "string" },
  "max-grad-norm": { type: "string" },
  "warmup-ratio": { type: "string" },
  seed: { type: "string" },
  "lora-r": { type: "string" },
  "lora-alpha": { type: "string" },
  "lora-dropout": { type: "string" },
  "lora-targets": { type: "string" },
  "resampler-dim": { type: "string" },
  "resampler-depth": { type: "string" },
  "resampler-heads": { type: "string" },
  "resampler-dim-head": { type: "string" },
  "resampler-ff-mult": { type: "string" },
  "no-mean-start": { type: "boolean" },
  "resampler-positions": { type: "string" },
  "eval-every": { type: "string" },
  "eval-rows": { type: "string" },
  "checkpoint-every": { type: "string" },
  "keep-checkpoints": { type: "string" },
  "gradient-checkpointing": { type: "boolean" },
  "no-gradient-checkpointing": { type: "boolean" },
  resume: { type: "boolean" },
  ...WANDB_OPTIONS,
} as const;

function integer(flag: string, value: string | undefined, min: number): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < min) {
    throw new UsageError(`train: --${flag} ${JSON.stringify(value)} is not an integer >= ${min}`);
  }
  return n;
}

function number(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n)) {
    throw new UsageError(`train: --${flag} ${JSON.stringify(value)} is not a number`);
  }
  return n;
}

/** One progress line: step of total, loss, throughput and the time left. */
export function trainProgressLine(p: TrainProgress): string {
  const percent = (100 * p.step / p.totalSteps).toFixed(1);
  return `train: step ${p.step}/${p.totalSteps} (${percent}%), epoch ${p.epoch + 1}/${p.epochs}, ` +
    `loss ${p.loss.toPrecision(4)} (seq ${p.lossSeq.toPrecision(4)}, pooled ` +
    `${p.lossPooled.toPrecision(4)}), lr ${p.lr.resampler.toExponential(2)}, ` +
    `${p.samplesPerSecond.toFixed(1)} samples/s, ETA ${formatDuration(p.etaSeconds)}`;
}

/**
 * The flag that sets each `TrainOptions` field (dotted for nested ones), so that errors the
 * trainer words for library callers name what a CLI user typed.
 */
const FLAG_OF_FIELD: Record<string, string> = {
  heldOutFraction: "--held-out",
  heldOutFiles: "--held-out-files",
  bucketWindow: "--bucket-window",
  batchSize: "--batch-size",
  microBatch: "--micro-batch",
  gradAccum: "--grad-accum",
  epochs: "--epochs",
  maxSteps: "--max-steps",
  "lr.resampler": "--lr-resampler",
  "lr.lora": "--lr-lora",
  weightDecay: "--weight-decay",
  maxGradNorm: "--max-grad-norm",
  warmupRatio: "--warmup-ratio",
  seed: "--seed",
  "lora.r": "--lora-r",
  "lora.alpha": "--lora-alpha",
  "lora.dropout": "--lora-dropout",
  "lora.targetModules": "--lora-targets",
  "resampler.dim": "--resampler-dim",
  "resampler.depth": "--resampler-depth",
  "resampler.heads": "--resampler-heads",
  "resampler.dimHead": "--resampler-dim-head",
  "resampler.ffMult": "--resampler-ff-mult",
  "resampler.numPositions": "--resampler-positions",
  "resampler.seqBias": "--no-mean-start",
  "prompt.mode": "--prompt-mode",
  "prompt.maxTokens": "--max-tokens",
  evalEvery: "--eval-every",
  evalRows: "--eval-rows",
  checkpointEvery: "--checkpoint-every",
  keepCheckpoints: "--keep-checkpoints",
};

const FIELD_NAMES = new RegExp(
  `(?<![\\w.-])(${
    Object.keys(FLAG_OF_FIELD).sort((a, b) => b.length - a.length).map((f) => f.replace(".", "\\."))
      .join("|")
  })(?![\\w.])`,
  "g",
);

/** `message` with each option field name replaced by its flag. */
export function withFlagNames(message: string): string {
  return message.replace(FIELD_NAMES, (field) => FLAG_OF_FIELD[field]);
}

/** The command line as `train` options (and W&B's); usage errors name the flag. */
export function parseTrainArgs(
  args: string[],
): (TrainOptions & { wandb?: WandbRunOptions }) | undefined {
  const { values: v } = parseCommandArgs("train", args, TRAIN_OPTIONS);
  if (v.help) return undefined;
  for (const flag of ["cache", "qwen", "out"] as const) {
    if (!v[flag]) throw new UsageError(`train: --${flag} <folder> is required`);
  }
  if (v["gradient-checkpointing"] && v["no-gradient-checkpointing"]) {
    throw new UsageError(
      "train: give --gradient-checkpointing or --no-gradient-checkpointing, not both",
    );
  }
  const mode = v["prompt-mode"];
  if (mode !== undefined && !QWEN_PROMPT_MODES.includes(mode as QwenPromptMode)) {
    throw new UsageError(
      `train: --prompt-mode ${JSON.stringify(mode)}: expected ${QWEN_PROMPT_MODES.join(" or ")}`,
    );
  }
  const wandb = wandbRunOptions("train", v);
  const lrResampler = number("lr-resampler", v["lr-resampler"]);
  const lrLora = number("lr-lora", v["lr-lora"]);
  return {
    cache: v.cache!,
    qwen: v.qwen!,
    out: v.out!,
    heldOutFraction: number("held-out", v["held-out"]),
    heldOutFiles: v["held-out-files"]?.split(",").map((f) => f.trim()).filter(Boolean),
    bucketWindow: integer("bucket-window", v["bucket-window"], 1),
    batchSize: integer("batch-size", v["batch-size"], 1),
    microBatch: integer("micro-batch", v["micro-batch"], 1),
    gradAccum: integer("grad-accum", v["grad-accum"], 1),
    epochs: integer("epochs", v.epochs, 1),
    maxSteps: integer("max-steps", v["max-steps"], 1),
    lr: {
      resampler: lrResampler ?? DEFAULT_LR.resampler,
      lora: lrLora ?? DEFAULT_LR.lora,
    },
    weightDecay: number("weight-decay", v["weight-decay"]),
    maxGradNorm: number("max-grad-norm", v["max-grad-norm"]),
    warmupRatio: number("warmup-ratio", v["warmup-ratio"]),
    seed: integer("seed", v.seed, 0),
    lora: {
      r: integer("lora-r", v["lora-r"], 1) ?? DEFAULT_LORA_CONFIG.r,
      alpha: number("lora-alpha", v["lora-alpha"]) ?? DEFAULT_LORA_CONFIG.alpha,
      dropout: number("lora-dropout", v["lora-dropout"]) ?? DEFAULT_LORA_CONFIG.dropout,
      targetModules: v["lora-targets"] === undefined
        ? [...DEFAULT_LORA_CONFIG.targetModules]
        : v["lora-targets"].split(",").map((t) => t.trim()) as LinearName[],
    },
    resampler: {
      dim: integer("resampler-dim", v["resampler-dim"], 1),
      depth: integer("resampler-depth", v["resampler-depth"], 1),
      heads: integer("resampler-heads", v["resampler-heads"], 1),
      dimHead: integer("resampler-dim-head", v["resampler-dim-head"], 1),
      ffMult: integer("resampler-ff-mult", v["resampler-ff-mult"], 1),
      numPositions: integer("resampler-positions", v["resampler-positions"], 0),
      seqBias: !v["no-mean-start"],
    },
    prompt: {
      mode: mode as QwenPromptMode | undefined,
      maxTokens: integer("max-tokens", v["max-tokens"], 1),
    },
    evalEvery: integer("eval-every", v["eval-every"], 0),
    evalRows: integer("eval-rows", v["eval-rows"], 0),
    checkpointEvery: integer("checkpoint-every", v["checkpoint-every"], 0),
    keepCheckpoints: integer("keep-checkpoints", v["keep-checkpoints"], 1),
    gradientCheckpointing: v["gradient-checkpointing"]
      ? true
      : v["no-gradient-checkpointing"]
      ? false
      : undefined,
    resume: v.resume ?? false,
    ...(wandb ? { wandb } : {}),
  };
}

export const trainCommand: Command = {
  name: "train",
  summary: "train the student (LoRA + resampler) on a target cache (resumable)",
  async run(args) {
    const parsed = parseTrainArgs(args);
    if (!parsed) return console.log(TRAIN_HELP);
    const { wandb: wandbRun, ...options } = parsed;
    try {
      resolveTrainConfig(options);
    } catch (error) {
      throw new UsageError(`train: ${withFlagNames((error as Error).message)}`);
    }
    const due = progressThrottle();
    const wandb = wandbRun && await startWandbTracking(options.out, wandbRun, !!options.resume);
    let exitCode = 1;
    try {
      await train(options, {
        onProgress(progress) {
          // The last step's line is always shown: the run ends on it.
          if (due(progress.step >= progress.totalSteps)) console.error(trainProgressLine(progress));
        },
        onMetrics: wandb ? (record) => wandb.record(record) : undefined,
      });
      exitCode = 0;
    } catch (error) {
      if (error instanceof Error) error.message = withFlagNames(error.message);
      throw explainPermission(error, TRAIN_TASK);
    } finally {
      await wandb?.finish(exitCode);
    }
  },
};
