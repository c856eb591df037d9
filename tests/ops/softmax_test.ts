import assert from "node:assert/strict";
import { softmax, softmaxBackward } from "../../src/ops/softmax.ts";
import { testGpu } from "../helpers.ts";

// Forward and backward on every shape and mask are in ops_table_test.ts.

Deno.test("softmax and softmaxBackward reject masks and gradients of the wrong size", async () => {
  const gpu = await testGpu();
  const keyMask = gpu.zeros([3, 333], "i32", "mask");
  const twoBatches = gpu.zeros([2, 1, 1, 333], "f32", "two batches");
  assert.throws(
    () => softmax(gpu, twoBatches, { keyMask }),
    /keyMask 'mask' \[3,333\] i32 must have 666 elements/,
  );
  assert.throws(() => softmax(gpu, keyMask), /scores 'mask' \[3,333\] i32 must be f32/);
  const probs = gpu.zeros([2, 3, 5, 333], "f32", "probs");
  const short = gpu.zeros([4], "f32", "short");
  assert.throws(
    () => softmaxBackward(gpu, short, probs),
    /dP 'short' \[4\] f32 must have 9990 elements/,
  );
  for (const t of [keyMask, twoBatches, probs, short]) t.destroy();
});
