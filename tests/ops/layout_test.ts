import assert from "node:assert/strict";
import {
  concatLastAxis,
  concatRows,
  concatRowsBackward,
  meanOverSequence,
  meanOverSequenceBackward,
  splitLastAxis,
} from "../../src/ops/layout.ts";
import { testGpu } from "../helpers.ts";

// Forward and backward on every shape, and the finite differences of the reference backward,
// are in ops_table_test.ts.

Deno.test("the copies move integer tensors bit for bit", async () => {
  const gpu = await testGpu();
  const ids = Int32Array.from({ length: 5 * 7 }, (_, i) => (i * 7919) % 1000 - 500);
  const t = gpu.upload(ids, [5, 7], "i32", "ids");
  const [left, right] = splitLastAxis(gpu, t, [3, 4]);
  const joined = concatLastAxis(gpu, left, right);
  assert.equal(joined.dtype, "i32");
  assert.deepEqual(await gpu.read(joined), ids);
  for (const x of [t, left, right, joined]) x.destroy();
});

Deno.test("layout ops reject mismatched shapes with clear errors", async () => {
  const gpu = await testGpu();
  const a = gpu.zeros([3, 4, 5], "f32", "a");
  const b = gpu.zeros([3, 5, 5], "f32", "b");
  const h = gpu.zeros([3, 4, 5], "bf16", "h");
  assert.throws(() => concatLastAxis(gpu, a, b), /same shape except the last axis/);
  assert.throws(() => concatLastAxis(gpu, h, h), /must be f32 or u32 or i32/);
  assert.throws(() => splitLastAxis(gpu, a, [2, 2]), /adding up to the last axis.*\(5\)/);
  const wrongDim = gpu.zeros([2, 4], "f32", "latents");
  assert.throws(() => concatRows(gpu, a, wrongDim), /same D/);
  const otherBatch = gpu.zeros([2, 4, 5], "f32", "other");
  assert.throws(() => concatRows(gpu, a, otherBatch), /\[B or 1, Tb, D\]/);
  assert.throws(() => meanOverSequence(gpu, a, [4, 5, 1]), /lengths\[1\] = 5 is outside \[0, 4\]/);
  assert.throws(() => meanOverSequence(gpu, a, [4]), /1 entries, 3 expected/);
  assert.throws(
    () => concatRowsBackward(gpu, a, [3, 2, 5], [1, 3, 5]),
    /dOut 'a' \[3,4,5\] must be \[3,5,5\], the shape concatRows gives/,
  );
  assert.throws(() => concatRowsBackward(gpu, a, [3, 2, 5], [2, 2, 5]), /\[B or 1, Tb, D\]/);
  assert.throws(() => meanOverSequenceBackward(gpu, a, 4), /dy 'a' \[3,4,5\] must be \[B, D\]/);
  assert.throws(
    () => meanOverSequenceBackward(gpu, wrongDim, 3, [1, 4]),
    /lengths\[1\] = 4 is outside \[0, 3\]/,
  );
  for (const t of [a, b, h, wrongDim, otherBatch]) t.destroy();
});
