import assert from "node:assert/strict";
import {
  layerNorm,
  layerNormBackward,
  layerNormWithStats,
  rmsNorm,
  rmsNormBackward,
  rmsNormWithStats,
} from "../../src/ops/norm.ts";
import {
  layerNormBackwardRef,
  layerNormRef,
  rmsNormBackwardRef,
  rmsNormRef,
} from "../../src/ops/norm_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";
import { dot, numericGrad } from "./finite_diff.ts";

/** Weights around 1 like trained norms, so a swapped index shows. */
function normWeight(d: number, seed: number): Float32Array {
  return randn(d, seed, 0.3).map((v) => 1 + v);
}

Deno.test("layerNorm matches the reference for row lengths around the workgroup sizes", async () => {
  const gpu = await testGpu();
  const cases = [[5, 37], [3, 1000], [3, 2561], [2, 9728], [7, 128]].map(([rows, d]) => {
    // An offset mean checks that the variance is computed stably (two-pass).
    const x = randn(rows * d, rows * d, 2).map((v) => v + 300);
    const w = normWeight(d, d + 1);
    const b = randn(d, d + 2);
    const tx = gpu.upload(x, [rows, d], "f32", "x");
    const tw = gpu.upload(w, [d], "f32", "w");
    const tb = gpu.upload(b, [d], "f32", "b");
    const plain = layerNorm(gpu, tx, tw, tb, 1e-5);
    const stats = layerNormWithStats(gpu, tx, tw, tb, 1e-5);
    return {
      what: `layerNorm [${rows}, ${d}]`,
      ref: layerNormRef(x, w, b, 1e-5),
      inputs: [tx, tw, tb],
      outputs: [plain, stats.y, stats.mean, stats.rstd],
    };
  });
  const results = await gpu.readAll(cases.flatMap((c) => c.outputs)) as Float32Array[];
  cases.forEach(({ what, ref }, i) => {
    const [plain, y, mean, rstd] = results.slice(4 * i, 4 * i + 4);
    assertNmse(ref.y, plain, 1e-10, what);
    assert.deepEqual(y, plain, `${what}: the stats entry must produce the same y`);
    assertNmse(ref.mean, mean, 1e-12, `${what} mean`);
    assertNmse(ref.rstd, rstd, 1e-10, `${what} rstd`);
  });
  for (const c of cases) for (const t of [...c.inputs, ...c.outputs]) t.destroy();
});

Deno.test("rmsNorm matches the reference, whole rows and per head (Qwen3 q_norm)", async () => {
  const gpu = await testGpu();
  // [rows, D] with weight [D], then [T, nHeads * hd] with weight [hd] normalised per head.
  const shapes: Array<[number, number, number]> = [
    [5, 37, 37],
    [3, 2561, 2561],
    [2, 9728, 9728],
    [7, 5 * 128, 128],
    [3, 3 * 24, 24],
  ];
  const cases = shapes.map(([rows, cols, d]) => {
    const x = randn(rows * cols, cols + d, 3);
    const w = normWeight(d, d);
    const tx = gpu.upload(x, [rows, cols], "f32", "x");
    const tw = gpu.upload(w, [d], "f32", "w");
    const plain = rmsNorm(gpu, tx, tw, 1e-6);
    const stats = rmsNormWithStats(gpu, tx, tw, 1e-6);
    return {
      what: `rmsNorm [${rows}, ${cols}] over ${d}`,
      normRows: (rows * cols) / d,
      ref: rmsNormRef(x, w, 1e-6),
      inputs: [tx, tw],
      outputs: [plain, stats.y, stats.rstd],
    };
  });
  const results = await gpu.readAll(cases.flatMap((c) => c.outputs)) as Float32Array[];
  cases.forEach(({ what, normRows, ref }, i) => {
    const [plain, y, rstd] = results.slice(3 * i, 3 * i + 3);
    assertNmse(ref.y, plain, 1e-10, what);
    assert.deepEqual(y, plain, `${what}: the stats entry must produce the same y`);
    assert.equal(rstd.length, normRows);
    assertNmse(ref.rstd, rstd, 1e-10, `${what} rstd`);
  });
  for (const c of cases) for (const t of [...c.inputs, ...c.outputs]) t.destroy();
});

Deno.test("rmsNorm covers more rows than one grid dimension holds", async () => {
  const gpu = await testGpu();
  const rows = gpu.limits.maxComputeWorkgroupsPerDimension + 3;
  const d = 3;
  const x = randn(rows * d, 11);
  const w = normWeight(d, 12);
  const tx = gpu.upload(x, [rows, d], "f32", "x");
  const tw = gpu.upload(w, [d], "f32", "w");
  const y = rmsNorm(gpu, tx, tw, 1e-6);
  assertNmse(rmsNormRef(x, w, 1e-6).y, await gpu.readF32(y), 1e-10, "rmsNorm many rows");
  for (const t of [tx, tw, y]) t.destroy();
});

Deno.test("norms reject mismatched shapes and in-place outputs with a clear message", async () => {
  const gpu = await testGpu();
  const x = gpu.zeros([3, 10], "f32", "x");
  const w = gpu.zeros([4], "f32", "w");
  const w10 = gpu.zeros([10], "f32", "w10");
  const b5 = gpu.zeros([5], "f32", "b5");
  assert.throws(() => rmsNorm(gpu, x, w, 1e-6), /last axis of x 'x' \[3,10\] must be a multiple/);
  assert.throws(() => layerNorm(gpu, x, w10, b5, 1e-5), /bias 'b5' \[5\] f32 must have 10/);
  assert.throws(() => rmsNorm(gpu, x, w10, 1e-6, x), /shares its buffer with input 'x'/);
  for (const t of [x, w, w10, b5]) t.destroy();
});

// Backward. Shapes: short rows, rows longer than a workgroup (2561), and enough rows that the
// parameter gradients are summed over several chunks, the last one partial (1001 rows of 16;
// 4099 rows make chunks of 17).

Deno.test("layerNorm backward finite differences agree with the float64 reference", () => {
  const [rows, d, eps] = [3, 5, 1e-5];
  const x = randn(rows * d, 1, 2);
  const w = normWeight(d, 2);
  const b = randn(d, 3);
  const dy = randn(rows * d, 4);
  const grads = layerNormBackwardRef(dy, x, w, eps);
  const loss = (xs: ArrayLike<number>, ws: ArrayLike<number>, bs: ArrayLike<number>) =>
    dot(dy, layerNormRef(xs, ws, bs, eps).y);
  assertNmse(numericGrad((v) => loss(v, w, b), x), grads.dx, 1e-14, "dx");
  assertNmse(numericGrad((v) => loss(x, v, b), w), grads.dweight, 1e-14, "dweight");
  assertNmse(numericGrad((v) => loss(x, w, v), b), grads.dbias, 1e-14, "dbias");
});

Deno.test("rmsNorm backward finite differences agree with the float64 reference, per head", () => {
  // [T 3, heads 2 * hd 4] normalised per head, as Qwen3's q_norm.
  const [tokens, heads, hd, eps] = [3, 2, 4, 1e-6];
  const x = randn(tokens * heads * hd, 5, 2);
  const w = normWeight(hd, 6);
  const dy = randn(x.length, 7);
  const grads = rmsNormBackwardRef(dy, x, w, eps);
  const loss = (xs: ArrayLike<number>, ws: ArrayLike<number>) => dot(dy, rmsNormRef(xs, ws, eps).y);
  assertNmse(numericGrad((v) => loss(v, w), x), grads.dx, 1e-14, "dx");
  assertNmse(numericGrad((v) => loss(x, v), w), grads.dweight, 1e-14, "dweight");
});

Deno.test("layerNormBackward matches the reference; sums are reproducible; frozen skips them", async () => {
  const gpu = await testGpu();
  const eps = 1e-5;
  const cases = [[5, 37], [3, 2561], [1001, 77], [4099, 3]].map(([rows, d]) => {
    const x = randn(rows * d, rows + d, 2).map((v) => v + 30);
    const w = normWeight(d, d + 1);
    const dy = randn(rows * d, rows + 2 * d);
    const tx = gpu.upload(x, [rows, d], "f32", "x");
    const tw = gpu.upload(w, [d], "f32", "w");
    const tb = gpu.zeros([d], "f32", "b");
    const tdy = gpu.upload(dy, [rows, d], "f32", "dy");
    const { y, mean, rstd } = layerNormWithStats(gpu, tx, tw, tb, eps);
    const first = layerNormBackward(gpu, tdy, tx, tw, mean, rstd);
    const again = layerNormBackward(gpu, tdy, tx, tw, mean, rstd);
    const frozen = layerNormBackward(gpu, tdy, tx, tw, mean, rstd, { paramGrads: false });
    assert.equal(frozen.dweight, undefined);
    assert.equal(frozen.dbias, undefined);
    return {
      what: `layerNormBackward [${rows}, ${d}]`,
      d,
      ref: layerNormBackwardRef(dy, x, w, eps),
      temps: [tx, tw, tb, tdy, y, mean, rstd],
      outputs: [first.dx, first.dweight!, first.dbias!, again.dweight!, again.dbias!, frozen.dx],
    };
  });
  const results = await gpu.readAll(cases.flatMap((c) => c.outputs)) as Float32Array[];
  cases.forEach(({ what, d, ref }, i) => {
    const [dx, dweight, dbias, dweight2, dbias2, frozenDx] = results.slice(6 * i, 6 * i + 6);
    // f32 gives 1e-15..1e-12 except for rows of 3 values around 30: their rstd amplifies
    // the rounding of x - mean (dx 5e-10, dweight 5e-12 measured).
    const bound = d === 3 ? 1e-9 : 1e-11;
    assertNmse(ref.dx, dx, bound, `${what} dx`);
    assertNmse(ref.dweight, dweight, bound, `${what} dweight`);
    assertNmse(ref.dbias, dbias, bound, `${what} dbias`);
    assert.deepEqual(dweight2, dweight, `${what}: dweight must be bitwise reproducible`);
    assert.deepEqual(dbias2, dbias, `${what}: dbias must be bitwise reproducible`);
    assert.deepEqual(frozenDx, dx, `${what}: the frozen variant must give the same dx`);
  });
  for (const c of cases) for (const t of [...c.temps, ...c.outputs]) t.destroy();
});

Deno.test("rmsNormBackward matches the reference, whole rows and per head, and accumulates", async () => {
  const gpu = await testGpu();
  const eps = 1e-6;
  // [rows, cols] normalised in runs of d.
  const shapes: Array<[number, number, number]> = [
    [5, 37, 37],
    [3, 2561, 2561],
    [77, 5 * 128, 128],
    [13, 3 * 24, 24],
  ];
  const cases = shapes.map(([rows, cols, d]) => {
    const x = randn(rows * cols, cols + d, 3);
    const w = normWeight(d, d);
    const dy = randn(rows * cols, rows + cols);
    const prior = randn(rows * cols, rows);
    const tx = gpu.upload(x, [rows, cols], "f32", "x");
    const tw = gpu.upload(w, [d], "f32", "w");
    const tdy = gpu.upload(dy, [rows, cols], "f32", "dy");
    const acc = gpu.upload(prior, [rows, cols], "f32", "residualGrad");
    const { y, rstd } = rmsNormWithStats(gpu, tx, tw, eps);
    const frozen = rmsNormBackward(gpu, tdy, tx, tw, rstd);
    assert.equal(frozen.dweight, undefined);
    const trained = rmsNormBackward(gpu, tdy, tx, tw, rstd, { weightGrad: true });
    const added = rmsNormBackward(gpu, tdy, tx, tw, rstd, { out: acc, accumulate: true });
    assert.equal(added.dx, acc);
    const ref = rmsNormBackwardRef(dy, x, w, eps);
    return {
      what: `rmsNormBackward [${rows}, ${cols}] over ${d}`,
      ref,
      accumulated: ref.dx.map((v, i) => v + prior[i]),
      temps: [tx, tw, tdy, y, rstd],
      outputs: [frozen.dx, trained.dx, trained.dweight!, acc],
    };
  });
  const results = await gpu.readAll(cases.flatMap((c) => c.outputs)) as Float32Array[];
  cases.forEach(({ what, ref, accumulated }, i) => {
    const [dx, trainedDx, dweight, acc] = results.slice(4 * i, 4 * i + 4);
    assertNmse(ref.dx, dx, 1e-8, `${what} dx`);
    assert.deepEqual(trainedDx, dx, `${what}: weightGrad must not change dx`);
    assertNmse(ref.dweight, dweight, 1e-12, `${what} dweight`);
    assertNmse(accumulated, acc, 1e-12, `${what} accumulated dx`);
  });
  for (const c of cases) for (const t of [...c.temps, ...c.outputs]) t.destroy();
});

Deno.test("norm backward rejects missing outputs and mismatched statistics", async () => {
  const gpu = await testGpu();
  const x = gpu.zeros([3, 10], "f32", "x");
  const dy = gpu.zeros([3, 10], "f32", "dy");
  const w = gpu.zeros([5], "f32", "w");
  const rstd = gpu.zeros([6], "f32", "rstd");
  const short = gpu.zeros([3], "f32", "rstd3");
  assert.throws(
    () => rmsNormBackward(gpu, dy, x, w, rstd, { accumulate: true }),
    /accumulate needs an out tensor/,
  );
  assert.throws(
    () => rmsNormBackward(gpu, dy, x, w, short),
    /rstd 'rstd3' \[3\] f32 must have 6 elements \(one per normalised row/,
  );
  assert.throws(
    () => layerNormBackward(gpu, dy, x, w, short, rstd),
    /mean 'rstd3' \[3\] f32 must have 6 elements/,
  );
  assert.throws(() => rmsNormBackward(gpu, dy, x, w, rstd, { out: dy }), /shares its buffer/);
  for (const t of [x, dy, w, rstd, short]) t.destroy();
});
