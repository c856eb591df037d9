/**
 * Held-out evaluation against references that need no training, so a figure says whether the
 * student learned the prompt:
 *
 * - the **mean predictor**: the per-position mean of the training targets, the best output that
 *   ignores the prompt. `r2 = 1 - MSE_student / MSE_mean` is the share of the variance it leaves
 *   that the student explains; 0 is "ignores the prompt", below 0 is worse than that.
 * - the **neighbour reference**: for each held-out caption, the mean target of the
 *   `NEIGHBOURS` training captions that share the most words: what looking up similar prompts
 *   gives, with no model at all.
 *
 * Beside MSE and R²: cosine after subtracting the mean (a raw cosine is high for the mean
 * itself), retrieval (rank the row's own teacher target among all held-out targets by centered
 * cosine to the output; top-1 and top-5 with chance beside them), the spread of the outputs
 * across prompts over the teacher's, and the same per slice (source file such as a
 * T2I-CompBench category, prompts with negation, prompts over 77 CLIP tokens).
 */
import { basename } from "node:path";
import type { TargetCache } from "../data/target_cache.ts";
import { CLIP_TOKENIZER_DIR, loadClipTokenizer } from "../text/clip_tokenizer.ts";
import type { EvalRecord } from "./metrics.ts";

/** Training rows the means and the neighbour reference are taken from, at most. */
export const REFERENCE_POOL_ROWS = 8192;
/** Training captions averaged by the neighbour reference. */
export const NEIGHBOURS = 8;
/** Rows read per batch while accumulating the means. */
const READ_CHUNK = 64;

/** Figures of one predictor on some held-out rows. */
export interface HeldOutFigures {
  /** Held-out rows scored. */
  rows: number;
  /** Mean squared error of the sequence output over every element. */
  mseSeq: number;
  /** Mean squared error of the pooled output over every element. */
  msePooled: number;
  /** 1 - MSE / the mean predictor's MSE on the same rows, sequence output. */
  r2Seq: number;
  /** 1 - MSE / the mean predictor's MSE on the same rows, pooled output. */
  r2Pooled: number;
  /** Mean over rows of the cosine of (output - mean) and (teacher - mean), seq flattened. */
  centeredCosSeq: number;
  /** The same for the pooled output. */
  centeredCosPooled: number;
  /** Share of rows whose own teacher target ranks first among all held-out ones (seq); null below 2 rows. */
  top1Seq: number | null;
  /** Share ranking it in the first 5 (seq); null below 2 rows. */
  top5Seq: number | null;
  /** `top1Seq` for the pooled output. */
  top1Pooled: number | null;
  /** `top5Seq` for the pooled output. */
  top5Pooled: number | null;
  /** Standard deviation across prompts of the sequence outputs over the teacher's. */
  spreadSeq: number;
  /** The same for the pooled output. */
  spreadPooled: number;
}

/** A held-out evaluation: the student's figures, the references' and the chance levels. */
export interface HeldOutReport {
  /** The student's figures. */
  student: HeldOutFigures;
  /** The mean predictor's sequence MSE on the same rows (its R² is 0 by definition). */
  meanMseSeq: number;
  /** The mean predictor's pooled MSE on the same rows. */
  meanMsePooled: number;
  /** The word-neighbour reference's figures. */
  neighbours: HeldOutFigures;
  /** Top-1 retrieval by chance among these rows; null below 2 rows. */
  chanceTop1: number | null;
  /** Top-5 retrieval by chance; null below 2 rows. */
  chanceTop5: number | null;
  /** The student's figures per slice with at least 2 rows. */
  slices: Record<string, HeldOutFigures>;
}

/** Outputs (or targets) of some rows, row-major: seq [n, seqLen * seqDim], pooled [n, pooledDim]. */
export interface Predictions {
  seq: Float32Array;
  pooled: Float32Array;
}

/** Lower-case words of a caption, for the neighbour reference. */
export function captionWords(caption: string): Set<string> {
  return new Set(caption.toLowerCase().match(/[\p{L}\p{N}]+/gu) ?? []);
}

/** The caption file of a row id, without folder and extension (`dir/name.txt:12` -> `name`). */
export function captionFileStem(id: string): string {
  const file = id.includes(":") ? id.slice(0, id.lastIndexOf(":")) : id;
  return basename(file).replace(/\.[^.]*$/, "");
}

const NEGATION = /\b(no|not|without|never|none|nobody|nothing|neither|nor)\b|n't\b/i;

/**
 * Slices a held-out row belongs to: `file:<name>` for the caption file it came from (its id's
 * file part without extension and a trailing _train/_val/_test split, e.g. T2I-CompBench's
 * `file:color`), `negation`, and `long` (more than 77 CLIP tokens).
 */
export function sliceNames(id: string, caption: string, clipTruncated: boolean): string[] {
  const names: string[] = [];
  if (id.includes(":")) {
    names.push(`file:${captionFileStem(id).replace(/_(train|val|test)(_.*)?$/, "")}`);
  }
  if (NEGATION.test(caption)) names.push("negation");
  if (clipTruncated) names.push("long");
  return names;
}

/**
 * Indices of the `k` pool captions that share the most words with `words` (ties: the higher
 * share of their own words, then the earlier row), from an inverted index word -> pool indices.
 */
function nearestByWords(
  words: Set<string>,
  index: Map<string, number[]>,
  poolWords: readonly Set<string>[],
  k: number,
): number[] {
  const shared = new Map<number, number>();
  for (const word of words) {
    for (const i of index.get(word) ?? []) shared.set(i, (shared.get(i) ?? 0) + 1);
  }
  const score = (i: number) =>
    (shared.get(i) ?? 0) + (shared.get(i) ?? 0) / (poolWords[i].size + 1);
  const candidates = [...shared.keys()];
  // Too few overlapping captions: fill with the first pool rows (they score 0).
  for (let i = 0; candidates.length < k && i < poolWords.length; i++) {
    if (!shared.has(i)) candidates.push(i);
  }
  return candidates.sort((a, b) => score(b) - score(a) || a - b).slice(0, k);
}

/** The training rows the references read: all, or `REFERENCE_POOL_ROWS` evenly spaced. */
export function referencePool(train: readonly number[]): number[] {
  if (train.length === 0) throw new Error(`the references need training rows; there are none`);
  const limit = REFERENCE_POOL_ROWS;
  if (train.length <= limit) return [...train];
  return Array.from({ length: limit }, (_, i) => train[Math.floor(i * train.length / limit)]);
}

/** rows x width as a [rows][width] scan: Σ per column, in f64. */
function addColumns(sum: Float64Array, data: Float32Array, rows: number): void {
  const width = sum.length;
  for (let r = 0; r < rows; r++) {
    const row = data.subarray(r * width, (r + 1) * width);
    for (let j = 0; j < width; j++) sum[j] += row[j];
  }
}

/** Per held-out row, for one part (seq or pooled): what every figure is aggregated from. */
interface RowStats {
  /** The outputs minus the mean target, row-major. */
  centered: Float32Array;
  /** Squared error of each row against its teacher target. */
  sq: Float64Array;
  /** Centered cosine of each row's output to its teacher target. */
  cos: Float64Array;
  /** How many other rows' teacher targets score at least as high as the row's own. */
  rank: Int32Array;
}

/**
 * The per-row statistics of `outputs` (every held-out row, in order) for one part, against the
 * centered teacher rows. Retrieval scores each output against every target once; subsets
 * (slices) aggregate these rows rather than scoring again.
 */
function rowStats(
  outputs: Float32Array,
  teacherCentered: Float32Array,
  teacherNorms: Float64Array,
  mean: Float32Array,
): RowStats {
  const width = mean.length;
  const n = teacherNorms.length;
  const centered = new Float32Array(n * width);
  const norms = new Float64Array(n);
  const sq = new Float64Array(n);
  const cos = new Float64Array(n);
  for (let r = 0; r < n; r++) {
    const out = outputs.subarray(r * width, (r + 1) * width);
    const teacher = teacherCentered.subarray(r * width, (r + 1) * width);
    const c = centered.subarray(r * width, (r + 1) * width);
    let dot = 0;
    let norm = 0;
    let err = 0;
    for (let j = 0; j < width; j++) {
      const v = out[j] - mean[j];
      c[j] = v;
      err += (v - teacher[j]) ** 2;
      dot += v * teacher[j];
      norm += v * v;
    }
    norms[r] = Math.sqrt(norm);
    sq[r] = err;
    cos[r] = dot / Math.max(norms[r] * teacherNorms[r], 1e-12);
  }
  const rank = new Int32Array(n);
  const scores = new Float64Array(n);
  for (let r = 0; r < n; r++) {
    const c = centered.subarray(r * width, (r + 1) * width);
    for (let j = 0; j < n; j++) {
      const t = teacherCentered.subarray(j * width, (j + 1) * width);
      let dot = 0;
      for (let k = 0; k < width; k++) dot += c[k] * t[k];
      scores[j] = dot / Math.max(norms[r] * teacherNorms[j], 1e-12);
    }
    for (let j = 0; j < n; j++) if (j !== r && scores[j] >= scores[r]) rank[r]++;
  }
  return { centered, sq, cos, rank };
}

/** Variance across `rows` of row-major data, summed over features. */
function totalVariance(data: Float32Array, width: number, rows: readonly number[]): number {
  const sum = new Float64Array(width);
  const sumSq = new Float64Array(width);
  for (const r of rows) {
    const row = data.subarray(r * width, (r + 1) * width);
    for (let j = 0; j < width; j++) {
      sum[j] += row[j];
      sumSq[j] += row[j] * row[j];
    }
  }
  let v = 0;
  for (let j = 0; j < width; j++) v += sumSq[j] / rows.length - (sum[j] / rows.length) ** 2;
  return Math.max(v, 0);
}

/** Per-element mean of the targets of `rows` (seq [seqLen * seqDim], pooled), summed in f64. */
export async function targetMeans(
  cache: TargetCache,
  rows: readonly number[],
): Promise<Predictions> {
  const seqSum = new Float64Array(cache.seqLen * cache.seqDim);
  const pooledSum = new Float64Array(cache.pooledDim);
  for (let start = 0; start < rows.length; start += READ_CHUNK) {
    const chunk = rows.slice(start, start + READ_CHUNK);
    const targets = await cache.readRows(chunk);
    addColumns(seqSum, targets.seq, chunk.length);
    addColumns(pooledSum, targets.pooled, chunk.length);
  }
  return {
    seq: Float32Array.from(seqSum, (v) => v / rows.length),
    pooled: Float32Array.from(pooledSum, (v) => v / rows.length),
  };
}

/**
 * The held-out rows' targets, centered by the training mean, and the references, prepared once
 * per run; `report` then scores the student's outputs for those rows.
 */
export class HeldOutEvaluator {
  readonly rows: number;
  readonly mean: Predictions;
  readonly #teacher: Predictions;
  readonly #norms: { seq: Float64Array; pooled: Float64Array };
  readonly #meanSq: { seq: Float64Array; pooled: Float64Array };
  readonly #slices: Map<string, number[]>;
  #neighbours: HeldOutFigures | undefined;

  private constructor(
    mean: Predictions,
    teacher: Predictions,
    slices: Map<string, number[]>,
  ) {
    this.mean = mean;
    this.rows = teacher.pooled.length / mean.pooled.length;
    const parts = ["seq", "pooled"] as const;
    const norms = { seq: new Float64Array(this.rows), pooled: new Float64Array(this.rows) };
    const meanSq = { seq: new Float64Array(this.rows), pooled: new Float64Array(this.rows) };
    for (const part of parts) {
      const width = mean[part].length;
      for (let r = 0; r < this.rows; r++) {
        const row = teacher[part].subarray(r * width, (r + 1) * width);
        let sq = 0;
        for (let j = 0; j < width; j++) {
          row[j] -= mean[part][j];
          sq += row[j] * row[j];
        }
        norms[part][r] = Math.sqrt(sq);
        meanSq[part][r] = sq;
      }
    }
    this.#teacher = teacher;
    this.#norms = norms;
    this.#meanSq = meanSq;
    this.#slices = slices;
  }

  /**
   * Reads the held-out targets and scores the neighbour reference, which reads `NEIGHBOURS`
   * rows of `pool` (training rows, see `referencePool`) per held-out row; `mean` is
   * `targetMeans` of the pool.
   */
  static async create(
    cache: TargetCache,
    heldOut: readonly number[],
    pool: readonly number[],
    mean: Predictions,
  ): Promise<HeldOutEvaluator> {
    // The project's copy of SDXL's CLIP tokenizer counts CLIP tokens; a remote copy of the
    // package has no files to read, and then the `long` slice is left out.
    const clip = CLIP_TOKENIZER_DIR.protocol === "file:"
      ? await loadClipTokenizer(CLIP_TOKENIZER_DIR.pathname)
      : undefined;
    const slices = new Map<string, number[]>();
    heldOut.forEach((row, i) => {
      const caption = cache.captions[row];
      const long = clip?.encode(caption).truncated ?? false;
      for (const name of sliceNames(cache.ids[row], caption, long)) {
        const rows = slices.get(name);
        if (rows) rows.push(i);
        else slices.set(name, [i]);
      }
    });
    // One file holding every row says nothing beyond the whole.
    for (const [name, rows] of slices) {
      if (rows.length < 2 || (name.startsWith("file:") && rows.length === heldOut.length)) {
        slices.delete(name);
      }
    }
    const evaluator = new HeldOutEvaluator(mean, await cache.readRows(heldOut), slices);

    const poolWords = pool.map((row) => captionWords(cache.captions[row]));
    const index = new Map<string, number[]>();
    poolWords.forEach((words, i) => {
      for (const word of words) {
        const rows = index.get(word);
        if (rows) rows.push(i);
        else index.set(word, [i]);
      }
    });
    const guess: Predictions = {
      seq: new Float32Array(heldOut.length * mean.seq.length),
      pooled: new Float32Array(heldOut.length * cache.pooledDim),
    };
    for (let i = 0; i < heldOut.length; i++) {
      const near = nearestByWords(
        captionWords(cache.captions[heldOut[i]]),
        index,
        poolWords,
        NEIGHBOURS,
      );
      const targets = await cache.readRows(near.map((p) => pool[p]));
      for (const part of ["seq", "pooled"] as const) {
        const width = mean[part].length;
        const sum = new Float64Array(width);
        addColumns(sum, targets[part], near.length);
        guess[part].set(Float32Array.from(sum, (v) => v / near.length), i * width);
      }
    }
    evaluator.#neighbours = evaluator.figures(guess);
    return evaluator;
  }

  /**
   * The teacher targets of held-out rows [start, start + count), as the cache holds them (the
   * evaluator keeps them in memory, so an evaluation reads nothing from disk).
   */
  targets(start: number, count: number): Predictions {
    const part = (name: "seq" | "pooled") => {
      const width = this.mean[name].length;
      const out = this.#teacher[name].slice(start * width, (start + count) * width);
      for (let i = 0; i < out.length; i++) out[i] += this.mean[name][i % width];
      return out;
    };
    return { seq: part("seq"), pooled: part("pooled") };
  }

  /** Figures of `outputs` (every held-out row, in order) on the rows `subset` (default all). */
  figures(outputs: Predictions, subset?: readonly number[]): HeldOutFigures {
    return this.#aggregate(this.#rowStats(outputs), subset);
  }

  #rowStats(outputs: Predictions): Record<"seq" | "pooled", RowStats> {
    const part = (name: "seq" | "pooled") =>
      rowStats(outputs[name], this.#teacher[name], this.#norms[name], this.mean[name]);
    return { seq: part("seq"), pooled: part("pooled") };
  }

  #aggregate(
    stats: Record<"seq" | "pooled", RowStats>,
    subset?: readonly number[],
  ): HeldOutFigures {
    const rows = subset ?? Array.from({ length: this.rows }, (_, i) => i);
    const defined = this.rows >= 2;
    const part = (name: "seq" | "pooled") => {
      const st = stats[name];
      const width = this.mean[name].length;
      const total = (values: ArrayLike<number>) => rows.reduce((s, r) => s + values[r], 0);
      const share = (k: number) => rows.filter((r) => st.rank[r] < k).length / rows.length;
      return {
        mse: total(st.sq) / (rows.length * width),
        r2: 1 - total(st.sq) / total(this.#meanSq[name]),
        centeredCos: total(st.cos) / rows.length,
        top1: defined ? share(1) : null,
        top5: defined ? share(5) : null,
        spread: Math.sqrt(
          totalVariance(st.centered, width, rows) /
            Math.max(totalVariance(this.#teacher[name], width, rows), 1e-30),
        ),
      };
    };
    const seq = part("seq");
    const pooled = part("pooled");
    return {
      rows: rows.length,
      mseSeq: seq.mse,
      msePooled: pooled.mse,
      r2Seq: seq.r2,
      r2Pooled: pooled.r2,
      centeredCosSeq: seq.centeredCos,
      centeredCosPooled: pooled.centeredCos,
      top1Seq: seq.top1,
      top5Seq: seq.top5,
      top1Pooled: pooled.top1,
      top5Pooled: pooled.top5,
      spreadSeq: seq.spread,
      spreadPooled: pooled.spread,
    };
  }

  /** The student's outputs for every held-out row, in order, scored beside the references. */
  report(outputs: Predictions): HeldOutReport {
    const sum = (part: "seq" | "pooled") => this.#meanSq[part].reduce((s, v) => s + v, 0);
    const defined = this.rows >= 2;
    const stats = this.#rowStats(outputs);
    return {
      student: this.#aggregate(stats),
      meanMseSeq: sum("seq") / (this.rows * this.mean.seq.length),
      meanMsePooled: sum("pooled") / (this.rows * this.mean.pooled.length),
      neighbours: this.#neighbours!,
      chanceTop1: defined ? 1 / this.rows : null,
      chanceTop5: defined ? Math.min(5, this.rows) / this.rows : null,
      slices: Object.fromEntries(
        [...this.#slices].map(([name, rows]) => [name, this.#aggregate(stats, rows)]),
      ),
    };
  }
}

const fixed = (v: number | null) => v === null ? "not defined (fewer than 2 rows)" : v.toFixed(3);

/** Lines that set the student's held-out figures beside the references and chance. */
export function describeHeldOut(h: HeldOutReport): string[] {
  const s = h.student;
  const nn = h.neighbours;
  return [
    `held-out R² (1 - MSE / the mean predictor's MSE; 0 = ignores the prompt), ${s.rows} rows:`,
    `  seq    ${fixed(s.r2Seq)}  (MSE ${s.mseSeq.toPrecision(4)} vs the mean predictor's ` +
    `${h.meanMseSeq.toPrecision(4)}; word-neighbour reference ${fixed(nn.r2Seq)})`,
    `  pooled ${fixed(s.r2Pooled)}  (MSE ${s.msePooled.toPrecision(4)} vs the mean predictor's ` +
    `${h.meanMsePooled.toPrecision(4)}; word-neighbour reference ${fixed(nn.r2Pooled)})`,
    `held-out retrieval, own target ranked first among ${s.rows} (chance ${fixed(h.chanceTop1)}):`,
    `  seq    ${fixed(s.top1Seq)} (top-5 ${fixed(s.top5Seq)}; word neighbours ${
      fixed(nn.top1Seq)
    })`,
    `  pooled ${fixed(s.top1Pooled)} (top-5 ${fixed(s.top5Pooled)}; word neighbours ` +
    `${fixed(nn.top1Pooled)})`,
  ];
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
  /** Beside the references: R², centered cosine, retrieval, spread, slices (evaluation.ts). */
  heldOut?: HeldOutReport;
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

export function evalRecord(step: number, e: EvalResult): Omit<EvalRecord, "type"> {
  const record: Omit<EvalRecord, "type"> = {
    step,
    heldout_loss: e.loss,
    heldout_loss_seq: e.lossSeq,
    heldout_loss_pooled: e.lossPooled,
    cos_seq: e.cosSeq,
    cos_pooled: e.cosPooled,
  };
  const h = e.heldOut;
  if (!h) return record;
  const { student: f, neighbours: nn } = h;
  return {
    ...record,
    mean_loss_seq: h.meanMseSeq,
    mean_loss_pooled: h.meanMsePooled,
    r2_seq: f.r2Seq,
    r2_pooled: f.r2Pooled,
    ccos_seq: f.centeredCosSeq,
    ccos_pooled: f.centeredCosPooled,
    top1_seq: f.top1Seq,
    top5_seq: f.top5Seq,
    top1_pooled: f.top1Pooled,
    top5_pooled: f.top5Pooled,
    chance_top1: h.chanceTop1,
    chance_top5: h.chanceTop5,
    spread_seq: f.spreadSeq,
    spread_pooled: f.spreadPooled,
    nn_r2_seq: nn.r2Seq,
    nn_r2_pooled: nn.r2Pooled,
    nn_top1_seq: nn.top1Seq,
    nn_top1_pooled: nn.top1Pooled,
    slices: Object.fromEntries(
      Object.entries(h.slices).map(([name, x]) => [name, {
        rows: x.rows,
        r2_seq: x.r2Seq,
        r2_pooled: x.r2Pooled,
        top1_seq: x.top1Seq,
        top1_pooled: x.top1Pooled,
      }]),
    ),
  };
}
