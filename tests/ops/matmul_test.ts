import assert from "node:assert/strict";
import type { Gpu } from "../../src/gpu/device.ts";
import type { Tensor } from "../../src/gpu/tensor.ts";
import {
  bf16ArrayToF32,
  f16ArrayToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
} from "../../src/io/dtype.ts";
import { matmul, type MatmulOptions, type MatmulTiling } from "../../src/ops/matmul.ts";
import { matmulRef, type MatmulRefShape } from "../../src/ops/matmul_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

/** A product's shape and layouts (as matmulRef takes them), with what the GPU run adds. */
interface Case extends Omit<MatmulRefShape, "bias" | "accumulateInto"> {
  what: string;
  bias?: boolean;
  /** Accumulate into an `out` that already holds random values. */
  accumulate?: boolean;
  wType?: "f32" | "f16" | "bf16";
  /** x's shape when it is not the plain [M, K] / [K, M] / [B, ., .] one. */
  xShape?: number[];
  tiling?: MatmulTiling;
}

interface Run {
  what: string;
  y: Tensor;
  expected: Float32Array;
  bound: number;
  owned: Tensor[];
}

/** A seed of the case itself (FNV-1a of its description), so no case depends on which ran before. */
function caseSeed(c: Case): number {
  let h = 0x811c9dc5;
  for (const ch of JSON.stringify(c)) h = Math.imul(h ^ ch.charCodeAt(0), 0x01000193);
  return h >>> 8;
}

/** Records one product on the GPU and computes its reference on the weights as stored. */
function record(gpu: Gpu, c: Case): Run {
  const { m, n, k, batch = 1, batchedW = false, transposeX = false, transposeW = true } = c;
  let seed = caseSeed(c);
  const wType = c.wType ?? "f32";
  const x = randn(batch * m * k, seed++);
  let w = randn((batchedW ? batch : 1) * n * k, seed++, 0.5);
  const bias = c.bias ? randn(n, seed++) : undefined;
  const xShape = c.xShape ??
    (batchedW ? [batch, ...(transposeX ? [k, m] : [m, k])] : transposeX ? [k, m] : [m, k]);
  const wDims = transposeW ? [n, k] : [k, n];
  const wShape = batchedW ? [batch, ...wDims] : wDims;
  const tx = gpu.upload(x, xShape, "f32", "x");
  let tw: Tensor;
  if (wType === "f32") {
    tw = gpu.upload(w, wShape, "f32", "w");
  } else {
    const bits = wType === "f16" ? f32ArrayToF16(w) : f32ArrayToBf16(w);
    w = wType === "f16" ? f16ArrayToF32(bits) : bf16ArrayToF32(bits);
    tw = gpu.upload(bits, wShape, wType, "w");
  }
  const tb = bias ? gpu.upload(bias, [n], "f32", "bias") : undefined;
  const into = c.accumulate ? randn(batch * m * n, seed++) : undefined;
  const out = into ? gpu.upload(into, [batch * m * n], "f32", "out") : undefined;
  const options: MatmulOptions = {
    transposeX,
    transposeW,
    bias: tb,
    tiling: c.tiling,
    alpha: c.alpha,
    out,
    accumulate: c.accumulate,
  };
  const y = matmul(gpu, tx, tw, options);
  const expected = matmulRef(x, w, {
    m,
    n,
    k,
    batch,
    batchedW,
    transposeX,
    transposeW,
    bias,
    alpha: c.alpha,
    accumulateInto: into,
  });
  const owned = [tx, tw, y, ...(tb ? [tb] : [])];
  // The reference uses the rounded weights, so 16-bit weights only add f32 rounding too.
  return { what: c.what, y, expected, bound: 1e-7, owned };
}

async function checkAll(gpu: Gpu, cases: Case[]): Promise<void> {
  const runs = cases.map((c) => record(gpu, c));
  const got = await gpu.readAll(runs.map((r) => r.y)) as Float32Array[];
  runs.forEach((r, i) => {
    assertNmse(r.expected, got[i], r.bound, r.what);
    for (const t of r.owned) t.destroy();
  });
}

Deno.test("matmul: Linear layout (y = x Wᵀ + b) on odd and vector-aligned shapes", async () => {
  const gpu = await testGpu();
  await checkAll(gpu, [
    { what: "odd K (scalar loads)", m: 37, n: 29, k: 53 },
    { what: "odd K with bias", m: 37, n: 29, k: 53, bias: true },
    { what: "K % 4 == 0 (vec4 loads), partial last k-step", m: 37, n: 29, k: 52, bias: true },
    { what: "leading dims flatten into M", m: 3 * 7, n: 29, k: 52, xShape: [3, 7, 52] },
    { what: "small M tile", m: 5, n: 33, k: 20 },
  ]);
});

Deno.test("matmul: y = x W (transposeW false) and y = xᵀ W (transposeX), as backward uses", async () => {
  const gpu = await testGpu();
  await checkAll(gpu, [
    { what: "x W, odd N", m: 37, n: 29, k: 53, transposeW: false },
    { what: "x W, N % 4 == 0 with an edge tile", m: 37, n: 36, k: 52, transposeW: false },
    { what: "xᵀ W (dW = dYᵀ X), odd M", m: 37, n: 29, k: 53, transposeX: true, transposeW: false },
    { what: "xᵀ W, M % 4 == 0", m: 36, n: 40, k: 21, transposeX: true, transposeW: false },
    { what: "xᵀ Wᵀ", m: 36, n: 29, k: 21, transposeX: true, bias: true },
  ]);
});

Deno.test("matmul: alpha scales the product, accumulate adds it to out (LoRA and gradients)", async () => {
  const gpu = await testGpu();
  await checkAll(gpu, [
    { what: "alpha", m: 37, n: 29, k: 53, alpha: -0.37 },
    { what: "alpha with bias", m: 37, n: 29, k: 52, alpha: 2, bias: true },
    { what: "accumulate, x W", m: 37, n: 29, k: 53, transposeW: false, accumulate: true },
    {
      what: "accumulate alpha, xᵀ W (a gradient into its buffer)",
      m: 36,
      n: 29,
      k: 21,
      transposeX: true,
      transposeW: false,
      alpha: 0.5,
      accumulate: true,
    },
  ]);
  const x = gpu.zeros([3, 4], "f32");
  assert.throws(() => matmul(gpu, x, x, { accumulate: true }), /accumulate needs an 'out'/);
  x.destroy();
});

Deno.test("matmul: batched [B, M, K] x [B, ., .] in every layout", async () => {
  const gpu = await testGpu();
  const base = { batch: 3, batchedW: true, m: 37, n: 29 };
  await checkAll(gpu, [
    { what: "batched x Wᵀ", ...base, k: 52 },
    { what: "batched x W", ...base, k: 53, transposeW: false },
    { what: "batched xᵀ W", ...base, k: 53, transposeX: true, transposeW: false },
    { what: "batched xᵀ Wᵀ with bias", ...base, k: 52, transposeX: true, bias: true },
  ]);
});

Deno.test("matmul: f16 and bf16 weights match the reference on the rounded weights", async () => {
  const gpu = await testGpu();
  const cases: Case[] = [];
  for (const wType of ["f16", "bf16"] as const) {
    cases.push(
      { what: `${wType} Wᵀ, odd K (half-word loads)`, m: 37, n: 29, k: 53, wType, bias: true },
      { what: `${wType} Wᵀ, K % 8 == 0 (vec4<u32> loads)`, m: 37, n: 29, k: 56, wType },
      { what: `${wType} Wᵀ, K even (u32 loads)`, m: 37, n: 29, k: 54, wType },
      { what: `${wType} W, odd N`, m: 37, n: 29, k: 21, wType, transposeW: false },
      { what: `${wType} W, N % 8 == 0`, m: 37, n: 40, k: 21, wType, transposeW: false },
      { what: `${wType} W, N even`, m: 37, n: 30, k: 21, wType, transposeW: false },
    );
  }
  await checkAll(gpu, cases);
});

Deno.test("matmul: the small GPU tile computes the same products", async () => {
  const gpu = await testGpu();
  const tiling = { rows: 4, cols: 4, workgroup: 64 };
  await checkAll(gpu, [
    { what: "4x4 tile, x Wᵀ", m: 37, n: 29, k: 52, bias: true, tiling },
    { what: "4x4 tile, bf16 x W", m: 37, n: 40, k: 21, transposeW: false, wType: "bf16", tiling },
  ]);
});

Deno.test("matmul: out, zero-size products and argument errors", async () => {
  const gpu = await testGpu();
  const x = gpu.upload(randn(6, 1), [2, 3], "f32", "x");
  const w = gpu.upload(randn(12, 2), [4, 3], "f32", "w");
  const out = gpu.zeros([2, 4], "f32", "out");
  assert.equal(matmul(gpu, x, w, { out }), out);
  const expected = matmulRef(randn(6, 1), randn(12, 2), { m: 2, n: 4, k: 3 });
  assertNmse(expected, await gpu.readF32(out), 1e-7, "out");

  const empty = gpu.zeros([0, 3], "f32", "empty");
  assert.deepEqual(matmul(gpu, empty, w).shape, [0, 4]);

  assert.throws(
    () => matmul(gpu, x, x, { transposeW: false }),
    /x 'x' \[2,3\] has K = 3 but w 'x' \[2,3\] has K = 2/,
  );
  assert.throws(() => matmul(gpu, x, w, { transposeW: false }), /has K = 3 but w 'w' \[4,3\]/);
  const bias = gpu.zeros([3], "f32", "bias");
  assert.throws(() => matmul(gpu, x, w, { bias }), /bias 'bias' \[3\] f32 must have 4 elements/);
  const x3 = gpu.zeros([2, 2, 3], "f32", "x3");
  assert.throws(() => matmul(gpu, x3, w, { transposeX: true }), /transposeX/);
  const square = gpu.zeros([3, 3], "f32", "square");
  assert.throws(() => matmul(gpu, x, square, { out: x }), /shares its buffer/);
  for (const t of [x, w, out, empty, bias, x3, square]) t.destroy();
});
