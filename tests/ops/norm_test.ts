import assert from "node:assert/strict";
import { layerNorm, layerNormBackward, rmsNorm, rmsNormBackward } from "../../src/ops/norm.ts";
import { rmsNormRef } from "../../src/ops/norm_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

// Forward and backward on every shape, and the finite differences of the reference backward,
// are in ops_table_test.ts.

/** Weights around 1 like trained norms, so a swapped index shows. */
function normWeight(d: number, seed: number): Float32Array {
  return randn(d, seed, 0.3).map((v) => 1 + v);
}

Deno.test("rmsNorm covers more rows than one grid dimension holds", async () => {
  const gpu = await testGpu();
  const rows = gpu.limits.maxComputeWorkgroupsPerDimension + 3;
  const d = 3;
  const x = randn(rows * d, 11);
  const w = normWeight(d, 12);
  const tx = gpu.upload(x, [rows, d], "f32", "x");
  const tw = gpu.upload(w, [d], "f32", "w");
  const y = rmsNorm(gpu, tx, tw, 1e-6);
  assertNmse(rmsNormRef(x, w, 1e-6).y, await gpu.readF32(y), 1e-10, "rmsNorm many rows");
  for (const t of [tx, tw, y]) t.destroy();
});

Deno.test("norms reject mismatched shapes and in-place outputs with a clear message", async () => {
  const gpu = await testGpu();
  const x = gpu.zeros([3, 10], "f32", "x");
  const w = gpu.zeros([4], "f32", "w");
  const w10 = gpu.zeros([10], "f32", "w10");
  const b5 = gpu.zeros([5], "f32", "b5");
  assert.throws(() => rmsNorm(gpu, x, w, 1e-6), /last axis of x 'x' \[3,10\] must be a multiple/);
  assert.throws(() => layerNorm(gpu, x, w10, b5, 1e-5), /bias 'b5' \[5\] f32 must have 10/);
  assert.throws(() => rmsNorm(gpu, x, w10, 1e-6, x), /shares its buffer with input 'x'/);
  for (const t of [x, w, w10, b5]) t.destroy();
});

// Backward. Shapes: short rows, rows longer than a workgroup (2561), and enough rows that the
// parameter gradients are summed over several chunks, the last one partial (1001 rows of 16;
// 4099 rows make chunks of 17).

Deno.test("norm backward rejects missing outputs and mismatched statistics", async () => {
  const gpu = await testGpu();
  const x = gpu.zeros([3, 10], "f32", "x");
  const dy = gpu.zeros([3, 10], "f32", "dy");
  const w = gpu.zeros([5], "f32", "w");
  const rstd = gpu.zeros([6], "f32", "rstd");
  const short = gpu.zeros([3], "f32", "rstd3");
  assert.throws(
    () => rmsNormBackward(gpu, dy, x, w, rstd, { accumulate: true }),
    /accumulate needs an out tensor/,
  );
  assert.throws(
    () => rmsNormBackward(gpu, dy, x, w, short),
    /rstd 'rstd3' \[3\] f32 must have 6 elements \(one per normalised row/,
  );
  assert.throws(
    () => layerNormBackward(gpu, dy, x, w, short, rstd),
    /mean 'rstd3' \[3\] f32 must have 6 elements/,
  );
  assert.throws(() => rmsNormBackward(gpu, dy, x, w, rstd, { out: dy }), /shares its buffer/);
  for (const t of [x, dy, w, rstd, short]) t.destroy();
});
