import assert from "node:assert/strict";
import { siluBackward, swiglu, swigluBackward } from "../../src/ops/activation.ts";
import { testGpu } from "../helpers.ts";

// Forward and backward on every length and the sweep over [-10, 10], and the finite
// differences of the derivative references, are in ops_table_test.ts.

Deno.test("activations reject outputs that alias an input and inputs of the wrong size", async () => {
  const gpu = await testGpu();
  const n = 3 * 9728 + 5;
  const gate = gpu.zeros([n], "f32", "gate");
  const up = gpu.zeros([n], "f32", "up");
  const dy = gpu.zeros([n], "f32", "dy");
  const short = gpu.zeros([n - 1], "f32", "short");
  assert.throws(
    () => swiglu(gpu, gate, up, gate.reshape([n])),
    /shares its buffer with input .gate./,
  );
  assert.throws(
    () => swiglu(gpu, gate, short),
    /up 'short' \[29188\] f32 must have 29189 elements/,
  );
  assert.throws(() => siluBackward(gpu, dy, gate, dy), /shares its buffer with input 'dy'/);
  assert.throws(
    () => swigluBackward(gpu, short, gate, up),
    /dOut 'short' \[29188\] f32 must have 29189 elements/,
  );
  for (const t of [gate, up, dy, short]) t.destroy();
});
