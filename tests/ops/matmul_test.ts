import assert from "node:assert/strict";
import { matmul } from "../../src/ops/matmul.ts";
import { matmulRef } from "../../src/ops/matmul_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

// Products on every layout, shape and weight type are in ops_table_test.ts.

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

  assert.throws(() => matmul(gpu, x, x, { accumulate: true }), /accumulate needs an 'out'/);
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
