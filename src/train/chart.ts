/**
 * SVG line charts for the training report (src/train/report.ts): axes (linear or log), series
 * drawn raw and smoothed, decimation to a min and max per pixel column (spikes stay visible),
 * dashed reference lines, legends, and marks for values left out.
 *
 * Long runs are decimated to a min and max per pixel column, which keeps spikes visible.
 * Non-finite values (and non-positive ones on a log axis) are left out of the lines, which break
 * there, marked with a red cross along the top of the plot and counted under it.
 */

export type Point = readonly [number, number];

export interface Series {
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

export interface ChartSpec {
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

export function escapeHtml(text: string): string {
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

export function formatDuration(seconds: number): string {
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

export function listSteps(steps: number[]): string {
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
export function renderChart(spec: ChartSpec): string {
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
