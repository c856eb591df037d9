/**
 * LayerNorm and RMSNorm over the last axis (f32 in and out), one workgroup per row.
 *
 * A "row" is every consecutive run of `weight.size` elements of `x`, so the same call
 * normalises whole hidden states (`x [T, H]`, weight `[H]`) or each head separately
 * (Qwen3's q_norm/k_norm: `x [T, nHeads * hd]`, weight `[hd]` gives T * nHeads rows).
 * The `*WithStats` variants also return per-row statistics ([rows] f32) for the backward pass
 * (`layerNormBackward`, `rmsNormBackward`), which reads them instead of recomputing them.
 * Parameter gradients are summed over rows in a fixed order (no atomics): reproducible bits.
 */
import code from "../../kernels/norm.wgsl" with { type: "text" };
import { f32, type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut, requireSize } from "./checks.ts";
import { rowWorkgroupSize, withWorkgroupReduce } from "./row_reduce.ts";

const kernelCode = withWorkgroupReduce(code);

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

function dispatchNorm(
  gpu: Gpu,
  entry: string,
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  eps: number,
  rows: number,
  outputs: { y: Tensor; mean?: Tensor; rstd?: Tensor },
): void {
  const d = weight.size;
  gpu.dispatch({
    kernel: {
      name: "norm",
      code: kernelCode,
      entry,
      constants: { WG: rowWorkgroupSize(d) },
    },
    params: [rows, d, f32(eps)],
    bindings: [x, weight, bias, outputs.y, outputs.mean ?? null, outputs.rstd ?? null],
    workgroups: grid1d(gpu, rows, 1),
  });
}

function normOutput(gpu: Gpu, op: string, x: Tensor, out: Tensor | undefined): Tensor {
  if (out) requireOut(op, out, x.size, [x]);
  return out ?? gpu.empty(x.shape, "f32", `${op}(${x.name})`);
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
  const rows = normRows("layerNorm", x, weight, bias, eps);
  const y = normOutput(gpu, "layerNorm", x, out);
  dispatchNorm(gpu, "layer_norm", x, weight, bias, eps, rows, { y });
  return y;
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
  const rows = normRows("layerNorm", x, weight, bias, eps);
  const y = normOutput(gpu, "layerNorm", x, out);
  const mean = gpu.empty([rows], "f32", `layerNorm.mean(${x.name})`);
  const rstd = gpu.empty([rows], "f32", `layerNorm.rstd(${x.name})`);
  dispatchNorm(gpu, "layer_norm_stats", x, weight, bias, eps, rows, { y, mean, rstd });
  return { y, mean, rstd };
}

/** `weight * (x / sqrt(mean(x^2) + eps))` per row in f32, as transformers' Qwen3RMSNorm. */
export function rmsNorm(gpu: Gpu, x: Tensor, weight: Tensor, eps: number, out?: Tensor): Tensor {
  const rows = normRows("rmsNorm", x, weight, null, eps);
  const y = normOutput(gpu, "rmsNorm", x, out);
  dispatchNorm(gpu, "rms_norm", x, weight, null, eps, rows, { y });
  return y;
}

/** `rmsNorm` that also keeps the per-row rstd. */
export function rmsNormWithStats(
  gpu: Gpu,
  x: Tensor,
  weight: Tensor,
  eps: number,
  out?: Tensor,
): RmsNormResult {
  const rows = normRows("rmsNorm", x, weight, null, eps);
  const y = normOutput(gpu, "rmsNorm", x, out);
  const rstd = gpu.empty([rows], "f32", `rmsNorm.rstd(${x.name})`);
  dispatchNorm(gpu, "rms_norm_stats", x, weight, null, eps, rows, { y, rstd });
  return { y, rstd };
}

// Flags of the backward kernels (kernels/norm.wgsl).
const LAYER_NORM = 1;
const ACCUMULATE = 2;
const COLUMN_WG = 64;
/**
 * Parameter gradients are summed over chunks of at least this many rows, and at most
 * PARAM_GRAD_MAX_CHUNKS chunks, so the final per-column sum stays short.
 */
const PARAM_GRAD_MIN_CHUNK_ROWS = 16;
const PARAM_GRAD_MAX_CHUNKS = 256;

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
      code: kernelCode,
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
 * Sums dy * xhat (and dy, when `mean` is given: LayerNorm) over all rows into [D] tensors,
 * in two deterministic steps: per-chunk partial sums, then the chunks in order.
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
  const chunkRows = Math.max(PARAM_GRAD_MIN_CHUNK_ROWS, Math.ceil(rows / PARAM_GRAD_MAX_CHUNKS));
  const chunks = Math.ceil(rows / chunkRows);
  const outputs = mean ? 2 : 1;
  const stride = outputs * d;
  const partial = gpu.empty([chunks, stride], "f32", `${op}.partialParamGrads`);
  const columnGroups = Math.ceil(d / COLUMN_WG);
  gpu.dispatch({
    kernel: { name: "norm", code: kernelCode, entry: "norm_param_grad_partial" },
    params: [rows, d, f32(0), mean ? LAYER_NORM : 0, chunkRows, stride],
    bindings: [x, null, null, null, null, null, dy, mean ?? rstd, rstd, null, partial],
    workgroups: [columnGroups, chunks],
  });
  const names = ["dweight", "dbias"];
  const grads = names.slice(0, outputs).map((name, k) => {
    const grad = gpu.empty([d], "f32", `${op}.${name}`);
    gpu.dispatch({
      kernel: { name: "norm", code: kernelCode, entry: "column_sum" },
      params: [chunks, d, f32(0), 0, 0, stride, k * d],
      bindings: [null, null, null, null, null, null, null, null, null, null, partial, grad],
      workgroups: [columnGroups],
    });
    return grad;
  });
  partial.destroy();
  return grads;
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
