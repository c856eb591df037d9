import assert from "node:assert/strict";
import { add, addInPlace, dropout, mul, scale } from "../../src/ops/elementwise.ts";
import { addRef, dropoutRef, mulRef, scaleRef } from "../../src/ops/elementwise_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

Deno.test("add, mul, scale, addInPlace match the references on an odd length", async () => {
  const gpu = await testGpu();
  const n = 1237;
  const a = randn(n, 1);
  const b = randn(n, 2);
  const ta = gpu.upload(a, [n], "f32", "a");
  const tb = gpu.upload(b, [n], "f32", "b");
  const sum = add(gpu, ta, tb);
  const prod = mul(gpu, ta, tb);
  const scaled = scale(gpu, ta, -0.37);
  const acc = gpu.upload(a, [n], "f32", "acc");
  addInPlace(gpu, acc, tb);
  const [s, p, c, inPlace] = await gpu.readAll([sum, prod, scaled, acc]) as Float32Array[];
  assertNmse(addRef(a, b), s, 1e-12, "add");
  assertNmse(mulRef(a, b), p, 1e-12, "mul");
  assertNmse(scaleRef(a, -0.37), c, 1e-12, "scale");
  assertNmse(addRef(a, b), inPlace, 1e-12, "addInPlace");
  for (const t of [ta, tb, sum, prod, scaled, acc]) t.destroy();
});

Deno.test("dropout matches its reference, drops about p, and repeats its mask for a seed", async () => {
  const gpu = await testGpu();
  const n = 20011;
  const x = randn(n, 3);
  const tx = gpu.upload(x, [n], "f32", "x");
  const a = dropout(gpu, tx, 0.25, 1234);
  const b = dropout(gpu, tx, 0.25, 1234);
  const c = dropout(gpu, tx, 0.25, 99);
  const [ra, rb, rc] = await gpu.readAll([a, b, c]) as Float32Array[];
  assert.deepEqual(ra, dropoutRef(x, 0.25, 1234));
  assert.deepEqual(ra, rb);
  assert.notDeepEqual(ra, rc);
  const dropped = ra.filter((v) => v === 0).length / n;
  assert.ok(Math.abs(dropped - 0.25) < 0.02, `dropped fraction ${dropped}`);
  for (const t of [tx, a, b, c]) t.destroy();
});
