/**
 * LayerNorm and RMSNorm over the last axis (f32 in and out), one workgroup per row.
 *
 * A "row" is every consecutive run of `weight.size` elements of `x`, so the same call
 * normalises whole hidden states (`x [T, H]`, weight `[H]`) or each head separately
 * (Qwen3's q_norm/k_norm: `x [T, nHeads * hd]`, weight `[hd]` gives T * nHeads rows).
 * The `*WithStats` variants also return per-row statistics ([rows] f32) for a backward pass.
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
