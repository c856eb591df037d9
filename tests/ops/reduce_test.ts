import assert from "node:assert/strict";
import { columnSum } from "../../src/ops/reduce.ts";
import { columnSumRef } from "../../src/ops/reduce_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

Deno.test("columnSum matches the reference for short, chunked and wide inputs", async () => {
  const gpu = await testGpu();
  // One pass (rows <= 16), two passes, two passes with > 256 chunks' worth of rows, a wide
  // row that needs many workgroups, and a 3-D input summed over both leading axes.
  const shapes = [[5, 37], [123, 53], [4099, 3], [2, 70001], [3, 7, 11]];
  const inputs = shapes.map((shape, i) =>
    gpu.upload(randn(shape.reduce((a, b) => a * b), 10 + i), shape, "f32", `x${i}`)
  );
  const sums = inputs.map((x) => columnSum(gpu, x));
  shapes.forEach((shape, i) => assert.deepEqual(sums[i].shape, [shape.at(-1)]));
  const got = await gpu.readAll(sums) as Float32Array[];
  shapes.forEach((shape, i) => {
    const x = randn(shape.reduce((a, b) => a * b), 10 + i);
    assertNmse(columnSumRef(x, shape.at(-1)!), got[i], 1e-12, `columnSum [${shape}]`);
  });
  for (const t of [...inputs, ...sums]) t.destroy();
});

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
