/**
 * The HTML report of a training run: one self-contained file (inline CSS and SVG, no scripts,
 * fonts or links) with plots of the metrics log (src/train/metrics.ts), a summary table and the
 * run config. It follows the reader's light or dark colour scheme. The charts are drawn by
 * src/train/chart.ts.
 */
import { basename, join, resolve } from "node:path";
import { writeFileAtomic } from "../io/atomic.ts";
import { type EvalRecord, type MetricsRecord, readMetrics, type StepRecord } from "./metrics.ts";

import {
  type ChartSpec,
  escapeHtml,
  formatDuration,
  formatNumber,
  listSteps,
  type Point,
  renderChart,
  type Series,
} from "./chart.ts";
export const REPORT_FILE = "report.html";

export interface ReportOptions {
  title: string;
  /** The run config to list; defaults to the log's `run` record. */
  config?: Record<string, unknown>;
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
