import assert from "node:assert/strict";
import { columnSum } from "../../src/ops/reduce.ts";
import { randn, testGpu } from "../helpers.ts";

// Sums on every shape are in ops_table_test.ts.

Deno.test("columnSum is bitwise reproducible, writes into out, and gives zeros for no rows", async () => {
  const gpu = await testGpu();
  const x = gpu.upload(randn(1000 * 19, 3), [1000, 19], "f32", "x");
  const out = gpu.empty([19], "f32", "out");
  assert.equal(columnSum(gpu, x, out), out);
  const again = columnSum(gpu, x);
  const empty = gpu.empty([0, 4], "f32", "empty");
  const zeros = columnSum(gpu, empty);
  const [a, b, z] = await gpu.readAll([out, again, zeros]);
  assert.deepEqual(a, b);
  assert.deepEqual(z, new Float32Array(4));
  const small = gpu.empty([18], "f32", "small");
  assert.throws(() => columnSum(gpu, x, small), /must have 19 elements/);
  for (const t of [x, out, again, empty, zeros, small]) t.destroy();
});
