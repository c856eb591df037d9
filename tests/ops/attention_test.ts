import assert from "node:assert/strict";
import { attention, attentionBackward } from "../../src/ops/attention.ts";
import { testGpu } from "../helpers.ts";

// Forward and backward on every shape and mask, and the finite differences of the reference
// backward, are in ops_table_test.ts.

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
