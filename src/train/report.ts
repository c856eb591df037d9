/**
 * The HTML report of a training run: one self-contained file (inline CSS and SVG, no scripts,
 * fonts or links) with plots of the metrics log (src/train/metrics.ts), a summary table and the
 * run config. It follows the reader's light or dark colour scheme.
 *
 * Long runs are decimated to a min and max per pixel column, which keeps spikes visible.
 * Non-finite values (and non-positive ones on a log axis) are left out of the lines, which break
 * there, marked with a red cross along the top of the plot and counted under it.
 */
import { basename, join, resolve } from "node:path";
import { writeFileAtomic } from "../io/atomic.ts";
import { type EvalRecord, type MetricsRecord, readMetrics, type StepRecord } from "./metrics.ts";

export const REPORT_FILE = "report.html";

export interface ReportOptions {
  title: string;
  /** The run config to list; defaults to the log's `run` record. */
  config?: Record<string, unknown>;
}

type Point = readonly [number, number];

interface Series {
  name: string;
  points: readonly Point[];
  /** Draw each point as a dot (sparse series like evals); others get dots only when few. */
  dots?: boolean;
  /** Noisy per-step values: when many, drawn faint under their moving average. */
  smooth?: boolean;
  /** A reference (a predictor that needs no training, chance): dashed, without dots. */
  reference?: boolean;
  /** Palette slot, so a reference can share its series' colour (default: its index). */
  colour?: number;
}

interface ChartSpec {
  id: string;
  title: string;
  yLabel: string;
  series: Series[];
  /** "auto": log when every value is positive and the largest is 20 times the smallest or more. */
  yScale: "linear" | "auto";
  /** Shown instead of the plot when no series has a point. */
  empty: string;
}

// Chart geometry, in viewBox units (the SVG scales to its column).
const W = 560;
const H = 300;
const PLOT = { left: 64, right: W - 16, top: 40, bottom: H - 44 };
const PLOT_W = PLOT.right - PLOT.left;
const MAX_MARKS = 200;
const MAX_DOTS = 40;
const SMOOTH_MIN_POINTS = 100;
const MAX_LISTED_STEPS = 5;
/** Colours .s0 to .s4 in the style sheet. */
const PALETTE = 5;

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** Rounds away binary noise (0.30000000000000004) for display. */
function clean(v: number, digits = 6): number {
  return Number(v.toPrecision(digits));
}

/** A number for people: 4 significant digits, exponent form when very small or large. */
export function formatNumber(v: number, digits = 4): string {
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return "0";
  const c = clean(v, digits);
  const a = Math.abs(c);
  return a < 1e-3 || a >= 1e6 ? c.toExponential().replace("e+", "e") : String(c);
}

function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return String(seconds);
  if (seconds < 60) return `${clean(seconds, 3)} s`;
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n: number) => String(n).padStart(2, "0");
  return h > 0 ? `${h} h ${pad(m)} min ${pad(s % 60)} s` : `${m} min ${pad(s % 60)} s`;
}

interface Axis {
  lo: number;
  hi: number;
  log: boolean;
  ticks: number[];
}

/** 1, 2 or 5 times a power of ten, near `raw`. */
function niceStep(raw: number): number {
  const p = 10 ** Math.floor(Math.log10(raw));
  const m = raw / p;
  return (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p;
}

/**
 * A linear axis over [lo, hi] widened to whole ticks, at least `minStep` apart; a single value
 * gets room around it.
 */
function linearAxis(lo: number, hi: number, target = 5, minStep = 0): Axis {
  if (lo === hi) {
    const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  const step = Math.max(niceStep((hi - lo) / target), minStep);
  const first = Math.floor(lo / step);
  const last = Math.ceil(hi / step);
  const ticks = [];
  for (let i = first; i <= last; i++) ticks.push(clean(i * step, 12));
  return { lo: ticks[0], hi: ticks[ticks.length - 1], log: false, ticks };
}

/** A log axis over whole decades; with few decades, 2 and 5 times them are ticks too. */
function logAxis(lo: number, hi: number): Axis {
  const first = Math.floor(Math.log10(lo));
  const decades = Math.max(Math.ceil(Math.log10(hi)) - first, 1);
  const stride = Math.ceil(decades / 6);
  const last = first + stride * Math.ceil(decades / stride);
  const mantissas = decades <= 2 ? [1, 2, 5] : [1];
  const ticks = [];
  for (let e = first; e <= last; e += stride) {
    for (const m of mantissas) if (e < last || m === 1) ticks.push(clean(m * 10 ** e, 12));
  }
  return { lo: 10 ** first, hi: 10 ** last, log: true, ticks };
}

function position(axis: Axis, v: number, from: number, to: number): number {
  const t = axis.log
    ? (Math.log10(v) - Math.log10(axis.lo)) / (Math.log10(axis.hi) - Math.log10(axis.lo))
    : (v - axis.lo) / (axis.hi - axis.lo);
  return from + t * (to - from);
}

/**
 * Splits a series into runs of drawable points (lines break between runs) and the points left
 * out (non-finite, or non-positive on a log axis).
 */
function splitRuns(
  points: Series["points"],
  drawable: (y: number) => boolean,
): { runs: Point[][]; skipped: Point[] } {
  const runs: Point[][] = [];
  const skipped: Point[] = [];
  let run: Point[] = [];
  for (const p of points) {
    if (drawable(p[1])) {
      run.push(p);
    } else {
      skipped.push(p);
      if (run.length) runs.push(run);
      run = [];
    }
  }
  if (run.length) runs.push(run);
  return { runs, skipped };
}

/** Keeps the lowest and highest point of each pixel column, in x order. */
function decimate(
  run: Point[],
  column: (x: number) => number,
): Point[] {
  if (run.length <= 2 * PLOT_W) return run;
  const out: Point[] = [];
  let i = 0;
  while (i < run.length) {
    const c = Math.floor(column(run[i][0]));
    let lo = i;
    let hi = i;
    let j = i;
    for (; j < run.length && Math.floor(column(run[j][0])) === c; j++) {
      if (run[j][1] < run[lo][1]) lo = j;
      if (run[j][1] > run[hi][1]) hi = j;
    }
    out.push(run[Math.min(lo, hi)]);
    if (lo !== hi) out.push(run[Math.max(lo, hi)]);
    i = j;
  }
  return out;
}

function listSteps(steps: number[]): string {
  const shown = steps.slice(0, MAX_LISTED_STEPS).join(", ");
  return steps.length > MAX_LISTED_STEPS ? `${shown}, …` : shown;
}

function extent(values: number[]): [number, number] {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

function chooseYAxis(values: number[], scale: ChartSpec["yScale"]): Axis {
  const [lo, hi] = extent(values.filter(Number.isFinite));
  return scale === "auto" && lo > 0 && hi / lo >= 20 ? logAxis(lo, hi) : linearAxis(lo, hi);
}

/**
 * Exponential moving average over the drawable values, spanning about a fiftieth of the series;
 * the other points stay as they are, so the average breaks where the raw line does.
 */
function movingAverage(points: Series["points"], drawable: (y: number) => boolean) {
  const span = Math.max(2, Math.round(points.length / 50));
  const alpha = 2 / (span + 1);
  let average: number | undefined;
  const smoothed = points.map(([x, y]): Point => {
    if (!drawable(y)) return [x, y];
    average = average === undefined ? y : average + alpha * (y - average);
    return [x, average];
  });
  return { smoothed, span };
}

function svgText(x: number, y: number, text: string, attrs = ""): string {
  return `<text x="${x}" y="${y}" ${attrs}>${escapeHtml(text)}</text>`;
}

/**
 * One chart as a figure: the SVG plot and a caption that counts the points left out.
 * Each series keeps its colour by its place in `spec.series`, present or not.
 */
function renderChart(spec: ChartSpec): string {
  const all = spec.series.flatMap((s) => s.points);
  const heading = `<h3>${escapeHtml(spec.title)}</h3>`;
  if (!all.some((p) => Number.isFinite(p[1]))) {
    const svg = `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" ` +
      `aria-label="${escapeHtml(spec.title)}: ${escapeHtml(spec.empty)}">` +
      `<rect class="frame" x="${PLOT.left}" y="${PLOT.top}" width="${PLOT_W}" ` +
      `height="${PLOT.bottom - PLOT.top}"/>` +
      svgText(W / 2, (PLOT.top + PLOT.bottom) / 2, spec.empty, 'class="empty"') + `</svg>`;
    return `<figure id="${spec.id}">${heading}${svg}</figure>`;
  }
  const [xLo, xHi] = extent(all.map((p) => p[0]));
  // Steps are whole numbers: a lone step gets a step of room each side, and no fractional ticks.
  const xAxis = xLo === xHi ? linearAxis(xLo - 1, xHi + 1, 2) : linearAxis(xLo, xHi, 6, 1);
  const yAxis = chooseYAxis(all.map((p) => p[1]), spec.yScale);
  const px = (x: number) => position(xAxis, x, PLOT.left, PLOT.right);
  const py = (y: number) => position(yAxis, y, PLOT.bottom, PLOT.top);
  const drawable = (y: number) => Number.isFinite(y) && (!yAxis.log || y > 0);
  const path = (runs: Point[][]) =>
    runs.map((run) =>
      run.map(([x, y], k) => `${k === 0 ? "M" : "L"}${px(x).toFixed(1)} ${py(y).toFixed(1)}`)
        .join("")
    ).join("");

  const parts: string[] = [];
  parts.push(
    `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${escapeHtml(spec.title)}">`,
    `<defs><clipPath id="${spec.id}-clip"><rect x="${PLOT.left}" y="${PLOT.top - 2}" ` +
      `width="${PLOT_W}" height="${PLOT.bottom - PLOT.top + 4}"/></clipPath></defs>`,
  );
  for (const t of yAxis.ticks) {
    const y = py(t).toFixed(1);
    parts.push(
      `<line class="grid" x1="${PLOT.left}" x2="${PLOT.right}" y1="${y}" y2="${y}"/>`,
      svgText(PLOT.left - 6, Number(y) + 4, formatNumber(t, 3), 'class="tick" text-anchor="end"'),
    );
  }
  for (const t of xAxis.ticks) {
    const x = px(t).toFixed(1);
    parts.push(
      `<line class="grid" x1="${x}" x2="${x}" y1="${PLOT.top}" y2="${PLOT.bottom}"/>`,
      `<line class="axis" x1="${x}" x2="${x}" y1="${PLOT.bottom}" y2="${PLOT.bottom + 4}"/>`,
      svgText(Number(x), PLOT.bottom + 17, formatNumber(t), 'class="tick" text-anchor="middle"'),
    );
  }
  parts.push(
    `<rect class="frame" x="${PLOT.left}" y="${PLOT.top}" width="${PLOT_W}" ` +
      `height="${PLOT.bottom - PLOT.top}"/>`,
    svgText((PLOT.left + PLOT.right) / 2, H - 8, "step", 'class="label" text-anchor="middle"'),
    svgText(
      0,
      0,
      yAxis.log ? `${spec.yLabel} (log scale)` : spec.yLabel,
      `class="label" text-anchor="middle" transform="translate(14 ${
        (PLOT.top + PLOT.bottom) / 2
      }) rotate(-90)"`,
    ),
  );

  // Series, then the marks for left-out points, then the legend.
  const warnings: string[] = [];
  let smoothingSpan = 0;
  const marks = new Map<number, string[]>();
  const present = spec.series.map((series, i) => ({ series, i }))
    .filter(({ series }) => series.points.length > 0);
  for (const { series, i } of present) {
    const { runs, skipped } = splitRuns(series.points, drawable);
    const drawn = runs.map((run) => decimate(run, px));
    const count = drawn.reduce((n, run) => n + run.length, 0);
    const dense = series.smooth && count >= SMOOTH_MIN_POINTS;
    const kind = series.reference ? " ref" : series.dots ? " sparse" : "";
    parts.push(
      `<g class="s${(series.colour ?? i) % PALETTE}${kind}" clip-path="url(#${spec.id}-clip)">`,
    );
    if (dense) {
      const { smoothed, span } = movingAverage(series.points, drawable);
      smoothingSpan = Math.max(smoothingSpan, span);
      parts.push(
        `<path class="line raw" d="${path(drawn)}"/>`,
        `<path class="line" d="${
          path(splitRuns(smoothed, drawable).runs.map((run) => decimate(run, px)))
        }"/>`,
      );
    } else {
      parts.push(`<path class="line" d="${path(drawn)}"/>`);
    }
    if (!series.reference && (series.dots || count <= MAX_DOTS)) {
      for (const run of drawn) {
        for (const [x, y] of run) {
          parts.push(
            `<circle class="dot" cx="${px(x).toFixed(1)}" cy="${py(y).toFixed(1)}" r="3">` +
              `<title>${escapeHtml(`${series.name} @ step ${x}: ${formatNumber(y)}`)}</title>` +
              `</circle>`,
          );
        }
      }
    }
    parts.push(`</g>`);
    if (skipped.length) {
      const values = [...new Set(skipped.map((p) => formatNumber(p[1])))].join(", ");
      warnings.push(
        `${series.name}: ${skipped.length} value${skipped.length > 1 ? "s" : ""} left out ` +
          `(${values} at step ${listSteps(skipped.map((p) => p[0]))})`,
      );
      for (const [x, y] of skipped) {
        const column = Math.round(px(x));
        const entry = `${series.name} = ${formatNumber(y)} at step ${x}`;
        if (marks.has(column)) marks.get(column)!.push(entry);
        else if (marks.size < MAX_MARKS) marks.set(column, [entry]);
      }
    }
  }
  for (const [column, entries] of marks) {
    const y = PLOT.top + 6;
    parts.push(
      `<path class="skip" d="M${column - 4} ${y - 4}L${column + 4} ${y + 4}M${column - 4} ${
        y + 4
      }L${column + 4} ${y - 4}"><title>${escapeHtml(entries.join("\n"))}</title></path>`,
    );
  }
  // The legend: one row above the plot, or two when the entries do not fit in one.
  const widths = present.map(({ series }) => 36 + series.name.length * 6.6);
  const oneRow = widths.reduce((a, b) => a + b, 0) <= PLOT_W;
  let lx = PLOT.left;
  let ly = oneRow ? 18 : 10;
  present.forEach(({ series, i }, k) => {
    if (!oneRow && ly === 10 && lx + widths[k] > PLOT.right) [lx, ly] = [PLOT.left, 26];
    const kind = series.reference ? " ref" : "";
    parts.push(
      `<g class="s${(series.colour ?? i) % PALETTE}${kind} legend">` +
        `<line class="line" x1="${lx}" x2="${lx + 18}" y1="${ly}" y2="${ly}"/>`,
      series.dots ? `<circle class="dot" cx="${lx + 9}" cy="${ly}" r="3"/>` : "",
      svgText(lx + 24, ly + 4, series.name, 'class="tick"'),
      `</g>`,
    );
    lx += widths[k];
  });
  parts.push(`</svg>`);
  const captions = [
    ...(smoothingSpan
      ? [
        `<figcaption>Faint: every step; solid: moving average (EMA over about ${smoothingSpan} ` +
        `steps).</figcaption>`,
      ]
      : []),
    ...warnings.map((w) => `<figcaption class="warn">${escapeHtml(w)}</figcaption>`),
  ];
  return `<figure id="${spec.id}">${heading}${parts.join("")}${captions.join("")}</figure>`;
}

function stepSeries(steps: StepRecord[], value: (r: StepRecord) => number): Point[] {
  return steps.map((r) => [r.step, value(r)] as const);
}

/** Dashed seq and pooled lines of a reference predictor, coloured as the series they go with. */
function referenceSeries(
  evals: EvalRecord[],
  name: string,
  value: Record<"seq" | "pooled", (r: EvalRecord) => number | null | undefined>,
  firstColour = 0,
): Series[] {
  return (["seq", "pooled"] as const).map((part, i) => ({
    name: `${name} ${part}`,
    points: evalSeries(evals, value[part]),
    reference: true,
    colour: firstColour + i,
  }));
}

function evalSeries(
  evals: EvalRecord[],
  value: (r: EvalRecord) => number | null | undefined,
): Point[] {
  // Records without the value (older logs; retrieval over fewer than 2 rows) are left out.
  return evals.flatMap((r) => {
    const v = value(r);
    return v === undefined || v === null ? [] : [[r.step, v] as const];
  });
}

function flattenConfig(value: unknown, prefix = ""): Array<[string, string]> {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    return Object.entries(value).flatMap(([k, v]) =>
      flattenConfig(v, prefix ? `${prefix}.${k}` : k)
    );
  }
  return [[prefix, typeof value === "string" ? value : JSON.stringify(value) ?? String(value)]];
}

function table(rows: Array<[string, string]>, className: string): string {
  const body = rows.map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(v)}</td></tr>`)
    .join("");
  return `<table class="${className}">${body}</table>`;
}

function summaryRows(steps: StepRecord[], evals: EvalRecord[]): Array<[string, string]> {
  const rows: Array<[string, string]> = [];
  const last = steps.at(-1);
  if (!last) return [["Steps", "none logged yet"]];
  const padding = (records: readonly StepRecord[]): Array<[string, string]> => {
    const shares = records.flatMap((r) => r.padding === undefined ? [] : [r.padding]);
    if (shares.length === 0) return [];
    const mean = shares.reduce((a, b) => a + b, 0) / shares.length;
    return [[
      "Padding",
      `${(mean * 100).toFixed(1)}% of token positions (mean over steps), ${
        (Math.max(...shares) * 100).toFixed(1)
      }% at most`,
    ]];
  };
  const first = steps[0];
  const finiteMean = (values: number[]) => {
    const finite = values.filter(Number.isFinite);
    return finite.reduce((a, b) => a + b, 0) / finite.length;
  };
  rows.push(
    ["Steps", `${last.step} (${steps.length} logged)`],
    ["Epoch", formatNumber(last.epoch)],
    ["Samples", String(last.samples)],
    ["Wall time", formatDuration(last.elapsed_s)],
    [
      "Throughput",
      `${formatNumber(finiteMean(steps.map((r) => r.samples_per_s)))} samples/s mean, ${
        formatNumber(last.samples_per_s)
      } last`,
    ],
    ...padding(steps),
    [
      "Train loss",
      `${formatNumber(first.loss)} at step ${first.step} → ${
        formatNumber(last.loss)
      } at step ${last.step}`,
    ],
  );
  if (evals.length) {
    const firstEval = evals[0];
    const lastEval = evals[evals.length - 1];
    const best = evals.reduce((b, r) => (r.heldout_loss < b.heldout_loss ? r : b));
    const at = (r: EvalRecord) => `${formatNumber(r.heldout_loss)} at step ${r.step}`;
    rows.push(
      ["Held-out loss, first", at(firstEval)],
      [
        "Held-out loss, last",
        `${at(lastEval)} (seq ${formatNumber(lastEval.heldout_loss_seq)}, pooled ${
          formatNumber(lastEval.heldout_loss_pooled)
        })`,
      ],
      ["Held-out loss, best", at(best)],
      [
        "Cosine to teacher, last",
        `seq ${formatNumber(lastEval.cos_seq)}, pooled ${formatNumber(lastEval.cos_pooled)}`,
      ],
      ...learningRows(lastEval),
    );
  } else {
    rows.push(["Held-out loss", "no evaluation yet"]);
  }
  const clipped = steps.filter((r) => r.clip_coef < 1).length;
  rows.push(["Clipped steps", `${clipped} of ${steps.length}`]);
  const nonFinite = steps.filter((r) =>
    ![r.loss, r.loss_seq, r.loss_pooled, r.grad_norm.total].every(Number.isFinite)
  );
  if (nonFinite.length) {
    rows.push([
      "Non-finite loss or grad norm",
      `${nonFinite.length} steps (${listSteps(nonFinite.map((r) => r.step))})`,
    ]);
  }
  return rows;
}

const figure = (v: number | null | undefined) =>
  v === null || v === undefined ? "not defined" : formatNumber(v, 3);

/** Whether the student learned the prompt: its last held-out figures beside the references. */
function learningRows(e: EvalRecord): Array<[string, string]> {
  if (e.r2_seq === undefined) return [];
  const rows: Array<[string, string]> = [
    [
      "Held-out R², last",
      `seq ${figure(e.r2_seq)}, pooled ${figure(e.r2_pooled)} (mean predictor 0; word ` +
      `neighbours seq ${figure(e.nn_r2_seq)}, pooled ${figure(e.nn_r2_pooled)})`,
    ],
    [
      "Retrieval top-1 / top-5, last",
      `seq ${figure(e.top1_seq)} / ${figure(e.top5_seq)}, pooled ${figure(e.top1_pooled)} / ` +
      `${figure(e.top5_pooled)} (chance ${figure(e.chance_top1)} / ${figure(e.chance_top5)}; ` +
      `word neighbours top-1 seq ${figure(e.nn_top1_seq)}, pooled ${figure(e.nn_top1_pooled)})`,
    ],
    [
      "Centered cosine, last",
      `seq ${figure(e.ccos_seq)}, pooled ${figure(e.ccos_pooled)} (mean predictor 0)`,
    ],
    [
      "Spread across prompts / teacher's",
      `seq ${figure(e.spread_seq)}, pooled ${figure(e.spread_pooled)} (1: moves as much)`,
    ],
  ];
  for (const [name, x] of Object.entries(e.slices ?? {})) {
    rows.push([
      `Slice ${name} (${x.rows} rows)`,
      `R² seq ${figure(x.r2_seq)}, pooled ${figure(x.r2_pooled)}; top-1 seq ` +
      `${figure(x.top1_seq)}, pooled ${figure(x.top1_pooled)}`,
    ]);
  }
  return rows;
}

const STYLE = `
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1d2330; --muted: #5c6577;
  --grid: #e3e6ec; --frame: #9aa3b2; --warn: #c62828;
  --c0: #1f6fd1; --c1: #d9730d; --c2: #2e9e44; --c3: #8e44ad; --c4: #7a8290; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #15181e; --fg: #e4e7ee; --muted: #9aa3b2; --grid: #2c313b; --frame: #5c6577;
    --warn: #ff6b6b; --c0: #6ea8fe; --c1: #ffa94d; --c2: #69db7c; --c3: #d0a3ff;
    --c4: #9aa3b2; }
}
body { margin: 0 auto; max-width: 1280px; padding: 16px 24px 40px; background: var(--bg);
  color: var(--fg); font: 14px/1.45 system-ui, "DejaVu Sans", sans-serif; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 17px; margin: 24px 0 8px; }
h3 { font-size: 14px; margin: 0 0 4px; }
.meta { color: var(--muted); margin: 0; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 3px 12px 3px 0; vertical-align: top;
  border-bottom: 1px solid var(--grid); }
th { font-weight: 600; white-space: nowrap; }
.config td { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px;
  word-break: break-all; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 20px; }
figure { margin: 0; }
figcaption { font-size: 12px; margin-top: 2px; }
.warn { color: var(--warn); }
svg.chart { width: 100%; height: auto; display: block; color: var(--fg); }
svg text { fill: currentColor; font-size: 11px; }
svg .label { font-size: 12px; fill: var(--muted); }
svg .empty { font-size: 14px; fill: var(--muted); text-anchor: middle; }
svg .grid { stroke: var(--grid); stroke-width: 1; }
svg .axis { stroke: var(--frame); stroke-width: 1; }
svg .frame { fill: none; stroke: var(--frame); stroke-width: 1; }
svg .line { fill: none; stroke-width: 1.6; stroke-linejoin: round; stroke: var(--c); }
svg .sparse .line { stroke-width: 2.2; }
svg .ref .line { stroke-dasharray: 6 4; stroke-width: 1.4; }
svg .raw { stroke-width: 1; opacity: 0.35; }
svg .dot { fill: var(--c); stroke: var(--bg); stroke-width: 1; }
svg .skip { stroke: var(--warn); stroke-width: 2; }
.s0 { --c: var(--c0); } .s1 { --c: var(--c1); } .s2 { --c: var(--c2); } .s3 { --c: var(--c3); }
.s4 { --c: var(--c4); }
`;

/** The report of `records` (a metrics log, in order) as one HTML document. */
export function renderReport(records: MetricsRecord[], options: ReportOptions): string {
  const steps = records.filter((r): r is StepRecord => r.type === "step");
  const evals = records.filter((r): r is EvalRecord => r.type === "eval");
  const run = records.find((r) => r.type === "run");
  const config = options.config ?? run?.config ?? {};
  const noEval = "No evaluation yet";
  const noStep = "No steps logged yet";
  const charts: ChartSpec[] = [
    {
      id: "loss",
      title: "Loss",
      yLabel: "MSE",
      yScale: "auto",
      empty: noStep,
      series: [
        { name: "train", points: stepSeries(steps, (r) => r.loss), smooth: true },
        { name: "train seq", points: stepSeries(steps, (r) => r.loss_seq), smooth: true },
        { name: "train pooled", points: stepSeries(steps, (r) => r.loss_pooled), smooth: true },
        { name: "held-out", points: evalSeries(evals, (r) => r.heldout_loss), dots: true },
      ],
    },
    {
      id: "heldout",
      title: "Held-out loss",
      yLabel: "MSE",
      yScale: "auto",
      empty: noEval,
      series: [
        { name: "total", points: evalSeries(evals, (r) => r.heldout_loss), dots: true },
        { name: "seq", points: evalSeries(evals, (r) => r.heldout_loss_seq), dots: true },
        { name: "pooled", points: evalSeries(evals, (r) => r.heldout_loss_pooled), dots: true },
        ...referenceSeries(evals, "mean", {
          seq: (r) => r.mean_loss_seq,
          pooled: (r) => r.mean_loss_pooled,
        }, 1),
      ],
    },
    {
      id: "r2",
      title: "Held-out R² (share of the mean predictor's error explained)",
      yLabel: "R²",
      yScale: "linear",
      empty: noEval,
      series: [
        { name: "seq", points: evalSeries(evals, (r) => r.r2_seq), dots: true },
        { name: "pooled", points: evalSeries(evals, (r) => r.r2_pooled), dots: true },
        ...referenceSeries(evals, "neighbours", {
          seq: (r) => r.nn_r2_seq,
          pooled: (r) => r.nn_r2_pooled,
        }),
        {
          name: "mean (0)",
          points: evalSeries(evals, (r) => r.r2_seq === undefined ? undefined : 0),
          reference: true,
          colour: 4,
        },
      ],
    },
    {
      id: "retrieval",
      title: "Held-out retrieval: own target ranked first",
      yLabel: "top-1 accuracy",
      yScale: "linear",
      empty: noEval,
      series: [
        { name: "seq", points: evalSeries(evals, (r) => r.top1_seq), dots: true },
        { name: "pooled", points: evalSeries(evals, (r) => r.top1_pooled), dots: true },
        ...referenceSeries(evals, "neighbours", {
          seq: (r) => r.nn_top1_seq,
          pooled: (r) => r.nn_top1_pooled,
        }),
        {
          name: "chance",
          points: evalSeries(evals, (r) => r.chance_top1),
          reference: true,
          colour: 4,
        },
      ],
    },
    {
      id: "cosine",
      title: "Held-out cosine similarity to the teacher",
      yLabel: "cosine",
      yScale: "linear",
      empty: noEval,
      series: [
        { name: "seq (mean per token)", points: evalSeries(evals, (r) => r.cos_seq), dots: true },
        { name: "pooled", points: evalSeries(evals, (r) => r.cos_pooled), dots: true },
      ],
    },
    {
      id: "grad-norm",
      title: "Gradient norm (before clipping)",
      yLabel: "L2 norm",
      yScale: "auto",
      empty: noStep,
      series: [
        { name: "total", points: stepSeries(steps, (r) => r.grad_norm.total), smooth: true },
        {
          name: "resampler",
          points: stepSeries(steps, (r) => r.grad_norm.resampler),
          smooth: true,
        },
        { name: "lora", points: stepSeries(steps, (r) => r.grad_norm.lora), smooth: true },
      ],
    },
    {
      id: "lr",
      title: "Learning rate",
      yLabel: "learning rate",
      yScale: "linear",
      empty: noStep,
      series: [
        { name: "resampler", points: stepSeries(steps, (r) => r.lr.resampler) },
        { name: "lora", points: stepSeries(steps, (r) => r.lr.lora) },
      ],
    },
    {
      id: "throughput",
      title: "Throughput",
      yLabel: "samples/s",
      yScale: "linear",
      empty: noStep,
      series: [{
        name: "samples/s",
        points: stepSeries(steps, (r) => r.samples_per_s),
        smooth: true,
      }],
    },
  ];
  const started = run ? `Started ${escapeHtml(run.time)} · ` : "";
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>${escapeHtml(options.title)}</title>
<style>${STYLE}</style>
</head>
<body>
<h1>${escapeHtml(options.title)}</h1>
<p class="meta">${started}${steps.length} steps and ${evals.length} evaluations logged</p>
<h2>Summary</h2>
${table(summaryRows(steps, evals), "summary")}
<h2>Plots</h2>
<div class="charts">
${charts.map(renderChart).join("\n")}
</div>
<h2>Config</h2>
${Object.keys(config).length ? table(flattenConfig(config), "config") : "<p>No config logged.</p>"}
</body>
</html>
`;
}

/** Renders `<runDir>/metrics.jsonl` to `<runDir>/report.html` (atomically); returns its path. */
export async function writeReport(runDir: string, options: Partial<ReportOptions> = {}) {
  const records = await readMetrics(runDir);
  const path = join(runDir, REPORT_FILE);
  const title = options.title ?? `distill training report: ${basename(resolve(runDir))}`;
  await writeFileAtomic(path, renderReport(records, { ...options, title }));
  return path;
}
