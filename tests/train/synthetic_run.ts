/**
 * A made-up but realistic metrics log for the report tests and for looking at the report by
 * eye: losses decaying over decades with noise, the docs/numerics.md §5 warmup + cosine schedule, grad norms
 * with early spikes (clipped), and evals spread evenly over the run.
 */
import type { EvalRecord, MetricsRecord, StepRecord } from "../../src/train/metrics.ts";
import { lrFactor, warmupSteps } from "../../src/train/optim.ts";
import { Rng } from "../../src/util/rng.ts";

export interface SyntheticRunOptions {
  steps: number;
  evals: number;
  seed?: number;
  batchSize?: number;
}

export function syntheticRun(options: SyntheticRunOptions): MetricsRecord[] {
  const { steps, evals, seed = 1, batchSize = 16 } = options;
  const rng = new Rng(seed);
  const records: MetricsRecord[] = [{
    type: "run",
    time: "2025-01-01T00:00:00.000Z",
    config: { steps, batch_size: batchSize, lr: { resampler: 1e-4, lora: 2e-5 }, seed },
  }];
  const evalEvery = Math.max(1, Math.floor(steps / Math.max(evals, 1)));
  let elapsed = 0;
  for (let step = 1; step <= steps; step++) {
    const t = step / steps;
    const noise = () => Math.exp(0.15 * rng.normal());
    const seq = (0.8 * Math.exp(-5 * t) + 0.01) * noise();
    const pooled = (0.4 * Math.exp(-4 * t) + 0.004) * noise();
    const gradTotal = (step < steps * 0.05 ? 30 : 0.5 + 2 * Math.exp(-4 * t)) * noise();
    const factor = lrFactor(step - 1, steps, warmupSteps(steps));
    const rate = 80 + 10 * rng.normal();
    elapsed += batchSize / rate;
    const record: StepRecord = {
      type: "step",
      step,
      epoch: Math.floor((step * batchSize) / 2000),
      samples: step * batchSize,
      loss: seq + pooled,
      loss_seq: seq,
      loss_pooled: pooled,
      lr: { resampler: 1e-4 * factor, lora: 2e-5 * factor },
      grad_norm: { total: gradTotal, resampler: gradTotal * 0.9, lora: gradTotal * 0.3 },
      clip_coef: Math.min(1, 1 / (gradTotal + 1e-6)),
      samples_per_s: rate,
      elapsed_s: elapsed,
    };
    records.push(record);
    if (evals > 0 && step % evalEvery === 0 && step / evalEvery <= evals) {
      const heldoutSeq = seq * 1.2;
      const heldoutPooled = pooled * 1.3;
      const evalRecord: EvalRecord = {
        type: "eval",
        step,
        heldout_loss: heldoutSeq + heldoutPooled,
        heldout_loss_seq: heldoutSeq,
        heldout_loss_pooled: heldoutPooled,
        cos_seq: 1 - heldoutSeq * 0.6,
        cos_pooled: 1 - heldoutPooled * 0.5,
        // The references of src/train/evaluation.ts: constant over the run.
        mean_loss_seq: 0.5,
        mean_loss_pooled: 0.8,
        r2_seq: 1 - heldoutSeq / 0.5,
        r2_pooled: 1 - heldoutPooled / 0.8,
        top1_seq: 0.5 - heldoutSeq / 2,
        top1_pooled: 0.6 - heldoutPooled / 2,
        chance_top1: 0.01,
        nn_r2_seq: 0.3,
        nn_r2_pooled: 0.35,
        nn_top1_seq: 0.55,
        nn_top1_pooled: 0.65,
      };
      records.push(evalRecord);
    }
  }
  return records;
}
