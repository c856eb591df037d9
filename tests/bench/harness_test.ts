import assert from "node:assert/strict";
import { median, timeGpu } from "../../src/bench/harness.ts";
import { roundTripBench } from "../../src/bench/round_trip.ts";
import { scale } from "../../src/ops/elementwise.ts";
import { testGpu } from "../helpers.ts";

Deno.test("median: the middle value, or the mean of the two middle ones", () => {
  assert.equal(median([5, 1, 3]), 3);
  assert.equal(median([4, 1, 3, 2]), 2.5);
});

Deno.test("timeGpu: one compile call, batches doubling from one call, then reps equal batches", async () => {
  const gpu = await testGpu();
  const x = gpu.upload(new Float32Array(1024).fill(1), [1024], "f32", "x");
  const y = gpu.empty([1024], "f32", "y");
  let calls = 0;
  const timing = await timeGpu(gpu, () => {
    calls++;
    scale(gpu, x, 2, y);
  }, { reps: 3, batchMs: 20 });
  // 1 + (1 + 2 + ... + c/2 or c) + 3c calls for a batch of c = 2^j calls.
  const sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
  const matches = sizes.filter((c) =>
    [c - 1, 2 * c - 1].some((probes) => 1 + probes + 3 * c === calls)
  );
  assert.ok(matches.length > 0, `${calls} calls fit no doubling`);
  assert.ok(timing.ms > 0 && Number.isFinite(timing.ms));
  assert.ok(timing.cpuMs >= 0);
  assert.deepEqual([...await gpu.readF32(y)].slice(0, 3), [2, 2, 2]);
  x.destroy();
  y.destroy();
});

Deno.test("round_trip bench: a wait and a readback, each a positive median", async () => {
  const gpu = await testGpu();
  const rows = await roundTripBench.run({ gpu, baselineGflops: 1 });
  assert.deepEqual(rows.map((r) => r.name), ["round_trip_sync", "round_trip_readback"]);
  for (const row of rows) assert.ok(row.ms > 0 && Number.isFinite(row.ms), `${row.name} ${row.ms}`);
});
