import assert from "node:assert/strict";
import { embeddingGather, tableWindows } from "../../src/ops/embedding.ts";
import { testGpu } from "../helpers.ts";

// Gathers from every table shape and dtype, through small windows and from id tensors, are in
// ops_table_test.ts.

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
