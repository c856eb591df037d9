/**
 * The fixed cost of handing work to the GPU and waiting for it: one tiny dispatch and a wait,
 * and one tiny dispatch and a 1 KiB readback. Each student-bench call pays the readback once on
 * top of its GPU work, so on a fast GPU this row tells how much of those calls is waiting.
 */
import { scale } from "../ops/elementwise.ts";
import { type Bench, type BenchResult, median } from "./harness.ts";

const ROUND_TRIPS = 20;

export const roundTripBench: Bench = {
  name: "round_trip",
  summary: "one tiny dispatch then a wait, and then a 1 KiB readback (the fixed cost per call)",
  async run({ gpu }) {
    const x = gpu.upload(new Float32Array(256).fill(1), [256], "f32", "bench.round_trip.x");
    const y = gpu.empty([256], "f32", "bench.round_trip.y");
    const timed = async (wait: () => Promise<unknown>): Promise<number> => {
      const ms: number[] = [];
      for (let r = 0; r <= ROUND_TRIPS; r++) {
        const start = performance.now();
        scale(gpu, x, 2, y);
        await wait();
        if (r > 0) ms.push(performance.now() - start); // the first call compiles
      }
      return median(ms);
    };
    const results: BenchResult[] = [
      { name: "round_trip_sync", ms: await timed(() => gpu.sync()) },
      { name: "round_trip_readback", ms: await timed(() => gpu.read(y)) },
    ];
    x.destroy();
    y.destroy();
    return results;
  },
};
