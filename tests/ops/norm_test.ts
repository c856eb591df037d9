import assert from "node:assert/strict";
import { layerNorm, layerNormWithStats, rmsNorm, rmsNormWithStats } from "../../src/ops/norm.ts";
import { layerNormRef, rmsNormRef } from "../../src/ops/norm_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

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

Deno.test({
  name: "rmsNorm covers more rows than one grid dimension holds",
  // GL llvmpipe needs ~4 s for 65k workgroups; the row wrap is the same WGSL on every backend.
  ignore: Deno.env.get("DENO_WEBGPU_BACKEND") === "gl",
}, async () => {
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
