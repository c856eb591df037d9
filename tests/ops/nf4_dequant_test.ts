import assert from "node:assert/strict";
import type { Gpu } from "../../src/gpu/device.ts";
import { nf4Dequantize, nf4Quantize } from "../../src/ops/nf4.ts";
import {
  DEQUANTIZE_MIN_ROWS,
  type Nf4Decode,
  nf4DecodeWeight,
  nf4DecodeWeightTransposed,
  nf4Matmul,
  nf4MatmulInputGrad,
  type Nf4Weight,
  uploadNf4Weight,
} from "../../src/ops/nf4_matmul.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

/** code * absmax rounded once to f16 (round to nearest even), as raw bits. */
function f16Bits(values: Float32Array): Uint16Array {
  return new Uint16Array(Float16Array.from(values).buffer);
}

function upload(
  gpu: Gpu,
  values: Float32Array,
  n: number,
  k: number,
  blockSize = 64,
  decode: Nf4Decode = "f16",
) {
  const q = nf4Quantize(values, blockSize);
  const w = uploadNf4Weight(gpu, q, n, k, `w${n}x${k}`, blockSize, decode);
  return { w, exact: nf4Dequantize(q.packed, q.absmax, n * k, blockSize) };
}

function destroy(w: Nf4Weight): void {
  w.packed.destroy();
  w.absmax.destroy();
}

Deno.test("nf4DecodeWeight under decode f16 writes code * absmax rounded once to f16, blocks straddling words included", async () => {
  const gpu = await testGpu();
  // [n, k, block]: rows not a multiple of the block, and blocks of 6 and 10 that start
  // mid-word (per-element scales); a zero block (absmax 0) decodes to zeros.
  for (const [n, k, block] of [[37, 24, 64], [9, 40, 6], [5, 16, 10], [3, 200, 64]]) {
    const values = randn(n * k, n + k, 0.05);
    if (n === 3) values.fill(0, 64, 128);
    const { w, exact } = upload(gpu, values, n, k, block);
    assert.equal(w.decodesToF16, true);
    const decoded = nf4DecodeWeight(gpu, w);
    assert.equal(decoded.dtype, "f16");
    assert.deepEqual(decoded.shape, [n, k]);
    const got = await gpu.read(decoded) as Uint16Array;
    assert.deepEqual(got, f16Bits(exact), `[${n}, ${k}] in blocks of ${block}`);
    decoded.destroy();
    destroy(w);
  }
});

Deno.test("nf4DecodeWeightTransposed writes the exact f32 code * absmax as [K, N], rows straddling words included", async () => {
  const gpu = await testGpu();
  // [n, k, block]: K a multiple of 8, K = 12 (words straddle rows), blocks of 6 mid-word, and
  // 5 x 37 elements, which it refuses (not a multiple of 8). With N a multiple of 4 and K of 8
  // the vec4 entry runs (4 rows per invocation): [12, 24], [20, 40] in blocks of 6, [36, 72].
  const cases = [[37, 24, 64], [10, 12, 64], [9, 40, 6], [12, 24, 64], [20, 40, 6], [36, 72, 64]];
  for (const [n, k, block] of cases) {
    const { w, exact } = upload(gpu, randn(n * k, n * k, 0.05), n, k, block, "f32");
    const decoded = nf4DecodeWeightTransposed(gpu, w);
    assert.deepEqual(decoded.shape, [k, n]);
    const expected = new Float32Array(n * k);
    for (let row = 0; row < n; row++) {
      for (let col = 0; col < k; col++) expected[col * n + row] = exact[row * k + col];
    }
    assert.deepEqual(await gpu.readF32(decoded), expected, `[${n}, ${k}] in blocks of ${block}`);
    decoded.destroy();
    destroy(w);
  }
  const { w } = upload(gpu, randn(5 * 37, 1, 0.05), 5, 37, 64, "f32");
  assert.throws(() => nf4DecodeWeightTransposed(gpu, w), /5 x 37 is not a multiple of 8/);
  destroy(w);
});

Deno.test("nf4DecodeWeight writes the exact f32 code * absmax by default, word by word or not", async () => {
  const gpu = await testGpu();
  // [n, k, block]: whole words in a block, blocks of 6 starting mid-word, and 5 x 37 elements
  // (not a multiple of 8: the element-wise kernel).
  for (const [n, k, block] of [[37, 24, 64], [9, 40, 6], [5, 37, 64]]) {
    const { w, exact } = upload(gpu, randn(n * k, n + k, 0.05), n, k, block, "f32");
    assert.equal(w.decodesToF16, false);
    const decoded = nf4DecodeWeight(gpu, w);
    assert.equal(decoded.dtype, "f32");
    assert.deepEqual(await gpu.read(decoded), exact, `[${n}, ${k}] in blocks of ${block}`);
    decoded.destroy();
    destroy(w);
  }
});

Deno.test("decode f16 keeps f32 where f16 would overflow, go subnormal, or the count is odd", async () => {
  const gpu = await testGpu();
  const big = randn(8 * 16, 1, 0.05);
  big[5] = 7e4; // absmax over f16's largest value, 65504
  const tiny = randn(8 * 16, 2, 0.05);
  tiny.fill(1e-4, 64, 128); // absmax 1e-4: code 0.0796 x 1e-4 is below 2^-14
  const cases = [
    { what: "absmax over 65504", ...upload(gpu, big, 8, 16) },
    { what: "absmax too small for normal f16", ...upload(gpu, tiny, 8, 16) },
    { what: "5 x 37 elements", ...upload(gpu, randn(5 * 37, 3, 0.05), 5, 37) },
  ];
  assert.deepEqual(cases.map((c) => c.w.decodesToF16), [false, false, true]);
  for (const { what, w, exact } of cases) {
    const decoded = nf4DecodeWeight(gpu, w);
    assert.equal(decoded.dtype, "f32", what);
    assert.deepEqual(await gpu.read(decoded), exact, what);
    decoded.destroy();
    destroy(w);
  }
});

Deno.test("nf4Matmul and nf4MatmulInputGrad with many rows use the f16-decoded weight under decode f16", async () => {
  const gpu = await testGpu();
  // [m, k, n]: odd row counts from DEQUANTIZE_MIN_ROWS on, K a multiple of 8 (the 16-bit
  // matmul's packed loads) and not (68: pairs of f16 values per load).
  for (const [m, k, n] of [[DEQUANTIZE_MIN_ROWS + 3, 192, 65], [DEQUANTIZE_MIN_ROWS, 68, 26]]) {
    const { w, exact } = upload(gpu, randn(n * k, m, 0.05), n, k);
    const weight = Float64Array.from(Float16Array.from(exact));
    const x = randn(m * k, 1);
    const dy = randn(m * n, 2);
    const y = new Float64Array(m * n);
    const dx = new Float64Array(m * k);
    for (let r = 0; r < m; r++) {
      for (let c = 0; c < n; c++) {
        for (let i = 0; i < k; i++) {
          y[r * n + c] += x[r * k + i] * weight[c * k + i];
          dx[r * k + i] += dy[r * n + c] * weight[c * k + i];
        }
      }
    }
    const tx = gpu.upload(x, [m, k], "f32", "x");
    const tdy = gpu.upload(dy, [m, n], "f32", "dy");
    const outs = [nf4Matmul(gpu, tx, w), nf4MatmulInputGrad(gpu, tdy, w)];
    const [gotY, gotDx] = await gpu.readAll(outs) as Float32Array[];
    // f32 accumulation against float64: far tighter than the f16 rounding of W (~4e-8 NMSE),
    // so a kernel that used the exact f32 weights would fail here.
    assertNmse(y, gotY, 1e-11, `nf4Matmul [${m}, ${k}] x [${n}, ${k}]^T`);
    assertNmse(dx, gotDx, 1e-11, `nf4MatmulInputGrad [${m}, ${n}] x [${n}, ${k}]`);
    for (const t of [tx, tdy, ...outs]) t.destroy();
    destroy(w);
  }
});
