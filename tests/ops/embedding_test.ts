import assert from "node:assert/strict";
import type { DType, Tensor } from "../../src/gpu/tensor.ts";
import {
  bf16ArrayToF32,
  f16ArrayToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
} from "../../src/io/dtype.ts";
import { embeddingGather, tableWindows } from "../../src/ops/embedding.ts";
import { embeddingGatherRef } from "../../src/ops/embedding_ref.ts";
import { Rng } from "../../src/util/rng.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

/** A [vocab, dim] table of the given dtype and its values widened to f32. */
function makeTable(
  gpu: Awaited<ReturnType<typeof testGpu>>,
  vocab: number,
  dim: number,
  dtype: DType,
  seed: number,
): { tensor: Tensor; values: Float32Array } {
  const x = randn(vocab * dim, seed);
  const name = `table.${dtype}.${dim}`;
  if (dtype === "f32") return { tensor: gpu.upload(x, [vocab, dim], dtype, name), values: x };
  const bits = dtype === "f16" ? f32ArrayToF16(x) : f32ArrayToBf16(x);
  const values = dtype === "f16" ? f16ArrayToF32(bits) : bf16ArrayToF32(bits);
  return { tensor: gpu.upload(bits, [vocab, dim], dtype, name), values };
}

/** Every row once (so every window boundary is crossed) and then random repeats. */
function allRowsThenRandom(vocab: number, extra: number, seed: number): number[] {
  const rng = new Rng(seed);
  const ids = rng.permutation(vocab);
  for (let i = 0; i < extra; i++) ids.push(Math.floor(rng.next() * vocab));
  return ids;
}

Deno.test("tableWindows covers every row with aligned windows under the limit", () => {
  // The last three use the smallest window the error message below promises to be enough.
  const layouts = [
    [301, 148, 32, 2048],
    [211, 74, 256, 1000],
    [1000, 74, 256, 332],
    [1000, 150, 256, 408],
    [500, 2, 256, 260],
  ];
  for (const [rows, rowBytes, alignment, maxBytes] of layouts) {
    const windows = tableWindows(rows, rowBytes, alignment, maxBytes);
    assert.ok(windows.length > 1);
    let next = 0;
    for (const w of windows) {
      assert.equal(w.rowBegin, next);
      assert.ok(w.rowEnd > w.rowBegin);
      assert.equal(w.byteOffset % alignment, 0);
      assert.equal(w.byteLength % 4, 0);
      assert.ok(w.byteLength <= maxBytes);
      assert.ok(w.byteOffset <= w.rowBegin * rowBytes);
      assert.ok(w.rowEnd * rowBytes <= w.byteOffset + w.byteLength);
      next = w.rowEnd;
    }
    assert.equal(next, rows);
  }
  assert.throws(() => tableWindows(5, 100, 256, 150), /allow at least 356/);
});

Deno.test("embeddingGather walks small windows of f32, f16 and bf16 tables with odd rows", async () => {
  const gpu = await testGpu();
  const vocab = 301;
  const cases = [];
  for (const [dtype, dim] of [["f32", 37], ["bf16", 37], ["bf16", 38], ["f16", 37], ["f16", 38]]) {
    const table = makeTable(gpu, vocab, dim as number, dtype as DType, cases.length + 1);
    const ids = allRowsThenRandom(vocab, 53, cases.length + 7);
    const before = gpu.stats.dispatches;
    const out = embeddingGather(gpu, table.tensor, Int32Array.from(ids), { maxWindowBytes: 2000 });
    assert.ok(gpu.stats.dispatches - before > 10, "expected many windows");
    assert.deepEqual(out.shape, [ids.length, dim]);
    cases.push({ what: `${dtype} D=${dim}`, table, ids, dim: dim as number, out });
  }
  const read = await gpu.readAll(cases.map((c) => c.out)) as Float32Array[];
  cases.forEach((c, i) => {
    assertNmse(embeddingGatherRef(c.table.values, c.dim, c.ids), read[i], 1e-14, c.what);
    c.table.tensor.destroy();
    c.out.destroy();
  });
});

Deno.test("embeddingGather: whole table, position rows 0..76, id tensors", async () => {
  const gpu = await testGpu();
  const positions = makeTable(gpu, 77, 37, "f32", 21);
  const rows = Array.from({ length: 77 }, (_, i) => i);
  const allPositions = embeddingGather(gpu, positions.tensor, rows);
  const tokens = makeTable(gpu, 1000, 38, "bf16", 22);
  // Out-of-range ids in a tensor cannot be checked on the host and give zero rows.
  const idValues = [5, 999, 0, 17, -1, 1000, 3, 999, 42, 7, 1, 2];
  const idTensor = gpu.upload(Int32Array.from(idValues), [3, 4], "i32", "ids");
  const fromTensor = embeddingGather(gpu, tokens.tensor, idTensor, { maxWindowBytes: 4096 });
  assert.deepEqual(fromTensor.shape, [3, 4, 38]);
  const [p, t] = await gpu.readAll([allPositions, fromTensor]) as Float32Array[];
  assertNmse(positions.values, p, 1e-14, "positions");
  const expected = embeddingGatherRef(tokens.values, 38, idValues.map((id) => Math.max(0, id)));
  for (const bad of [4, 5]) expected.fill(0, bad * 38, (bad + 1) * 38);
  assertNmse(expected, t, 1e-14, "id tensor");
  for (const x of [positions.tensor, allPositions, tokens.tensor, idTensor, fromTensor]) {
    x.destroy();
  }
});

Deno.test("embeddingGather rejects bad ids and tables with clear errors", async () => {
  const gpu = await testGpu();
  const table = gpu.zeros([10, 6], "bf16", "tok_emb");
  assert.throws(
    () => embeddingGather(gpu, table, [1, 10]),
    /id 10 at position 1 is outside the vocabulary of table 'tok_emb' \(10 rows\)/,
  );
  assert.throws(() => embeddingGather(gpu, table, [-3]), /id -3 at position 0/);
  assert.throws(() => embeddingGather(gpu, table, [1.5]), /not an integer/);
  assert.throws(() => embeddingGather(gpu, table, []), /ids is empty/);
  const ids = gpu.zeros([2], "f32", "float_ids");
  assert.throws(() => embeddingGather(gpu, table, ids), /must be u32 or i32/);
  const flat = gpu.zeros([60], "f32", "flat");
  assert.throws(() => embeddingGather(gpu, flat, [0]), /must be \[vocab, dim\]/);
  for (const x of [table, ids, flat]) x.destroy();
});
