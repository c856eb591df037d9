/**
 * Runs `train` in its own process for the kill-and-resume test: the options come as JSON in
 * the first argument. After every step it blocks for the milliseconds of the second argument,
 * so the parent can SIGKILL it part-way through a run, between or inside steps. The device is
 * made as the parent's (`testGpu`, honouring DISTILL_DISABLE), so both run the same kernels.
 */
import { train } from "../../src/train/trainer.ts";
import type { TrainOptions } from "../../src/train/options.ts";
import { testGpu } from "../helpers.ts";

const options = JSON.parse(Deno.args[0]) as TrainOptions;
const blockMs = Number(Deno.args[1] ?? 0);
await train(options, {
  gpu: await testGpu(),
  log: () => {},
  onProgress() {
    const until = performance.now() + blockMs;
    while (performance.now() < until) {
      // A blocking wait: the kill must be able to land at any point, not only at an await.
    }
  },
});
