import assert from "node:assert/strict";
import {
  attention,
  ATTENTION_EMPTY_LSE,
  attentionBackward,
  type AttentionOptions,
  attentionWithStats,
} from "../../src/ops/attention.ts";
import {
  attentionBackwardRef,
  attentionRef,
  type AttentionRefShape,
} from "../../src/ops/attention_ref.ts";
import { Rng } from "../../src/util/rng.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";
import { dot, numericGrad } from "./finite_diff.ts";

interface Case {
  what: string;
  batch: number;
  tq: number;
  tk: number;
  hd: number;
  opts: Omit<AttentionOptions, "keyMask" | "keyLengths"> & {
    keyLengths?: number[];
    keyMask?: Uint32Array;
  };
}

/** lse rows with no visible key must hold the sentinel exactly; the rest are compared by NMSE. */
function assertLse(expected: Float64Array, actual: Float32Array, what: string): void {
  const real: number[] = [];
  const got: number[] = [];
  expected.forEach((e, i) => {
    if (e === ATTENTION_EMPTY_LSE) {
      assert.equal(actual[i], ATTENTION_EMPTY_LSE, `${what}: row ${i} has no visible key`);
    } else {
      real.push(e);
      got.push(actual[i]);
    }
  });
  assertNmse(real, got, 1e-7, `${what} lse`);
}

function randomMask(batch: number, tk: number, seed: number): Uint32Array {
  const u = new Rng(seed);
  const mask = Uint32Array.from({ length: batch * tk }, () => (u.next() < 0.7 ? 1 : 0));
  mask.fill(0, tk, 2 * tk); // batch row 1 sees no key at all
  return mask;
}

function refShape(c: Case): AttentionRefShape {
  const numHeads = c.opts.numHeads;
  const numKvHeads = c.opts.numKvHeads ?? numHeads;
  return { batch: c.batch, tq: c.tq, tk: c.tk, numHeads, numKvHeads, headDim: c.hd };
}

const cases: Case[] = [
  {
    what: "GQA hd 8, causal with padding (one row fully padded)",
    batch: 3,
    tq: 11,
    tk: 11,
    hd: 8,
    opts: { numHeads: 4, numKvHeads: 2, causal: true, keyLengths: [11, 6, 0] },
  },
  {
    what: "hd 12, non-causal with a general key mask",
    batch: 3,
    tq: 7,
    tk: 77,
    hd: 12,
    opts: { numHeads: 3, keyMask: randomMask(3, 77, 9) },
  },
  {
    what: "GQA hd 24, causal, custom scale",
    batch: 3,
    tq: 77,
    tk: 77,
    hd: 24,
    opts: { numHeads: 4, numKvHeads: 2, causal: true, scale: 0.31 },
  },
  {
    what: "hd 128, resampler keys (padded x then always-visible latents)",
    batch: 2,
    tq: 77,
    tk: 333,
    hd: 128,
    opts: { numHeads: 2, keyLengths: [256, 13], alwaysVisibleFrom: 256 },
  },
  {
    what: "GQA hd 24, causal with padding, 333 tokens",
    batch: 2,
    tq: 333,
    tk: 333,
    hd: 24,
    opts: { numHeads: 4, numKvHeads: 2, causal: true, keyLengths: [333, 150] },
  },
];

Deno.test("attention matches the reference on odd shapes, GQA and masks", async () => {
  const gpu = await testGpu();
  const results = [];
  for (const [n, c] of cases.entries()) {
    const nq = c.opts.numHeads;
    const nkv = c.opts.numKvHeads ?? nq;
    const q = randn(c.batch * c.tq * nq * c.hd, 10 * n + 1);
    const k = randn(c.batch * c.tk * nkv * c.hd, 10 * n + 2);
    const v = randn(c.batch * c.tk * nkv * c.hd, 10 * n + 3);
    const tq = gpu.upload(q, [c.batch, c.tq, nq * c.hd], "f32", "q");
    const tk = gpu.upload(k, [c.batch, c.tk, nkv * c.hd], "f32", "k");
    const tv = gpu.upload(v, [c.batch, c.tk, nkv * c.hd], "f32", "v");
    const got = attentionWithStats(gpu, tq, tk, tv, c.opts);
    const ref = attentionRef(q, k, v, refShape(c), c.opts);
    results.push({ c, got, ref, inputs: [tq, tk, tv] });
  }
  const read = await gpu.readAll(results.flatMap((r) => [r.got.out, r.got.lse])) as Float32Array[];
  results.forEach(({ c, got, ref, inputs }, n) => {
    assertNmse(ref.out, read[2 * n], 1e-7, c.what);
    assertLse(ref.lse, read[2 * n + 1], c.what);
    for (const t of [got.out, got.lse, ...inputs]) t.destroy();
  });
});

Deno.test("attention takes lengths as a tensor and writes into out", async () => {
  const gpu = await testGpu();
  const [batch, t, nq, hd] = [3, 13, 2, 12];
  const q = randn(batch * t * nq * hd, 71);
  const k = randn(batch * t * nq * hd, 72);
  const v = randn(batch * t * nq * hd, 73);
  const shape = [batch, t, nq * hd];
  const [tq, tk, tv] = [q, k, v].map((x, i) => gpu.upload(x, shape, "f32", "qkv"[i]));
  const lengths = gpu.upload(new Int32Array([5, 13, 9]), [batch], "i32", "lengths");
  const out = gpu.empty(shape, "f32", "out");
  const result = attention(gpu, tq, tk, tv, { numHeads: nq, keyLengths: lengths, out });
  assert.equal(result, out);
  const ref = attentionRef(q, k, v, {
    batch,
    tq: t,
    tk: t,
    numHeads: nq,
    numKvHeads: nq,
    headDim: hd,
  }, { keyLengths: [5, 13, 9] });
  assertNmse(ref.out, await gpu.read(out) as Float32Array, 1e-7, "tensor lengths");
  for (const x of [tq, tk, tv, lengths, out]) x.destroy();
});

Deno.test("attention rejects bad shapes and masks with clear errors", async () => {
  const gpu = await testGpu();
  const q = gpu.zeros([1, 5, 16], "f32", "q");
  const k = gpu.zeros([1, 7, 16], "f32", "k");
  assert.throws(() => attention(gpu, q, k, k, { numHeads: 2, causal: true }), /causal.*Tq 5, Tk 7/);
  assert.throws(() => attention(gpu, q, k, k, { numHeads: 3 }), /head_dim/);
  assert.throws(() => attention(gpu, q, k, k, { numHeads: 2, numKvHeads: 4 }), /multiple/);
  assert.throws(
    () => attention(gpu, q, k, k, { numHeads: 2, keyLengths: [8] }),
    /keyLengths\[0\] = 8 is outside \[0, 7\]/,
  );
  assert.throws(
    () => attention(gpu, q, k, k, { numHeads: 2, keyLengths: [3], alwaysVisibleFrom: 2 }),
    /outside \[0, 2\]/,
  );
  assert.throws(() => attention(gpu, q, k, k, { numHeads: 2, keyMask: [1, 0] }), /\[B, Tk\] mask/);
  const wide = gpu.zeros([1, 5, 2 * 136], "f32", "wide");
  assert.throws(
    () => attention(gpu, wide, wide, wide, { numHeads: 2 }),
    /multiple of 4 from 4 to 128/,
  );
  for (const t of [q, k, wide]) t.destroy();
});

const backwardCases: Case[] = [
  {
    what: "GQA 4/2 hd 8, causal with padding (one batch row fully padded)",
    batch: 3,
    tq: 37,
    tk: 37,
    hd: 8,
    opts: { numHeads: 4, numKvHeads: 2, causal: true, keyLengths: [37, 19, 0] },
  },
  {
    what: "resampler: 7 latent queries, 29 padded x keys then 7 always-visible latents, hd 8",
    batch: 3,
    tq: 7,
    tk: 36,
    hd: 8,
    opts: { numHeads: 2, keyLengths: [29, 11, 0], alwaysVisibleFrom: 29 },
  },
  {
    what: "GQA 6/2 hd 12, general key mask (one batch row sees nothing), custom scale",
    batch: 3,
    tq: 13,
    tk: 45,
    hd: 12,
    opts: { numHeads: 6, numKvHeads: 2, scale: 0.37, keyMask: randomMask(3, 45, 19) },
  },
  {
    what: "hd 128, causal",
    batch: 2,
    tq: 35,
    tk: 35,
    hd: 128,
    opts: { numHeads: 2, causal: true },
  },
];

/** Exact zeros where the reference is structurally zero (masked keys, empty query rows). */
function assertZerosWhere(expected: Float64Array, actual: Float32Array, what: string): void {
  expected.forEach((e, i) => {
    if (e === 0) assert.equal(actual[i], 0, `${what}: element ${i} must be exactly 0`);
  });
}

Deno.test("attentionBackward matches the float64 reference: GQA, masks, resampler, hd 128", async () => {
  const gpu = await testGpu();
  const results = backwardCases.map((c, n) => {
    const { numHeads: nq, numKvHeads: nkv } = refShape(c);
    const host = {
      q: randn(c.batch * c.tq * nq * c.hd, 100 * n + 1),
      k: randn(c.batch * c.tk * nkv * c.hd, 100 * n + 2),
      v: randn(c.batch * c.tk * nkv * c.hd, 100 * n + 3),
      dOut: randn(c.batch * c.tq * nq * c.hd, 100 * n + 4),
    };
    const q = gpu.upload(host.q, [c.batch, c.tq, nq * c.hd], "f32", "q");
    const k = gpu.upload(host.k, [c.batch, c.tk, nkv * c.hd], "f32", "k");
    const v = gpu.upload(host.v, [c.batch, c.tk, nkv * c.hd], "f32", "v");
    const dOut = gpu.upload(host.dOut, q.shape, "f32", "dOut");
    const { out, lse } = attentionWithStats(gpu, q, k, v, c.opts);
    const grads = attentionBackward(gpu, dOut, q, k, v, out, lse, c.opts);
    const ref = attentionBackwardRef(host.dOut, host.q, host.k, host.v, refShape(c), c.opts);
    return { c, grads, ref, tensors: [q, k, v, dOut, out, lse] };
  });
  const read = await gpu.readAll(
    results.flatMap(({ grads }) => [grads.dq, grads.dk, grads.dv]),
  ) as Float32Array[];
  results.forEach(({ c, grads, ref, tensors }, n) => {
    (["dq", "dk", "dv"] as const).forEach((name, g) => {
      assertNmse(ref[name], read[3 * n + g], 1e-7, `${c.what}: ${name}`);
      assertZerosWhere(ref[name], read[3 * n + g], `${c.what}: ${name}`);
    });
    for (const t of [grads.dq, grads.dk, grads.dv, ...tensors]) t.destroy();
  });
});

Deno.test("attentionBackwardRef agrees with finite differences of attentionRef", () => {
  const fdCases: Array<{ shape: AttentionRefShape; masks: Case["opts"] }> = [
    {
      shape: { batch: 3, tq: 4, tk: 4, numHeads: 4, numKvHeads: 2, headDim: 4 },
      masks: { numHeads: 4, causal: true, keyLengths: [4, 2, 0], scale: 0.8 },
    },
    {
      shape: { batch: 2, tq: 3, tk: 5, numHeads: 2, numKvHeads: 1, headDim: 4 },
      masks: { numHeads: 2, keyLengths: [1, 0], alwaysVisibleFrom: 2 },
    },
  ];
  fdCases.forEach(({ shape, masks }, n) => {
    const { batch, tq, tk, numHeads: nq, numKvHeads: nkv, headDim: hd } = shape;
    const q = randn(batch * tq * nq * hd, 200 + n);
    const k = randn(batch * tk * nkv * hd, 210 + n);
    const v = randn(batch * tk * nkv * hd, 220 + n);
    const dOut = randn(q.length, 230 + n);
    const loss = (x: ArrayLike<number>, y: ArrayLike<number>, z: ArrayLike<number>) =>
      dot(dOut, attentionRef(x, y, z, shape, masks).out);
    const grads = attentionBackwardRef(dOut, q, k, v, shape, masks);
    assertNmse(numericGrad((x) => loss(x, k, v), q), grads.dq, 1e-14, `case ${n} dq`);
    assertNmse(numericGrad((x) => loss(q, x, v), k), grads.dk, 1e-14, `case ${n} dk`);
    assertNmse(numericGrad((x) => loss(q, k, x), v), grads.dv, 1e-14, `case ${n} dv`);
  });
});

Deno.test("attentionBackward rejects a gradient or saved lse of the wrong size", async () => {
  const gpu = await testGpu();
  const q = gpu.zeros([2, 5, 16], "f32", "q");
  const wrong = gpu.zeros([2, 4, 16], "f32", "wrong");
  const lse = gpu.zeros([2, 2, 5], "f32", "lse");
  const opts = { numHeads: 2 };
  assert.throws(
    () => attentionBackward(gpu, wrong, q, q, q, q, lse, opts),
    /dOut 'wrong' \[2,4,16\] f32 must have 160 elements/,
  );
  assert.throws(
    () => attentionBackward(gpu, q, q, q, q, q, wrong, opts),
    /lse 'wrong'.*\[B, nq, Tq\]/,
  );
  for (const t of [q, wrong, lse]) t.destroy();
});
