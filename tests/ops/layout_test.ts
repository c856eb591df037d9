import assert from "node:assert/strict";
import {
  concatLastAxis,
  concatRows,
  concatRowsBackward,
  meanOverSequence,
  meanOverSequenceBackward,
  splitLastAxis,
} from "../../src/ops/layout.ts";
import {
  concatLastAxisRef,
  concatRowsBackwardRef,
  concatRowsRef,
  meanOverSequenceBackwardRef,
  meanOverSequenceRef,
  splitLastAxisRef,
} from "../../src/ops/layout_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";
import { dot, numericGrad } from "./finite_diff.ts";

Deno.test("concatLastAxis and splitLastAxis match the references on odd widths", async () => {
  const gpu = await testGpu();
  const a = randn(3 * 11 * 37, 1);
  const b = randn(3 * 11 * 53, 2);
  const ta = gpu.upload(a, [3, 11, 37], "f32", "a");
  const tb = gpu.upload(b, [3, 11, 53], "f32", "b");
  const cat = concatLastAxis(gpu, ta, tb);
  assert.deepEqual(cat.shape, [3, 11, 90]);
  // SDXL prompt_embeds: penultimate states of CLIP-L [77, 768] and bigG [77, 1280].
  const l = randn(77 * 768, 3);
  const g = randn(77 * 1280, 4);
  const tl = gpu.upload(l, [77, 768], "f32", "clip_l");
  const tg = gpu.upload(g, [77, 1280], "f32", "clip_g");
  const prompt = concatLastAxis(gpu, tl, tg);
  assert.deepEqual(prompt.shape, [77, 2048]);
  const sizes = [29, 5, 0, 56];
  const parts = splitLastAxis(gpu, cat, sizes);
  assert.deepEqual(parts.map((p) => p.shape), sizes.map((n) => [3, 11, n]));
  const nonEmpty = parts.filter((p) => p.size > 0);
  const [c, p, ...got] = await gpu.readAll([cat, prompt, ...nonEmpty]) as Float32Array[];
  const expectedCat = concatLastAxisRef(a, 37, b, 53);
  assertNmse(expectedCat, c, 1e-14, "concat");
  assertNmse(concatLastAxisRef(l, 768, g, 1280), p, 1e-14, "prompt_embeds");
  const expectedParts = splitLastAxisRef(expectedCat, sizes).filter((x) => x.length > 0);
  expectedParts.forEach((e, i) => assertNmse(e, got[i], 1e-14, `split ${i}`));
  for (const t of [ta, tb, cat, tl, tg, prompt, ...parts]) t.destroy();
});

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

Deno.test("concatRows per batch row, with b shared by every row, and in 2-D", async () => {
  const gpu = await testGpu();
  const [batch, ta, tb, dim] = [3, 11, 7, 37];
  const a = randn(batch * ta * dim, 5);
  const b = randn(batch * tb * dim, 6);
  const latents = randn(tb * dim, 7);
  const tA = gpu.upload(a, [batch, ta, dim], "f32", "x");
  const tB = gpu.upload(b, [batch, tb, dim], "f32", "b");
  const tL3 = gpu.upload(latents, [1, tb, dim], "f32", "latents3");
  const tL2 = gpu.upload(latents, [tb, dim], "f32", "latents2");
  const tA2 = gpu.upload(a.subarray(0, ta * dim), [ta, dim], "f32", "x2");
  const perRow = concatRows(gpu, tA, tB);
  const shared3 = concatRows(gpu, tA, tL3);
  const shared2 = concatRows(gpu, tA, tL2);
  const flat = concatRows(gpu, tA2, tL2);
  assert.deepEqual(perRow.shape, [batch, ta + tb, dim]);
  assert.deepEqual(flat.shape, [ta + tb, dim]);
  const [r, s3, s2, f] = await gpu.readAll([perRow, shared3, shared2, flat]) as Float32Array[];
  assertNmse(concatRowsRef(a, b, batch, ta, tb, dim, false), r, 1e-14, "per batch row");
  const sharedRef = concatRowsRef(a, latents, batch, ta, tb, dim, true);
  assertNmse(sharedRef, s3, 1e-14, "shared [1, Tb, D]");
  assertNmse(sharedRef, s2, 1e-14, "shared [Tb, D]");
  assertNmse(sharedRef.subarray(0, (ta + tb) * dim), f, 1e-14, "2-D");
  for (const t of [tA, tB, tL3, tL2, tA2, perRow, shared3, shared2, flat]) t.destroy();
});

Deno.test("meanOverSequence: masked with host and tensor lengths, and plain", async () => {
  const gpu = await testGpu();
  const [batch, t, dim] = [3, 13, 37];
  const x = randn(batch * t * dim, 8);
  const tx = gpu.upload(x, [batch, t, dim], "f32", "x");
  const lengths = [13, 5, 0];
  const lengthTensor = gpu.upload(Uint32Array.from(lengths), [batch], "u32", "lengths");
  const masked = meanOverSequence(gpu, tx, lengths);
  const fromTensor = meanOverSequence(gpu, tx, lengthTensor);
  // The resampler's pooled path: a plain mean over 77 latents.
  const latents = randn(2 * 77 * 33, 9);
  const tl = gpu.upload(latents, [2, 77, 33], "f32", "latents");
  const plain = meanOverSequence(gpu, tl);
  assert.deepEqual(plain.shape, [2, 33]);
  const [m, mt, p] = await gpu.readAll([masked, fromTensor, plain]) as Float32Array[];
  const expected = meanOverSequenceRef(x, batch, t, dim, lengths);
  assertNmse(expected, m, 1e-12, "host lengths");
  assertNmse(expected, mt, 1e-12, "tensor lengths");
  assertNmse(meanOverSequenceRef(latents, 2, 77, 33), p, 1e-12, "plain mean");
  for (const y of [tx, lengthTensor, masked, fromTensor, tl, plain]) y.destroy();
});

Deno.test("concatRowsBackward splits the rows back and sums a shared b over the batch", async () => {
  const gpu = await testGpu();
  const [batch, ta, tb, dim] = [5, 11, 7, 37];
  const g = randn(batch * (ta + tb) * dim, 10);
  const dOut = gpu.upload(g, [batch, ta + tb, dim], "f32", "dOut");
  const dOut2 = gpu.upload(g.subarray(0, (ta + tb) * dim), [ta + tb, dim], "f32", "dOut2");
  const cases = [
    { what: "per batch row", grads: concatRowsBackward(gpu, dOut, [5, 11, 37], [5, 7, 37]) },
    { what: "shared [1, Tb, D]", grads: concatRowsBackward(gpu, dOut, [5, 11, 37], [1, 7, 37]) },
    { what: "shared [Tb, D]", grads: concatRowsBackward(gpu, dOut, [5, 11, 37], [7, 37]) },
    { what: "2-D", grads: concatRowsBackward(gpu, dOut2, [11, 37], [7, 37]) },
  ];
  assert.deepEqual(cases.map((c) => c.grads.db.shape), [[5, 7, 37], [1, 7, 37], [7, 37], [7, 37]]);
  assert.deepEqual(cases[3].grads.da.shape, [11, 37]);
  const read = await gpu.readAll(cases.flatMap((c) => [c.grads.da, c.grads.db])) as Float32Array[];
  const perRow = concatRowsBackwardRef(g, batch, ta, tb, dim, false);
  const shared = concatRowsBackwardRef(g, batch, ta, tb, dim, true);
  const flat = concatRowsBackwardRef(g.subarray(0, (ta + tb) * dim), 1, ta, tb, dim, false);
  [perRow, shared, shared, flat].forEach((ref, n) => {
    const what = cases[n].what;
    assertNmse(ref.da, read[2 * n], 1e-14, `${what} da`);
    // The shared b's gradient is an f32 sum of 5 rows.
    assertNmse(ref.db, read[2 * n + 1], 1e-12, `${what} db`);
  });
  for (const t of [dOut, dOut2, ...cases.flatMap((c) => [c.grads.da, c.grads.db])]) t.destroy();
});

Deno.test("meanOverSequenceBackward spreads dy over the valid rows, zeros on padding", async () => {
  const gpu = await testGpu();
  const [batch, t, dim] = [3, 13, 37];
  const dy = randn(batch * dim, 11);
  const tdy = gpu.upload(dy, [batch, dim], "f32", "dy");
  const lengths = [13, 5, 0];
  const lengthTensor = gpu.upload(Int32Array.from(lengths), [batch], "i32", "lengths");
  const masked = meanOverSequenceBackward(gpu, tdy, t, lengths);
  const fromTensor = meanOverSequenceBackward(gpu, tdy, t, lengthTensor);
  const plain = meanOverSequenceBackward(gpu, tdy, 77);
  assert.deepEqual(plain.shape, [batch, 77, dim]);
  const [m, mt, p] = await gpu.readAll([masked, fromTensor, plain]) as Float32Array[];
  const expected = meanOverSequenceBackwardRef(dy, batch, t, dim, lengths);
  assertNmse(expected, m, 1e-12, "host lengths");
  assertNmse(expected, mt, 1e-12, "tensor lengths");
  // Rows 5.. of batch row 1 and all of batch row 2 are padding.
  assert.ok(m.subarray((t + 5) * dim).every((v) => v === 0), "padded rows get exactly 0");
  assertNmse(meanOverSequenceBackwardRef(dy, batch, 77, dim), p, 1e-12, "plain mean");
  for (const y of [tdy, lengthTensor, masked, fromTensor, plain]) y.destroy();
});

Deno.test("layout backward references agree with finite differences of the forwards", () => {
  const [batch, ta, tb, dim] = [3, 4, 2, 5];
  const a = randn(batch * ta * dim, 12);
  const dOut = randn(batch * (ta + tb) * dim, 13);
  for (const shared of [false, true]) {
    const b = randn((shared ? 1 : batch) * tb * dim, 14);
    const loss = (x: Float64Array | Float32Array, y: Float64Array | Float32Array) =>
      dot(dOut, concatRowsRef(x, y, batch, ta, tb, dim, shared));
    const grads = concatRowsBackwardRef(dOut, batch, ta, tb, dim, shared);
    assertNmse(numericGrad((x) => loss(x, b), a), grads.da, 1e-14, `concatRows da (${shared})`);
    assertNmse(numericGrad((y) => loss(a, y), b), grads.db, 1e-14, `concatRows db (${shared})`);
  }
  const t = 6;
  const x = randn(batch * t * dim, 15);
  const dy = randn(batch * dim, 16);
  for (const lengths of [undefined, [6, 2, 0]]) {
    const numeric = numericGrad((v) => dot(dy, meanOverSequenceRef(v, batch, t, dim, lengths)), x);
    const analytic = meanOverSequenceBackwardRef(dy, batch, t, dim, lengths);
    assertNmse(numeric, analytic, 1e-14, `meanOverSequence dx (lengths ${lengths})`);
  }
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
