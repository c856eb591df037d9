import assert from "node:assert/strict";
import {
  attention,
  ATTENTION_EMPTY_LSE,
  type AttentionOptions,
  attentionWithStats,
} from "../../src/ops/attention.ts";
import { attentionRef } from "../../src/ops/attention_ref.ts";
import { Rng } from "../../src/train/rng.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

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
function assertLse(expected: Float32Array, actual: Float32Array, what: string): void {
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
    const ref = attentionRef(q, k, v, {
      batch: c.batch,
      tq: c.tq,
      tk: c.tk,
      numHeads: nq,
      numKvHeads: nkv,
      headDim: c.hd,
    }, c.opts);
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
