/** attention (forward with stats, backward) and softmax (forward, backward), with their masks. */
import assert from "node:assert/strict";
import {
  attention,
  ATTENTION_EMPTY_LSE,
  attentionBackward,
  type AttentionOptions,
  attentionWithStats,
} from "../../../src/ops/attention.ts";
import {
  attentionBackwardRef,
  attentionRef,
  type AttentionRefMasks,
  type AttentionRefShape,
} from "../../../src/ops/attention_ref.ts";
import { softmax, softmaxBackward, type SoftmaxOptions } from "../../../src/ops/softmax.ts";
import {
  softmaxBackwardRef,
  softmaxRef,
  type SoftmaxRefOptions,
} from "../../../src/ops/softmax_ref.ts";
import type { Rng } from "../../../src/util/rng.ts";
import { assertNmse } from "../../helpers.ts";
import { type Draw, finiteDiffCase, gpuCase, type OpCheck, type Scope } from "../harness.ts";

/** Which keys a query sees; a random mask is drawn per case (batch row 1 sees no key at all). */
interface Masks extends Omit<AttentionRefMasks, "keyMask"> {
  keyMask?: "random";
  scale?: number;
}

interface AttentionSpec {
  batch: number;
  tq: number;
  tk: number;
  hd: number;
  numHeads: number;
  numKvHeads?: number;
  masks: Masks;
}

function randomMask(rng: Rng, batch: number, tk: number): Uint32Array {
  const mask = Uint32Array.from({ length: batch * tk }, () => (rng.next() < 0.7 ? 1 : 0));
  return mask.fill(0, tk, 2 * tk);
}

/** `attention 3x11x11 h4/2 hd8 causal lengths f32`: batch x Tq x Tk, heads, head dim, masks. */
function attentionName(op: string, s: AttentionSpec): string {
  const m = s.masks;
  const heads = s.numKvHeads ? `h${s.numHeads}/${s.numKvHeads}` : `h${s.numHeads}`;
  const flags = [
    m.causal ? "causal" : "",
    m.keyLengths ? "lengths" : "",
    m.alwaysVisibleFrom !== undefined ? `visible-from${m.alwaysVisibleFrom}` : "",
    m.keyMask ? "key-mask" : "",
    m.scale !== undefined ? `scale${m.scale}` : "",
  ].filter(Boolean);
  return [op, `${s.batch}x${s.tq}x${s.tk}`, heads, `hd${s.hd}`, ...flags, "f32"].join(" ");
}

interface AttentionHost {
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  dOut: Float32Array;
  keyMask?: Uint32Array;
}

function refShape(s: AttentionSpec): AttentionRefShape {
  const numKvHeads = s.numKvHeads ?? s.numHeads;
  return { batch: s.batch, tq: s.tq, tk: s.tk, numHeads: s.numHeads, numKvHeads, headDim: s.hd };
}

function attentionInputs(s: AttentionSpec) {
  const { batch, tq, tk, numHeads: nq, numKvHeads: nkv } = refShape(s);
  return (draw: Draw): AttentionHost => ({
    q: draw.randn(batch * tq * nq * s.hd),
    k: draw.randn(batch * tk * nkv * s.hd),
    v: draw.randn(batch * tk * nkv * s.hd),
    dOut: draw.randn(batch * tq * nq * s.hd),
    keyMask: s.masks.keyMask ? randomMask(draw.rng(), batch, tk) : undefined,
  });
}

type Options = Omit<AttentionOptions, "keyMask" | "keyLengths"> & AttentionRefMasks;

function options(s: AttentionSpec, h: AttentionHost): Options {
  const { keyMask: _, ...masks } = s.masks;
  return { ...masks, numHeads: s.numHeads, numKvHeads: s.numKvHeads, keyMask: h.keyMask };
}

function uploadQkv(scope: Scope, s: AttentionSpec, h: AttentionHost) {
  const { batch, tq, tk, numHeads: nq, numKvHeads: nkv } = refShape(s);
  return {
    q: scope.upload(h.q, [batch, tq, nq * s.hd], "f32", "q"),
    k: scope.upload(h.k, [batch, tk, nkv * s.hd], "f32", "k"),
    v: scope.upload(h.v, [batch, tk, nkv * s.hd], "f32", "v"),
  };
}

/** lse rows with no visible key must hold the sentinel exactly; the rest are compared by NMSE. */
function assertLse(expected: Float64Array, actual: Float32Array): void {
  const real: number[] = [];
  const got: number[] = [];
  expected.forEach((e, i) => {
    if (e === ATTENTION_EMPTY_LSE) {
      assert.equal(actual[i], ATTENTION_EMPTY_LSE, `lse row ${i} has no visible key`);
    } else {
      real.push(e);
      got.push(actual[i]);
    }
  });
  assertNmse(real, got, 1e-7, "lse");
}

function attentionCase(s: AttentionSpec): OpCheck {
  return gpuCase<AttentionHost>({
    name: attentionName("attention", s),
    inputs: attentionInputs(s),
    gpu(scope, h) {
      const { q, k, v } = uploadQkv(scope, s, h);
      const { out, lse } = attentionWithStats(scope.gpu, q, k, v, options(s, h));
      return { out, lse };
    },
    reference: (h) => attentionRef(h.q, h.k, h.v, refShape(s), options(s, h)),
    nmse: { out: 1e-7 },
    check: (got, _, expected) => assertLse(expected.lse as Float64Array, got.lse),
  });
}

function attentionBackwardCase(s: AttentionSpec): OpCheck {
  return gpuCase<AttentionHost>({
    name: attentionName("attentionBackward", s),
    inputs: attentionInputs(s),
    gpu(scope, h) {
      const { q, k, v } = uploadQkv(scope, s, h);
      const dOut = scope.upload(h.dOut, q.shape, "f32", "dOut");
      const { out, lse } = attentionWithStats(scope.gpu, q, k, v, options(s, h));
      scope.own(out);
      scope.own(lse);
      const { dq, dk, dv } = attentionBackward(scope.gpu, dOut, q, k, v, out, lse, options(s, h));
      return { dq, dk, dv };
    },
    reference(h) {
      const { dq, dk, dv } = attentionBackwardRef(
        h.dOut,
        h.q,
        h.k,
        h.v,
        refShape(s),
        options(s, h),
      );
      return { dq, dk, dv };
    },
    nmse: 1e-7,
    // Masked keys and empty query rows are structurally zero.
    exactZeros: ["dq", "dk", "dv"],
  });
}

const ATTENTION: AttentionSpec[] = [
  { batch: 1, tq: 1, tk: 1, hd: 4, numHeads: 1, masks: {} },
  { batch: 1, tq: 33, tk: 65, hd: 8, numHeads: 3, masks: {} },
  {
    batch: 3,
    tq: 11,
    tk: 11,
    hd: 8,
    numHeads: 4,
    numKvHeads: 2,
    masks: { causal: true, keyLengths: [11, 6, 0] },
  },
  { batch: 3, tq: 7, tk: 77, hd: 12, numHeads: 3, masks: { keyMask: "random" } },
  {
    batch: 3,
    tq: 77,
    tk: 77,
    hd: 24,
    numHeads: 4,
    numKvHeads: 2,
    masks: { causal: true, scale: 0.31 },
  },
  // Resampler keys: padded x, then always-visible latents.
  {
    batch: 2,
    tq: 77,
    tk: 333,
    hd: 128,
    numHeads: 2,
    masks: { keyLengths: [256, 13], alwaysVisibleFrom: 256 },
  },
  {
    batch: 2,
    tq: 333,
    tk: 333,
    hd: 24,
    numHeads: 4,
    numKvHeads: 2,
    masks: { causal: true, keyLengths: [333, 150] },
  },
];

const ATTENTION_BACKWARD: AttentionSpec[] = [
  { batch: 1, tq: 1, tk: 1, hd: 4, numHeads: 1, masks: {} },
  {
    batch: 3,
    tq: 37,
    tk: 37,
    hd: 8,
    numHeads: 4,
    numKvHeads: 2,
    masks: { causal: true, keyLengths: [37, 19, 0] },
  },
  // Resampler: 7 latent queries, 29 padded x keys then 7 always-visible latents.
  {
    batch: 3,
    tq: 7,
    tk: 36,
    hd: 8,
    numHeads: 2,
    masks: { keyLengths: [29, 11, 0], alwaysVisibleFrom: 29 },
  },
  {
    batch: 3,
    tq: 13,
    tk: 45,
    hd: 12,
    numHeads: 6,
    numKvHeads: 2,
    masks: { scale: 0.37, keyMask: "random" },
  },
  { batch: 2, tq: 35, tk: 35, hd: 128, numHeads: 2, masks: { causal: true } },
];

/** The float64 backward against central differences, at shapes small enough for them. */
const ATTENTION_FINITE_DIFF: AttentionSpec[] = [
  {
    batch: 3,
    tq: 4,
    tk: 4,
    hd: 4,
    numHeads: 4,
    numKvHeads: 2,
    masks: { causal: true, keyLengths: [4, 2, 0], scale: 0.8 },
  },
  {
    batch: 2,
    tq: 3,
    tk: 5,
    hd: 4,
    numHeads: 2,
    numKvHeads: 1,
    masks: { keyLengths: [1, 0], alwaysVisibleFrom: 2 },
  },
];

interface SoftmaxSpec {
  shape: [number, number, number, number];
  scale?: number;
  causal?: boolean;
  causalOffset?: number;
  keyLengths?: number[];
  /** Resampler-style mask: x keys padded after lengths[b] - 77, the last 77 always seen. */
  keyMask?: number[];
}

function softmaxName(op: string, s: SoftmaxSpec): string {
  const flags = [
    s.causal ? "causal" : "",
    s.causalOffset !== undefined ? `offset${s.causalOffset}` : "",
    s.keyLengths ? "lengths" : "",
    s.keyMask ? "key-mask" : "",
    s.scale !== undefined ? `scale${+s.scale.toPrecision(3)}` : "",
  ].filter(Boolean);
  return [op, s.shape.join("x"), ...flags, "f32"].join(" ");
}

function resamplerMask(lengths: number[], tk: number): Int32Array {
  const mask = new Int32Array(lengths.length * tk);
  lengths.forEach((length, b) => {
    for (let j = 0; j < tk; j++) mask[b * tk + j] = j < length - 77 || j >= 256 ? 1 : 0;
  });
  return mask.fill(0, 2 * tk); // batch row 2 hides every key: zeros, not NaN
}

function softmaxOptions(scope: Scope, s: SoftmaxSpec): SoftmaxOptions {
  const [batch, , , tk] = s.shape;
  return {
    scale: s.scale,
    causal: s.causal,
    causalOffset: s.causalOffset,
    keyLengths: s.keyLengths &&
      scope.upload(Uint32Array.from(s.keyLengths), [batch], "u32", "lengths"),
    keyMask: s.keyMask && scope.upload(resamplerMask(s.keyMask, tk), [batch, tk], "i32", "mask"),
  };
}

function softmaxRefOptions(s: SoftmaxSpec): SoftmaxRefOptions {
  return {
    scale: s.scale === undefined ? undefined : Math.fround(s.scale),
    causal: s.causal,
    causalOffset: s.causalOffset,
    keyLengths: s.keyLengths,
    keyMask: s.keyMask && resamplerMask(s.keyMask, s.shape[3]),
  };
}

/** Row sums of the probabilities match the reference's (1, or 0 for a row with no key). */
function assertRowSums(got: Float32Array, expected: ArrayLike<number>, tk: number): void {
  for (let row = 0; row < got.length / tk; row++) {
    let sum = 0;
    let refSum = 0;
    for (let j = row * tk; j < (row + 1) * tk; j++) {
      sum += got[j];
      refSum += expected[j];
    }
    assert.ok(Math.abs(sum - refSum) < 1e-5, `row ${row} sums to ${sum}, ${refSum} expected`);
  }
}

function softmaxCase(s: SoftmaxSpec): OpCheck {
  const n = s.shape.reduce((a, b) => a * b);
  const tk = s.shape[3];
  return gpuCase<{ scores: Float32Array }>({
    name: softmaxName("softmax", s),
    // Large scores with a per-row offset: without max subtraction exp would overflow.
    inputs: (draw) => ({
      scores: draw.randn(n, 8).map((v, i) => v + 400 * Math.sin(Math.floor(i / tk))),
    }),
    gpu: (scope, h) => ({
      p: softmax(
        scope.gpu,
        scope.upload(h.scores, s.shape, "f32", "scores"),
        softmaxOptions(scope, s),
      ),
    }),
    reference: (h) => ({ p: softmaxRef(h.scores, s.shape, softmaxRefOptions(s)) }),
    nmse: 1e-10,
    exactZeros: ["p"],
    check: (got, _, expected) => assertRowSums(got.p, expected.p, tk),
  });
}

function softmaxBackwardCase(s: SoftmaxSpec): OpCheck {
  const n = s.shape.reduce((a, b) => a * b);
  return gpuCase<{ scores: Float32Array; dP: Float32Array }>({
    name: softmaxName("softmaxBackward", s),
    inputs: (draw) => ({ scores: draw.randn(n, 3), dP: draw.randn(n) }),
    gpu(scope, h) {
      const probs = scope.own(
        softmax(
          scope.gpu,
          scope.upload(h.scores, s.shape, "f32", "scores"),
          softmaxOptions(scope, s),
        ),
      );
      const dP = scope.upload(h.dP, s.shape, "f32", "dP");
      return { dScores: softmaxBackward(scope.gpu, dP, probs, { scale: s.scale }) };
    },
    reference(h) {
      const probs = softmaxRef(h.scores, s.shape, softmaxRefOptions(s));
      return { dScores: softmaxBackwardRef(h.dP, probs, s.shape[3], s.scale ?? 1) };
    },
    nmse: 1e-12,
    // Hidden keys and empty rows get 0 (-0 is a fine zero: 0 * negative).
    exactZeros: ["dScores"],
  });
}

const SOFTMAX: SoftmaxSpec[] = [
  { shape: [1, 1, 1, 1] },
  { shape: [1, 1, 3, 1] },
  { shape: [1, 3, 7, 65] },
  { shape: [2, 3, 5, 333] },
  { shape: [1, 3, 7, 37], scale: 1 / Math.sqrt(24) },
  // The scale applies before the max: a negative scale flips which score is largest.
  { shape: [1, 1, 3, 129], scale: -2 },
  { shape: [2, 3, 77, 77], causal: true },
  { shape: [1, 5, 5, 7], causal: true, causalOffset: 2 },
  // Query 0 sees no key: its row must be zeros.
  { shape: [1, 3, 5, 5], causal: true, causalOffset: -1 },
  { shape: [3, 5, 9, 333], keyMask: [256 + 77, 101, 0], scale: 0.125 },
  { shape: [3, 3, 7, 333], keyLengths: [256 + 77, 101, 0] },
  { shape: [3, 3, 11, 11], causal: true, keyLengths: [11, 4, 0] },
];

const SOFTMAX_BACKWARD: SoftmaxSpec[] = [
  { shape: [1, 1, 1, 1] },
  { shape: [1, 3, 7, 33] },
  { shape: [2, 3, 5, 333] },
  { shape: [3, 3, 11, 11], causal: true, keyLengths: [11, 4, 0], scale: 0.125 },
];

/** Key lengths given as a tensor, the result written into a given out. */
const lengthsTensorSpec: AttentionSpec = {
  batch: 3,
  tq: 13,
  tk: 13,
  hd: 12,
  numHeads: 2,
  masks: { keyLengths: [5, 13, 9] },
};

export const ATTENTION_CHECKS: OpCheck[] = [
  ...ATTENTION.map(attentionCase),
  gpuCase<AttentionHost>({
    name: attentionName("attention", lengthsTensorSpec).replace("lengths", "lengths-tensor out"),
    inputs: attentionInputs(lengthsTensorSpec),
    gpu(scope, h) {
      const { q, k, v } = uploadQkv(scope, lengthsTensorSpec, h);
      const keyLengths = scope.upload(new Int32Array([5, 13, 9]), [3], "i32", "lengths");
      const out = scope.own(scope.gpu.empty(q.shape, "f32", "out"));
      const result = attention(scope.gpu, q, k, v, { numHeads: 2, keyLengths, out });
      assert.equal(result, out);
      return { out };
    },
    reference: (h) => ({
      out:
        attentionRef(h.q, h.k, h.v, refShape(lengthsTensorSpec), options(lengthsTensorSpec, h)).out,
    }),
    nmse: 1e-7,
  }),
  ...ATTENTION_BACKWARD.map(attentionBackwardCase),
  ...ATTENTION_FINITE_DIFF.map((s) =>
    finiteDiffCase<AttentionHost>({
      name: attentionName("attentionBackward", s).replace(/f32$/, "f64 fd"),
      inputs: attentionInputs(s),
      wrt: ["q", "k", "v"],
      forward: (h) => attentionRef(h.q, h.k, h.v, refShape(s), options(s, h)).out,
      backward: (h, dOut) => {
        const { dq: q, dk: k, dv: v } = attentionBackwardRef(
          dOut,
          h.q,
          h.k,
          h.v,
          refShape(s),
          options(s, h),
        );
        return { q, k, v };
      },
    })
  ),
  ...SOFTMAX.map(softmaxCase),
  ...SOFTMAX_BACKWARD.map(softmaxBackwardCase),
  finiteDiffCase<{ scores: Float32Array }>({
    name: "softmaxBackward 1x2x3x5 causal offset1 scale0.7 f64 fd",
    inputs: (draw) => ({ scores: draw.randn(30, 2) }),
    wrt: ["scores"],
    forward: (h) =>
      softmaxRef(h.scores, [1, 2, 3, 5], { scale: 0.7, causal: true, causalOffset: 1 }),
    backward: (h, dP) => ({
      scores: softmaxBackwardRef(
        dP,
        softmaxRef(h.scores, [1, 2, 3, 5], { scale: 0.7, causal: true, causalOffset: 1 }),
        5,
        0.7,
      ),
    }),
  }),
];
