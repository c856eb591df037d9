/**
 * Masked, scaled softmax over the last axis of attention scores [batch, heads, Tq, Tk]
 * (f32), one workgroup per row; max-subtracted for stability. `softmaxBackward` turns the
 * gradient of the probabilities into that of the scores.
 */
import code from "../../kernels/softmax.wgsl" with { type: "text" };
import { f32, type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut, requireSize } from "./checks.ts";
import { rowWorkgroupSize, WORKGROUP_REDUCE } from "./row_reduce.ts";

// Bits of the kernel's `flags` parameter.
const CAUSAL = 1;
const KEY_MASK = 2;
const KEY_LENGTHS = 4;

export interface SoftmaxOptions {
  /** Multiplies every score before the max, e.g. 1 / sqrt(head_dim). Default 1. */
  scale?: number;
  /** Query i sees only keys j <= i + causalOffset. */
  causal?: boolean;
  /** Shift of the causal diagonal (keys before the queries, e.g. a cache); default 0. */
  causalOffset?: number;
  /** u32/i32 [batch, Tk]: nonzero marks a visible key (the tokenizer's attention mask). */
  keyMask?: Tensor;
  /** u32/i32 [batch]: keys j < length are visible (right padding). Not with keyMask. */
  keyLengths?: Tensor;
  out?: Tensor;
}

/**
 * softmax(scores * scale) over visible keys; hidden keys get probability exactly 0. A row
 * with no visible key (e.g. a fully masked batch entry) is all zeros, not NaN as in torch's
 * -inf masking. Scores of rank < 4 are read as [1, ..., Tq, Tk].
 */
export function softmax(gpu: Gpu, scores: Tensor, options: SoftmaxOptions = {}): Tensor {
  const op = "softmax";
  requireDType(op, "scores", scores, ["f32"]);
  if (scores.shape.length < 1 || scores.shape.length > 4) {
    throw new Error(
      `${op}: scores '${scores.name}' [${scores.shape}] must be [batch, heads, Tq, Tk] (or fewer leading axes)`,
    );
  }
  const [batch, heads, tq, tk] = [1, 1, 1, ...scores.shape].slice(-4);
  const { scale = 1, causal = false, causalOffset = 0, keyMask, keyLengths, out } = options;
  if (!Number.isInteger(causalOffset)) {
    throw new Error(`${op}: causalOffset must be an integer, got ${causalOffset}`);
  }
  if (causalOffset !== 0 && !causal) {
    throw new Error(`${op}: causalOffset ${causalOffset} given without causal: true`);
  }
  if (keyMask && keyLengths) throw new Error(`${op}: pass keyMask or keyLengths, not both`);
  let flags = causal ? CAUSAL : 0;
  if (keyMask) {
    requireDType(op, "keyMask", keyMask, ["u32", "i32"]);
    requireSize(op, "keyMask", keyMask, batch * tk, `[batch ${batch}, Tk ${tk}]`);
    flags |= KEY_MASK;
  }
  if (keyLengths) {
    requireDType(op, "keyLengths", keyLengths, ["u32", "i32"]);
    requireSize(op, "keyLengths", keyLengths, batch, `one length per batch entry`);
    flags |= KEY_LENGTHS;
  }
  const mask = keyMask ?? keyLengths ?? null;
  if (out) requireOut(op, out, scores.size, mask ? [scores, mask] : [scores]);
  const probs = out ?? gpu.empty(scores.shape, "f32", `softmax(${scores.name})`);
  const rows = batch * heads * tq;
  gpu.dispatch({
    kernel: {
      name: "softmax",
      code,
      markers: WORKGROUP_REDUCE,
      entry: "softmax",
      constants: { WG: rowWorkgroupSize(tk) },
    },
    params: [rows, heads, tq, tk, f32(scale), flags, causalOffset],
    // The mask slot needs a buffer even when unused; the scores are never read through it.
    bindings: [scores, mask ?? scores, probs],
    workgroups: grid1d(gpu, rows, 1),
  });
  return probs;
}

export interface SoftmaxBackwardOptions {
  /** The forward's score scale (default 1): the gradient is that of the unscaled scores. */
  scale?: number;
  out?: Tensor;
}

/**
 * d scores = scale * P * (dP - sum over the row of dP * P), from the forward's output P
 * and its gradient dP, over the last axis (any rank). Masked keys (P = 0) get 0.
 */
export function softmaxBackward(
  gpu: Gpu,
  dP: Tensor,
  P: Tensor,
  options: SoftmaxBackwardOptions = {},
): Tensor {
  const op = "softmaxBackward";
  requireDType(op, "dP", dP, ["f32"]);
  requireDType(op, "P", P, ["f32"]);
  requireSize(op, "dP", dP, P.size, `the gradient of the probabilities, the size of P '${P.name}'`);
  const { scale = 1, out } = options;
  if (out) requireOut(op, out, P.size, [dP, P]);
  const dScores = out ?? gpu.empty(P.shape, "f32", `${op}(${P.name})`);
  const tk = P.shape.at(-1) ?? 1;
  const rows = tk === 0 ? 0 : P.size / tk;
  gpu.dispatch({
    kernel: {
      name: "softmax",
      code,
      markers: WORKGROUP_REDUCE,
      entry: "softmax_backward",
      constants: { WG: rowWorkgroupSize(tk) },
    },
    params: [rows, 0, 0, tk, f32(scale)],
    bindings: [null, null, null, P, dP, dScores],
    workgroups: grid1d(gpu, rows, 1),
  });
  return dScores;
}
