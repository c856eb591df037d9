/**
 * Runs `train` in its own process for the kill-and-resume test: the options come as JSON in
 * the first argument. At the first step past a checkpoint (the step is in metrics.jsonl, the
 * checkpoint holds an earlier one) it prints `ready <step> <checkpoint step>` and blocks until
 * it is killed, so the parent kills it at that point, not at a time it guessed. The device is
 * made as the parent's (`testGpu`, honouring DISTILL_DISABLE), so both run the same kernels.
 */
import { train } from "../../src/train/trainer.ts";
import type { TrainOptions } from "../../src/train/options.ts";
import { testGpu } from "../helpers.ts";

const options = JSON.parse(Deno.args[0]) as TrainOptions;
let checkpointed = -1;
await train(options, {
  gpu: await testGpu(),
  log: () => {},
  onCheckpoint(step) {
    checkpointed = step;
  },
  onProgress({ step }) {
    if (checkpointed < 0 || step <= checkpointed) return;
    Deno.stdout.writeSync(new TextEncoder().encode(`ready ${step} ${checkpointed}\n`));
    // Blocks this thread for good: the kill lands here, between a logged step and its checkpoint.
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
  },
});
