/**
 * Multi-head scaled dot-product attention on the layout the q/k/v projections produce:
 * q [B, Tq, nq*hd], k and v [B, Tk, nkv*hd], result [B, Tq, nq*hd] (all f32). Head h of q
 * owns features [h*hd, (h+1)*hd) and reads KV head floor(h / (nq/nkv)) (GQA).
 *
 * Masks: `causal` (query i sees keys j <= i), and at most one key mask, either per-batch
 * `keyLengths` (right padding; keys from `alwaysVisibleFrom` on are never masked, which is the
 * resampler's [x positions, latent positions] key order) or a general `keyMask` [B, Tk].
 * A query whose keys are all masked gets zeros.
 *
 * `attentionBackward` gives dq, dk and dv from the forward's output and saved lse
 * (`attentionWithStats`), recomputing the probabilities tile by tile (flash-attention 2).
 */
import code from "../../kernels/attention.wgsl" with { type: "text" };
import { f32, type Gpu, type ParamValue } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut, requirePositiveInteger, requireSize } from "./checks.ts";
import { type IndexInput, type IndexTensor, indexTensor } from "./indices.ts";

/** lse of a query row with no visible key: large enough that exp(score - lse) is 0. */
export const ATTENTION_EMPTY_LSE = 3.4028234663852886e38;

/** Largest head dimension: 8 lanes per query row, each holding 16 output features. */
export const ATTENTION_MAX_HEAD_DIM = 128;

/** Rows (queries in the forward and dq pass, keys in the dk/dv pass) per workgroup. */
const BLOCK_ROWS = 16;
const STATS_WG = 64;

export interface AttentionOptions {
  /** Query heads nq; q's last axis is nq * hd. */
  numHeads: number;
  /** KV heads nkv (default numHeads); numHeads must be a multiple of it. */
  numKvHeads?: number;
  /** Score scale, default 1 / sqrt(hd). */
  scale?: number;
  /** Query i sees keys j <= i; needs Tq == Tk. */
  causal?: boolean;
  /**
   * Valid keys per batch row [B] (right padding): key j of row b is visible when
   * j < keyLengths[b] or j >= alwaysVisibleFrom. Host values are checked against
   * [0, alwaysVisibleFrom] and uploaded (which submits pending work; in a loop over layers
   * upload once and pass the u32/i32 tensor).
   */
  keyLengths?: IndexInput;
  /** First key that `keyLengths` never masks (default Tk). */
  alwaysVisibleFrom?: number;
  /** General key mask [B, Tk], nonzero = visible (host values or a u32/i32 tensor). */
  keyMask?: IndexInput;
  /** Write the result into this f32 tensor of q's size instead of a new one. */
  out?: Tensor;
}

export interface AttentionResult {
  out: Tensor;
  /**
   * Per-row log-sum-exp of the scaled, masked scores, [B, nq, Tq]: the softmax is
   * exp(scale * q.k - lse). Rows with no visible key hold ATTENTION_EMPTY_LSE.
   */
  lse: Tensor;
}

interface AttentionShape {
  batch: number;
  tq: number;
  tk: number;
  nq: number;
  nkv: number;
  hd: number;
}

function attentionShape(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): AttentionShape {
  const op = "attention";
  for (const [arg, t] of [["q", q], ["k", k], ["v", v]] as const) {
    requireDType(op, arg, t, ["f32"]);
    if (t.shape.length !== 3) {
      throw new Error(`${op}: ${arg} '${t.name}' [${t.shape}] must be [B, T, heads * head_dim]`);
    }
  }
  const nq = opts.numHeads;
  const nkv = opts.numKvHeads ?? nq;
  requirePositiveInteger(op, "numHeads", nq);
  requirePositiveInteger(op, "numKvHeads", nkv);
  if (nq % nkv !== 0) {
    throw new Error(`${op}: numHeads ${nq} must be a multiple of numKvHeads ${nkv}`);
  }
  const [batch, tq, qWidth] = q.shape;
  const tk = k.shape[1];
  const hd = qWidth / nq;
  if (!Number.isInteger(hd) || hd % 4 !== 0 || hd < 4 || hd > ATTENTION_MAX_HEAD_DIM) {
    throw new Error(
      `${op}: q '${q.name}' [${q.shape}] last axis must be numHeads (${nq}) x head_dim, ` +
        `with head_dim a multiple of 4 from 4 to ${ATTENTION_MAX_HEAD_DIM} (the kernel reads vec4s)`,
    );
  }
  const kvShape = [batch, tk, nkv * hd];
  for (const [arg, t] of [["k", k], ["v", v]] as const) {
    if (t.shape.some((d, i) => d !== kvShape[i])) {
      throw new Error(
        `${op}: ${arg} '${t.name}' [${t.shape}] must be [${kvShape}] ` +
          `(batch of q, Tk, numKvHeads ${nkv} x head_dim ${hd})`,
      );
    }
  }
  if (opts.causal && tq !== tk) {
    throw new Error(
      `${op}: causal attention needs as many queries as keys, got Tq ${tq}, Tk ${tk}`,
    );
  }
  return { batch, tq, tk, nq, nkv, hd };
}

interface KeyMask {
  /** The kernel's mask_mode: 0 none, 1 lengths, 2 [B, Tk] mask. */
  mode: number;
  valid: IndexTensor | null;
  visibleFrom: number;
}

function keyMask(gpu: Gpu, s: AttentionShape, opts: AttentionOptions): KeyMask {
  if (opts.keyLengths !== undefined && opts.keyMask !== undefined) {
    throw new Error("attention: pass keyLengths or keyMask, not both");
  }
  const visibleFrom = opts.alwaysVisibleFrom ?? s.tk;
  if (!Number.isInteger(visibleFrom) || visibleFrom < 0 || visibleFrom > s.tk) {
    throw new Error(
      `attention: alwaysVisibleFrom ${visibleFrom} must be an integer in [0, Tk = ${s.tk}]`,
    );
  }
  if (opts.keyLengths !== undefined) {
    const valid = indexTensor(gpu, "attention", "keyLengths", opts.keyLengths, {
      length: { count: s.batch, meaning: "one length per batch row" },
      check: (len, b) => {
        if (len < 0 || len > visibleFrom) {
          throw new Error(
            `attention: keyLengths[${b}] = ${len} is outside [0, ${visibleFrom}] (the maskable keys)`,
          );
        }
      },
    });
    return { mode: 1, valid, visibleFrom };
  }
  if (opts.keyMask !== undefined) {
    const valid = indexTensor(gpu, "attention", "keyMask", opts.keyMask, {
      length: { count: s.batch * s.tk, meaning: "a [B, Tk] mask" },
      check: () => {},
    });
    return { mode: 2, valid, visibleFrom };
  }
  return { mode: 0, valid: null, visibleFrom };
}

/** The kernels' Params struct, shared by the forward and backward passes. */
function attentionParams(s: AttentionShape, mask: KeyMask, opts: AttentionOptions): ParamValue[] {
  return [
    s.tq,
    s.tk,
    s.nq,
    s.nkv,
    f32(opts.scale ?? 1 / Math.sqrt(s.hd)),
    opts.causal ? 1 : 0,
    mask.mode,
    mask.visibleFrom,
    s.hd / 4,
  ];
}

/** Attention plus the per-row log-sum-exp a backward pass needs. */
export function attentionWithStats(
  gpu: Gpu,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionOptions,
): AttentionResult {
  const s = attentionShape(q, k, v, opts);
  if (opts.out) requireOut("attention", opts.out, q.size, [q, k, v]);
  const mask = keyMask(gpu, s, opts);
  const out = opts.out ?? gpu.empty(q.shape, "f32", `attention(${q.name})`);
  const lse = gpu.empty([s.batch, s.nq, s.tq], "f32", `attention.lse(${q.name})`);
  gpu.dispatch({
    kernel: { name: "attention", code },
    params: attentionParams(s, mask, opts),
    // Without a mask the kernel never reads key_valid, but the slot needs a buffer: q is
    // read-only there too, so binding it twice is allowed.
    bindings: [q, k, v, mask.valid?.tensor ?? q, out, lse],
    workgroups: [Math.ceil(s.tq / BLOCK_ROWS), s.nq, s.batch],
  });
  if (mask.valid?.owned) mask.valid.tensor.destroy();
  return { out, lse };
}

/** softmax(scale * q k^T + masks) v per head; see the module comment for layouts and masks. */
export function attention(
  gpu: Gpu,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionOptions,
): Tensor {
  const { out, lse } = attentionWithStats(gpu, q, k, v, opts);
  lse.destroy();
  return out;
}

export interface AttentionGrads {
  /** [B, Tq, nq*hd], like q. */
  dq: Tensor;
  /** [B, Tk, nkv*hd], like k: each KV head sums over the query heads that read it (GQA). */
  dk: Tensor;
  /** [B, Tk, nkv*hd], like v. */
  dv: Tensor;
}

/**
 * Gradients of attention with respect to q, k and v from the output gradient dOut and the
 * forward's q, k, v, out and lse (`attentionWithStats`), under the forward's options (its
 * `out` is not used here). Every element is written once, in a fixed order (no atomics), so
 * the result is deterministic. Masked keys get no gradient and query rows with no visible key
 * give zeros.
 */
export function attentionBackward(
  gpu: Gpu,
  dOut: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  opts: AttentionOptions,
): AttentionGrads {
  const op = "attentionBackward";
  const s = attentionShape(q, k, v, opts);
  for (
    const [arg, t, size, meaning] of [
      ["dOut", dOut, q.size, `the gradient of the output, the size of q '${q.name}'`],
      ["out", out, q.size, "the forward's output, the size of q"],
      ["lse", lse, s.batch * s.nq * s.tq, "[B, nq, Tq], as attentionWithStats returned"],
    ] as const
  ) {
    requireDType(op, arg, t, ["f32"]);
    requireSize(op, arg, t, size, meaning);
  }
  const mask = keyMask(gpu, s, opts);
  const params = attentionParams(s, mask, opts);
  // Without a mask the kernels never read key_valid; q fills the slot (read-only there too).
  const keyValid = mask.valid?.tensor ?? q;
  const stats = gpu.empty([s.batch, s.nq, s.tq, 2], "f32", `${op}.stats(${q.name})`);
  gpu.dispatch({
    kernel: { name: "attention", code, entry: "attention_backward_stats" },
    params,
    bindings: [null, null, null, null, out, lse, dOut, stats],
    workgroups: [Math.ceil(s.tq / STATS_WG), s.nq, s.batch],
  });
  const dq = gpu.empty(q.shape, "f32", `${op}.dq(${q.name})`);
  gpu.dispatch({
    kernel: { name: "attention", code, entry: "attention_backward_dq" },
    params,
    bindings: [q, k, v, keyValid, null, null, dOut, stats, dq],
    workgroups: [Math.ceil(s.tq / BLOCK_ROWS), s.nq, s.batch],
  });
  const dk = gpu.empty(k.shape, "f32", `${op}.dk(${k.name})`);
  const dv = gpu.empty(v.shape, "f32", `${op}.dv(${v.name})`);
  gpu.dispatch({
    kernel: { name: "attention", code, entry: "attention_backward_dkv" },
    params,
    bindings: [q, k, v, keyValid, null, null, dOut, stats, null, dk, dv],
    workgroups: [Math.ceil(s.tk / BLOCK_ROWS), s.nkv, s.batch],
  });
  stats.destroy();
  if (mask.valid?.owned) mask.valid.tensor.destroy();
  return { dq, dk, dv };
}
