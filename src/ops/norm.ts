/**
 * LayerNorm and RMSNorm over the last axis (f32 in and out), one workgroup per row.
 *
 * A "row" is every consecutive run of `weight.size` elements of `x`, so the same call
 * normalises whole hidden states (`x [T, H]`, weight `[H]`) or each head separately
 * (Qwen3's q_norm/k_norm: `x [T, nHeads * hd]`, weight `[hd]` gives T * nHeads rows).
 * The `*WithStats` variants also return per-row statistics ([rows] f32) for the backward pass
 * (`layerNormBackward`, `rmsNormBackward`), which reads them instead of recomputing them.
 * Parameter gradients are summed over rows in columnSum's fixed order (no atomics):
 * reproducible bits.
 */
import code from "../../kernels/norm.wgsl" with { type: "text" };
import { f32, type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut, requireSize } from "./checks.ts";
import { columnSum, columnSumChunkRows, sumChunkPartials } from "./reduce.ts";
import { rowWorkgroupSize, WORKGROUP_REDUCE } from "./row_reduce.ts";

export interface LayerNormResult {
  y: Tensor;
  /** Per-row mean, [rows]. */
  mean: Tensor;
  /** Per-row 1 / sqrt(var + eps) (biased variance), [rows]. */
  rstd: Tensor;
}

export interface RmsNormResult {
  y: Tensor;
  /** Per-row 1 / sqrt(mean(x^2) + eps), [rows]. */
  rstd: Tensor;
}

/** Number of rows `x` holds when normalised in runs of `weight.size`; checks dtypes and shapes. */
function normRows(op: string, x: Tensor, weight: Tensor, bias: Tensor | null, eps: number): number {
  requireDType(op, "x", x, ["f32"]);
  requireDType(op, "weight", weight, ["f32"]);
  const d = weight.size;
  const last = x.shape.at(-1) ?? 1;
  if (d === 0 || last % d !== 0) {
    throw new Error(
      `${op}: the last axis of x '${x.name}' [${x.shape}] must be a multiple of the length of ` +
        `weight '${weight.name}' [${weight.shape}] (the normalised axis)`,
    );
  }
  if (bias) {
    requireDType(op, "bias", bias, ["f32"]);
    requireSize(op, "bias", bias, d, "one per normalised feature, like weight");
  }
  if (!(eps >= 0)) throw new Error(`${op}: eps must be a non-negative number, got ${eps}`);
  return x.size / d;
}

/**
 * Checks the arguments, takes `out` or allocates y, and records the kernel; `withStats` also
 * allocates and writes the per-row statistics the backward pass reads (rstd, and the mean for
 * LayerNorm).
 */
function runNorm(
  gpu: Gpu,
  op: "layerNorm" | "rmsNorm",
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  eps: number,
  out: Tensor | undefined,
  withStats: boolean,
): { y: Tensor; mean?: Tensor; rstd?: Tensor } {
  const rows = normRows(op, x, weight, bias, eps);
  if (out) requireOut(op, out, x.size, [x]);
  const y = out ?? gpu.empty(x.shape, "f32", `${op}(${x.name})`);
  const stat = (name: string) => gpu.empty([rows], "f32", `${op}.${name}(${x.name})`);
  const mean = withStats && op === "layerNorm" ? stat("mean") : undefined;
  const rstd = withStats ? stat("rstd") : undefined;
  const d = weight.size;
  gpu.dispatch({
    kernel: {
      name: "norm",
      code,
      markers: WORKGROUP_REDUCE,
      entry: `${op === "layerNorm" ? "layer_norm" : "rms_norm"}${withStats ? "_stats" : ""}`,
      constants: { WG: rowWorkgroupSize(d) },
    },
    params: [rows, d, f32(eps)],
    bindings: [x, weight, bias, y, mean ?? null, rstd ?? null],
    workgroups: grid1d(gpu, rows, 1),
  });
  return { y, mean, rstd };
}

/** `(x - mean) / sqrt(var + eps) * weight + bias` per row (torch.nn.LayerNorm, biased variance). */
export function layerNorm(
  gpu: Gpu,
  x: Tensor,
  weight: Tensor,
  bias: Tensor,
  eps: number,
  out?: Tensor,
): Tensor {
  return runNorm(gpu, "layerNorm", x, weight, bias, eps, out, false).y;
}

/** `layerNorm` that also keeps the per-row mean and rstd. */
export function layerNormWithStats(
  gpu: Gpu,
  x: Tensor,
  weight: Tensor,
  bias: Tensor,
  eps: number,
  out?: Tensor,
): LayerNormResult {
  const { y, mean, rstd } = runNorm(gpu, "layerNorm", x, weight, bias, eps, out, true);
  return { y, mean: mean!, rstd: rstd! };
}

/** `weight * (x / sqrt(mean(x^2) + eps))` per row in f32, as transformers' Qwen3RMSNorm. */
export function rmsNorm(gpu: Gpu, x: Tensor, weight: Tensor, eps: number, out?: Tensor): Tensor {
  return runNorm(gpu, "rmsNorm", x, weight, null, eps, out, false).y;
}

/** `rmsNorm` that also keeps the per-row rstd. */
export function rmsNormWithStats(
  gpu: Gpu,
  x: Tensor,
  weight: Tensor,
  eps: number,
  out?: Tensor,
): RmsNormResult {
  const { y, rstd } = runNorm(gpu, "rmsNorm", x, weight, null, eps, out, true);
  return { y, rstd: rstd! };
}

// Flags of the backward kernels (kernels/norm.wgsl).
const LAYER_NORM = 1;
const ACCUMULATE = 2;
const COLUMN_WG = 64;

export interface NormBackwardOptions {
  /** Write dx into this f32 tensor of x's size instead of a new one. */
  out?: Tensor;
  /** Add dx into `out` (e.g. the residual stream's gradient) instead of overwriting it. */
  accumulate?: boolean;
}

export interface LayerNormBackwardOptions extends NormBackwardOptions {
  /** Also compute dweight and dbias (default true); false for a frozen norm. */
  paramGrads?: boolean;
}

export interface RmsNormBackwardOptions extends NormBackwardOptions {
  /** Also compute dweight (default false: Qwen3's norms are frozen). */
  weightGrad?: boolean;
}

export interface LayerNormGrads {
  dx: Tensor;
  /** [D], summed over all rows; absent when `paramGrads` is false. */
  dweight?: Tensor;
  /** [D], summed over all rows; absent when `paramGrads` is false. */
  dbias?: Tensor;
}

export interface RmsNormGrads {
  dx: Tensor;
  /** [D], summed over all rows (and heads); present only with `weightGrad`. */
  dweight?: Tensor;
}

/** Checks the saved forward tensors and the gradient, records dx; returns the row count. */
function normBackwardDx(
  gpu: Gpu,
  op: string,
  dy: Tensor,
  x: Tensor,
  weight: Tensor,
  mean: Tensor | null,
  rstd: Tensor,
  options: NormBackwardOptions,
): { rows: number; dx: Tensor } {
  const rows = normRows(op, x, weight, null, 0);
  requireDType(op, "dy", dy, ["f32"]);
  requireSize(op, "dy", dy, x.size, `the gradient of the output, the size of x '${x.name}'`);
  for (const [arg, t] of [["mean", mean], ["rstd", rstd]] as const) {
    if (!t) continue;
    requireDType(op, arg, t, ["f32"]);
    requireSize(op, arg, t, rows, "one per normalised row, as the forward *WithStats returned");
  }
  const { out, accumulate = false } = options;
  if (accumulate && !out) throw new Error(`${op}: accumulate needs an out tensor to add dx into`);
  const inputs = [dy, x, weight, rstd, ...(mean ? [mean] : [])];
  if (out) requireOut(op, out, x.size, inputs);
  const dx = out ?? gpu.empty(x.shape, "f32", `${op}.dx(${x.name})`);
  gpu.dispatch({
    kernel: {
      name: "norm",
      code,
      markers: WORKGROUP_REDUCE,
      entry: "norm_backward",
      constants: { WG: rowWorkgroupSize(weight.size) },
    },
    params: [rows, weight.size, f32(0), (mean ? LAYER_NORM : 0) | (accumulate ? ACCUMULATE : 0)],
    // Without a mean (RMSNorm) rstd fills its slot; the kernel then never reads it.
    bindings: [x, weight, null, null, null, null, dy, mean ?? rstd, rstd, dx],
    workgroups: grid1d(gpu, rows, 1),
  });
  return { rows, dx };
}

/**
 * Sums dy * xhat over all rows into dweight [D] and, for LayerNorm (`mean` given), dy into
 * dbias [D]. dy * xhat is never stored: its per-chunk sums are, then added as columnSum adds.
 */
function normParamGrads(
  gpu: Gpu,
  op: string,
  dy: Tensor,
  x: Tensor,
  mean: Tensor | null,
  rstd: Tensor,
  rows: number,
  d: number,
): Tensor[] {
  const chunkRows = columnSumChunkRows(rows);
  const chunks = Math.ceil(rows / chunkRows);
  const partial = gpu.empty([chunks, d], "f32", `${op}.dweight.partial`);
  gpu.dispatch({
    kernel: { name: "norm", code, markers: WORKGROUP_REDUCE, entry: "norm_weight_grad_partial" },
    params: [rows, d, f32(0), mean ? LAYER_NORM : 0, chunkRows],
    bindings: [x, null, null, null, null, null, dy, mean ?? rstd, rstd, null, partial],
    workgroups: [Math.ceil(d / COLUMN_WG), chunks],
  });
  const dweight = gpu.empty([d], "f32", `${op}.dweight`);
  sumChunkPartials(gpu, partial, dweight);
  partial.destroy();
  if (!mean) return [dweight];
  const dbias = gpu.empty([d], "f32", `${op}.dbias`);
  return [dweight, columnSum(gpu, dy.reshape([rows, d]), dbias)];
}

/**
 * Gradients of LayerNorm from the output gradient dy, the input x and the forward's saved
 * mean and rstd (`layerNormWithStats`). dweight and dbias are summed over every row.
 */
export function layerNormBackward(
  gpu: Gpu,
  dy: Tensor,
  x: Tensor,
  weight: Tensor,
  mean: Tensor,
  rstd: Tensor,
  options: LayerNormBackwardOptions = {},
): LayerNormGrads {
  const op = "layerNormBackward";
  const { rows, dx } = normBackwardDx(gpu, op, dy, x, weight, mean, rstd, options);
  if (options.paramGrads === false) return { dx };
  const [dweight, dbias] = normParamGrads(gpu, op, dy, x, mean, rstd, rows, weight.size);
  return { dx, dweight, dbias };
}

/**
 * Gradients of RMSNorm from dy, x and the forward's saved rstd (`rmsNormWithStats`); with
 * weight [hd] and x [T, heads * hd] this is the per-head (q_norm / k_norm) backward.
 */
export function rmsNormBackward(
  gpu: Gpu,
  dy: Tensor,
  x: Tensor,
  weight: Tensor,
  rstd: Tensor,
  options: RmsNormBackwardOptions = {},
): RmsNormGrads {
  const op = "rmsNormBackward";
  const { rows, dx } = normBackwardDx(gpu, op, dy, x, weight, null, rstd, options);
  if (!options.weightGrad) return { dx };
  const [dweight] = normParamGrads(gpu, op, dy, x, null, rstd, rows, weight.size);
  return { dx, dweight };
}
