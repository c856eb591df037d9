/**
 * Training-run tracking: one JSON record per line in `<runDir>/metrics.jsonl` (a `run` record
 * with the config, then a `step` record per optimizer step and an `eval` record per held-out
 * evaluation). src/train/report.ts turns the file into an HTML report.
 *
 * Each record goes out in a single write of its whole line, unbuffered, so a crash loses at most
 * the line being written; `readMetrics` drops such a torn last line. Non-finite numbers (a
 * diverged loss) are kept as the strings "NaN", "Infinity" and "-Infinity", since JSON has no
 * literal for them, and read back as numbers.
 *
 * Live W&B tracking (src/train/wandb.ts) takes each record as it is written, through
 * `MetricsLogOptions.onRecord`, and sends the same records afterwards (`deno task wandb-sync`).
 */
import { join } from "node:path";
import { writeAll, writeFileAtomic } from "../io/atomic.ts";
import { ioErrorAt } from "../io/output_path.ts";

export const METRICS_FILE = "metrics.jsonl";

/** First record of a run: what it was started with. */
export interface RunRecord {
  /** Record kind. */
  type: "run";
  /** ISO 8601 start time. */
  time: string;
  /** The run's settings, the cache's identity and the sizes of what it trains. */
  config: Record<string, unknown>;
}

/** Per-group values: the two AdamW parameter groups (docs/numerics.md §5). */
export interface GroupValues {
  /** The resampler's parameters. */
  resampler: number;
  /** The LoRA matrices. */
  lora: number;
}

/** One optimizer step. Losses are the step's mean over its micro-batches. */
export interface StepRecord {
  /** Record kind. */
  type: "step";
  /** Optimizer steps done, this one included (1-based). */
  step: number;
  /** 0-based epoch of this step. */
  epoch: number;
  /** Training samples seen so far, this step's included. */
  samples: number;
  /** `loss_seq + loss_pooled`. */
  loss: number;
  /** Mean squared error of the sequence output. */
  loss_seq: number;
  /** Mean squared error of the pooled output. */
  loss_pooled: number;
  /** Learning rates this step used. */
  lr: GroupValues;
  /** Pre-clip global L2 norms (docs/numerics.md §5), overall and per group. */
  grad_norm: GroupValues & { total: number };
  /** The factor the gradients were scaled by: 1 when not clipped. */
  clip_coef: number;
  /**
   * Share of the step's token positions that were padding (its micro-batches together);
   * absent in files written before batches were bucketed by length.
   */
  padding?: number;
  /** Training samples per second over this session's steps. */
  samples_per_s: number;
  /** Training wall time so far, in seconds. */
  elapsed_s: number;
}

/**
 * One held-out evaluation, after optimizer step `step`, beside the references of
 * src/train/evaluation.ts. Fields after `cos_pooled` are absent in logs of older versions.
 */
export interface EvalRecord {
  /** Record kind. */
  type: "eval";
  /** Optimizer steps done when it ran (0: before training). */
  step: number;
  /** `heldout_loss_seq + heldout_loss_pooled`. */
  heldout_loss: number;
  /** Sequence MSE on the held-out rows. */
  heldout_loss_seq: number;
  /** Pooled MSE on the held-out rows. */
  heldout_loss_pooled: number;
  /** Mean over tokens of the cosine similarity to the teacher's sequence embedding. */
  cos_seq: number;
  /** Cosine similarity to the teacher's pooled embedding. */
  cos_pooled: number;
  /** The mean predictor's sequence MSE on the same rows. */
  mean_loss_seq?: number;
  /** The mean predictor's pooled MSE on the same rows. */
  mean_loss_pooled?: number;
  /** 1 - sequence MSE / the mean predictor's. */
  r2_seq?: number;
  /** 1 - pooled MSE / the mean predictor's. */
  r2_pooled?: number;
  /** Cosine after subtracting the mean target, sequence flattened. */
  ccos_seq?: number;
  /** Cosine after subtracting the mean target, pooled. */
  ccos_pooled?: number;
  /** Own target ranked first among the held-out rows, sequence; null below 2 rows. */
  top1_seq?: number | null;
  /** Own target in the first 5, sequence; null below 2 rows. */
  top5_seq?: number | null;
  /** Own target ranked first, pooled; null below 2 rows. */
  top1_pooled?: number | null;
  /** Own target in the first 5, pooled; null below 2 rows. */
  top5_pooled?: number | null;
  /** Top-1 by chance; null below 2 rows. */
  chance_top1?: number | null;
  /** Top-5 by chance; null below 2 rows. */
  chance_top5?: number | null;
  /** Standard deviation across prompts of the sequence output over the teacher's. */
  spread_seq?: number;
  /** The same for the pooled output. */
  spread_pooled?: number;
  /** R² of the word-neighbour reference, sequence. */
  nn_r2_seq?: number;
  /** R² of the word-neighbour reference, pooled. */
  nn_r2_pooled?: number;
  /** Top-1 retrieval of the word-neighbour reference, sequence. */
  nn_top1_seq?: number | null;
  /** Top-1 retrieval of the word-neighbour reference, pooled. */
  nn_top1_pooled?: number | null;
  /** Per slice: rows, r2_seq, r2_pooled, top1_seq, top1_pooled. */
  slices?: Record<string, Record<string, number | null>>;
}

/** A line of metrics.jsonl. */
export type MetricsRecord = RunRecord | StepRecord | EvalRecord;

const NON_FINITE = new Set(["NaN", "Infinity", "-Infinity"]);

/** One record as its line: JSON, with non-finite numbers as strings, and the newline. */
export function formatMetricsLine(record: MetricsRecord): string {
  return JSON.stringify(
    record,
    (_key, value) => typeof value === "number" && !Number.isFinite(value) ? String(value) : value,
  ) + "\n";
}

function reviveNonFinite(value: unknown): unknown {
  if (typeof value === "string" && NON_FINITE.has(value)) return Number(value);
  if (value === null || typeof value !== "object") return value;
  for (const [key, inner] of Object.entries(value)) {
    (value as Record<string, unknown>)[key] = reviveNonFinite(inner);
  }
  return value;
}

/** Parses one line; `where` names it in errors. */
function parseMetricsLine(line: string, where: string): MetricsRecord {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch (err) {
    throw new Error(`${where}: not JSON (${(err as Error).message}); the log is corrupt`);
  }
  const type = (value as { type?: unknown } | null)?.type;
  if (type === "run") return value as RunRecord;
  if (type !== "step" && type !== "eval") {
    throw new Error(
      `${where}: "type" is ${JSON.stringify(type)}; expected "run", "step" or "eval"`,
    );
  }
  const record = reviveNonFinite(value) as StepRecord | EvalRecord;
  if (typeof record.step !== "number") {
    throw new Error(`${where}: a "${type}" record without a numeric "step"`);
  }
  return record;
}

/**
 * Parses the text of a metrics log. A last line without its newline is a write cut short by a
 * crash: kept if it parses, dropped if not. Any other bad line is an error.
 */
export function parseMetrics(text: string, source = METRICS_FILE): MetricsRecord[] {
  const lines = text.split("\n");
  const torn = lines.pop()!; // "" when the text ends with a newline
  const records: MetricsRecord[] = [];
  lines.forEach((line, i) => {
    if (line.trim() !== "") records.push(parseMetricsLine(line, `${source} line ${i + 1}`));
  });
  if (torn.trim() !== "") {
    try {
      records.push(parseMetricsLine(torn, `${source} line ${lines.length + 1}`));
    } catch {
      // The torn line is lost, as promised: nothing after it was written.
    }
  }
  return records;
}

/** Reads `<runDir>/metrics.jsonl`; an absent log reads as no records. */
export async function readMetrics(runDir: string): Promise<MetricsRecord[]> {
  const path = join(runDir, METRICS_FILE);
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return [];
    throw err;
  }
  return parseMetrics(text, path);
}

export interface MetricsLogOptions {
  /**
   * Continue a run from the checkpoint of this step: records after it are dropped, so the log
   * reads as if the run had never stopped. Without it, the run is new.
   */
  resumeFromStep?: number;
  /** For a new run, replace an existing log instead of refusing to. */
  overwrite?: boolean;
  /** Gets every record after its line is written (e.g. to mirror it to W&B); must not throw. */
  onRecord?: (record: MetricsRecord) => void;
}

/** The append-only metrics log of one run. */
export class MetricsLog {
  private constructor(
    readonly path: string,
    private readonly file: Deno.FsFile,
    /** The last step record's step after opening (resume), or undefined if none. */
    readonly lastStep: number | undefined,
    private readonly onRecord: ((record: MetricsRecord) => void) | undefined,
  ) {}

  /**
   * Opens `<runDir>/metrics.jsonl` for appending. A new run refuses an existing non-empty log
   * (unless `overwrite`); a resumed one is first cut back to `resumeFromStep`, by an atomic
   * rewrite so a crash meanwhile leaves the old log whole. The trainer should log a step's eval
   * before saving that step's checkpoint, so the cut keeps it.
   */
  static async open(runDir: string, options: MetricsLogOptions = {}): Promise<MetricsLog> {
    const path = join(runDir, METRICS_FILE);
    const { resumeFromStep, overwrite = false } = options;
    let lastStep: number | undefined;
    if (resumeFromStep === undefined) {
      const existing = await Deno.stat(path).catch((err) => {
        if (err instanceof Deno.errors.NotFound) return null;
        throw err;
      });
      if (existing && existing.size > 0 && !overwrite) {
        throw new Error(
          `${path} already has records: resume the run, or start the new one in another folder`,
        );
      }
      await writeFileAtomic(path, "");
    } else {
      if (!Number.isInteger(resumeFromStep) || resumeFromStep < 0) {
        throw new Error(
          `resumeFromStep ${resumeFromStep}: expected a step number (an integer >= 0)`,
        );
      }
      const kept = (await readMetrics(runDir)).filter((r) =>
        r.type === "run" || r.step <= resumeFromStep
      );
      for (const r of kept) if (r.type === "step") lastStep = r.step;
      await writeFileAtomic(path, kept.map(formatMetricsLine).join(""));
    }
    const file = await Deno.open(path, { append: true });
    return new MetricsLog(path, file, lastStep, options.onRecord);
  }

  /** Logs the start of a new run. */
  logRun(config: Record<string, unknown>, time = new Date()): Promise<void> {
    return this.append({ type: "run", time: time.toISOString(), config });
  }

  logStep(record: Omit<StepRecord, "type">): Promise<void> {
    return this.append({ type: "step", ...record });
  }

  logEval(record: Omit<EvalRecord, "type">): Promise<void> {
    return this.append({ type: "eval", ...record });
  }

  /**
   * Appends one line in one write call (see the module comment). Await it before the next. An
   * I/O error (disk full) names the log file.
   */
  private async append(record: MetricsRecord): Promise<void> {
    try {
      await writeAll(this.file, new TextEncoder().encode(formatMetricsLine(record)));
    } catch (error) {
      throw ioErrorAt(error, this.path);
    }
    this.onRecord?.(record);
  }

  close(): void {
    this.file.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
