import assert from "node:assert/strict";
import { rope, ropeAngle, ropeBackward, ropeInvFreq, ropeTable } from "../../src/ops/rope.ts";
import { testGpu } from "../helpers.ts";

// rope and ropeBackward on every shape, with positions and in place, and the finite
// differences of the reference backward, are in ops_table_test.ts.

Deno.test("ropeInvFreq follows theta^(-2i/hd); transformers rounding stays within f32 steps", () => {
  const exact = ropeInvFreq(128, 1e6, "float64");
  const hf = ropeInvFreq(128, 1e6, "transformers");
  assert.equal(exact[0], 1);
  assert.ok(Math.abs(exact[32] - 1e-3) < 1e-15, `inv_freq[32] = ${exact[32]}, 1e-3 expected`);
  for (let i = 0; i < 64; i++) {
    assert.equal(hf[i], Math.fround(hf[i]), "transformers inv_freq must be an f32 value");
    assert.ok(Math.abs(hf[i] / exact[i] - 1) < 4e-7, `inv_freq[${i}]: ${hf[i]} vs ${exact[i]}`);
  }
  // The f32 product pos * inv_freq is off by at most half an ulp of the angle.
  const angle = ropeAngle(255, hf[0], "transformers");
  assert.equal(angle, 255);
  assert.equal(ropeAngle(255, hf[1], "transformers"), Math.fround(255 * hf[1]));
});

Deno.test("rope and ropeBackward reject shapes that are not whole tokens and sequences past the table", async () => {
  const gpu = await testGpu();
  const table = ropeTable(gpu, { headDim: 24, theta: 1e6, maxPositions: 4 });
  const x = gpu.zeros([5, 3 * 24], "f32", "q");
  assert.throws(() => rope(gpu, x, table, { heads: 2 }), /must hold whole tokens of heads 2/);
  assert.throws(
    () => rope(gpu, x, table, { heads: 3 }),
    /seqLen 5 exceeds the table's 4 positions/,
  );
  assert.throws(
    () => rope(gpu, x, table, { heads: 3, seqLen: 2 }),
    /5 tokens, not a multiple of seqLen 2/,
  );
  assert.throws(() => ropeTable(gpu, { headDim: 5, theta: 1e4, maxPositions: 4 }), /positive even/);
  const dy = gpu.zeros([21, 5 * 24], "f32", "dy");
  assert.throws(
    () => ropeBackward(gpu, dy, table, { heads: 2 }),
    /ropeBackward: dy 'dy' \[21,120\] must hold whole tokens of heads 2/,
  );
  for (const t of [table.cosSin, x, dy]) t.destroy();
});
