import assert from "node:assert/strict";
import {
  erf,
  gelu,
  geluBackward,
  quickGelu,
  quickGeluBackward,
  silu,
  siluBackward,
  swiglu,
  swigluBackward,
} from "../../src/ops/activation.ts";
import {
  erfRef,
  geluGradRef,
  geluRef,
  quickGeluGradRef,
  quickGeluRef,
  siluGradRef,
  siluRef,
  swigluBackwardRef,
  swigluRef,
} from "../../src/ops/activation_ref.ts";
import { assertMaxAbs, assertNmse, randn, testGpu } from "../helpers.ts";
import { dot, numericGrad } from "./finite_diff.ts";

/** [-10, 10] in steps of 1/512 (exact in f32), the approximation's interval edges, and extremes. */
function sweep(): Float32Array {
  const edges = [0.84375, 1.25, 1 / 0.35, 6, 10, 1e-30, 1e-8, 13, 30, 100, 1000];
  const values = edges.flatMap((e) => [e, -e, Math.fround(e) * (1 + 2 ** -23)]);
  for (let i = -5120; i <= 5120; i++) values.push(i / 512);
  return new Float32Array(values);
}

Deno.test("erf is within 1e-7 of a float64 reference over [-10, 10] and beyond", async () => {
  const gpu = await testGpu();
  const x = sweep();
  const tx = gpu.upload(x, [x.length], "f32", "x");
  const y = erf(gpu, tx);
  const got = await gpu.readF32(y);
  assertMaxAbs(Array.from(x, erfRef), got, 1e-7, "erf");
  for (const t of [tx, y]) t.destroy();
});

Deno.test("gelu, silu and quickGelu match float64 references, finite at +-1000", async () => {
  const gpu = await testGpu();
  const x = sweep();
  const tx = gpu.upload(x, [x.length], "f32", "x");
  const outs = [gelu(gpu, tx), silu(gpu, tx), quickGelu(gpu, tx)];
  const [g, s, q] = await gpu.readAll(outs) as Float32Array[];
  // Outputs are about |x|, so the absolute error scales with |x| (a few f32 ulps).
  const checks: Array<[string, (v: number) => number, Float32Array]> = [
    ["gelu", geluRef, g],
    ["silu", siluRef, s],
    ["quickGelu", quickGeluRef, q],
  ];
  for (const [what, ref, got] of checks) {
    const expected = Array.from(x, ref);
    const scaledErr = Array.from(x, (v, i) => (got[i] - expected[i]) / Math.max(1, Math.abs(v)));
    assertMaxAbs(new Float32Array(x.length), scaledErr, 2e-7, `${what} error / max(1, |x|)`);
    assertNmse(expected, got, 1e-12, what);
  }
  // The negative tail is computed through erfc, so it keeps relative accuracy too.
  const at = x.indexOf(-6);
  assert.ok(
    Math.abs(g[at] / geluRef(-6) - 1) < 1e-5,
    `gelu(-6) = ${g[at]}, ${geluRef(-6)} expected`,
  );
  for (const t of [tx, ...outs]) t.destroy();
});

Deno.test("swiglu is silu(gate) * up on an odd length", async () => {
  const gpu = await testGpu();
  const n = 3 * 9728 + 5;
  const gate = randn(n, 21, 3);
  const up = randn(n, 22);
  const tg = gpu.upload(gate, [n], "f32", "gate");
  const tu = gpu.upload(up, [n], "f32", "up");
  const y = swiglu(gpu, tg, tu);
  assertNmse(swigluRef(gate, up), await gpu.readF32(y), 1e-12, "swiglu");
  assert.throws(() => swiglu(gpu, tg, tu, tg.reshape([n])), /shares its buffer with input .gate./);
  const short = gpu.zeros([n - 1], "f32", "short");
  assert.throws(() => swiglu(gpu, tg, short), /up 'short' \[29188\] f32 must have 29189 elements/);
  for (const t of [tg, tu, y, short]) t.destroy();
});

Deno.test("activation derivative references agree with finite differences of the forwards", () => {
  const x = Array.from({ length: 257 }, (_, i) => -8 + i / 16);
  const h = 1e-5;
  const pairs: Array<[string, (v: number) => number, (v: number) => number]> = [
    ["silu", siluRef, siluGradRef],
    ["gelu", geluRef, geluGradRef],
    ["quickGelu", quickGeluRef, quickGeluGradRef],
  ];
  for (const [what, f, grad] of pairs) {
    const numeric = x.map((v) => (f(v + h) - f(v - h)) / (2 * h));
    assertMaxAbs(numeric, x.map(grad), 1e-9, `${what}'`);
  }
  const [dOut, gate, up] = [randn(7, 1), randn(7, 2, 3), randn(7, 3)];
  const grads = swigluBackwardRef(dOut, gate, up);
  const loss = (g: ArrayLike<number>, u: ArrayLike<number>) =>
    dot(dOut, Array.from(g, (v, i) => siluRef(v) * u[i]));
  assertNmse(numericGrad((v) => loss(v, up), gate), grads.dGate, 1e-14, "swiglu dGate");
  assertNmse(numericGrad((v) => loss(gate, v), up), grads.dUp, 1e-14, "swiglu dUp");
});

Deno.test("silu, gelu and quickGelu backward match the references over [-10, 10] and beyond", async () => {
  const gpu = await testGpu();
  const x = sweep();
  const dy = randn(x.length, 31);
  const tx = gpu.upload(x, [x.length], "f32", "x");
  const tdy = gpu.upload(dy, [x.length], "f32", "dy");
  const outs = [
    geluBackward(gpu, tdy, tx),
    siluBackward(gpu, tdy, tx),
    quickGeluBackward(gpu, tdy, tx),
  ];
  const results = await gpu.readAll(outs) as Float32Array[];
  const grads = [geluGradRef, siluGradRef, quickGeluGradRef];
  ["gelu", "silu", "quickGelu"].forEach((what, k) => {
    const expected = Array.from(x, (v, i) => dy[i] * grads[k](v));
    // The derivatives are O(1); a few f32 ulps of dy * f'(x) in absolute terms.
    assertMaxAbs(expected, results[k], 1e-6, `${what} backward`);
    assertNmse(expected, results[k], 1e-12, `${what} backward`);
  });
  assert.throws(() => siluBackward(gpu, tdy, tx, tdy), /shares its buffer with input 'dy'/);
  for (const t of [tx, tdy, ...outs]) t.destroy();
});

Deno.test("swigluBackward gives both gradients on an odd length", async () => {
  const gpu = await testGpu();
  const n = 3 * 9728 + 5;
  const [dOut, gate, up] = [randn(n, 41), randn(n, 42, 3), randn(n, 43)];
  const tensors = [
    gpu.upload(dOut, [n], "f32", "dOut"),
    gpu.upload(gate, [n], "f32", "gate"),
    gpu.upload(up, [n], "f32", "up"),
  ];
  const { dGate, dUp } = swigluBackward(gpu, tensors[0], tensors[1], tensors[2]);
  const [gotGate, gotUp] = await gpu.readAll([dGate, dUp]);
  const ref = swigluBackwardRef(dOut, gate, up);
  assertNmse(ref.dGate, gotGate, 1e-12, "swiglu dGate");
  assertNmse(ref.dUp, gotUp, 1e-12, "swiglu dUp");
  const short = gpu.zeros([n - 1], "f32", "short");
  assert.throws(
    () => swigluBackward(gpu, short, tensors[1], tensors[2]),
    /dOut 'short' \[29188\] f32 must have 29189 elements/,
  );
  for (const t of [...tensors, dGate, dUp, short]) t.destroy();
});
