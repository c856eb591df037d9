/**
 * One distillation step (docs/numerics.md §5): the student (NF4 Qwen3 + LoRA) and the resampler
 * run forward, MSE against the teacher's targets, backward into the LoRA and resampler
 * gradients, then global-norm clipping and AdamW with two parameter groups.
 */
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { type LoraAdapter, peftKey } from "../models/lora.ts";
import {
  type LoraGrads,
  qwen3Backward,
  qwen3Forward,
  qwen3ForwardTrain,
  type TokenBatch,
} from "../models/qwen3.ts";
import type { Qwen3Weights } from "../models/qwen3_weights.ts";
import {
  destroyResamplerActivations,
  resamplerBackward,
  resamplerForward,
  resamplerForwardTrain,
  zeroResamplerGrads,
} from "../models/resampler.ts";
import type { ResamplerWeights } from "../models/resampler_weights.ts";
import { AdamW, clipCoefficient, mseLoss, recordGradNorms } from "./optim.ts";

/** The trainable student: a frozen Qwen3 with LoRA, and the resampler on top. */
export interface StudentModel {
  qwen: Qwen3Weights;
  lora: LoraAdapter;
  resampler: ResamplerWeights;
}

/** Token ids of some captions and the teacher's outputs for them. */
export interface MicroBatch {
  tokens: TokenBatch;
  /** [batch, numQueries, dimSeq] */
  targetSeq: Float32Array;
  /** [batch, dimPooled] */
  targetPooled: Float32Array;
}

export interface OptimizerSettings {
  lr: { resampler: number; lora: number };
  weightDecay: number;
  maxGradNorm: number;
}

export interface StepResult {
  loss: number;
  lossSeq: number;
  lossPooled: number;
  gradNorm: { total: number; resampler: number; lora: number };
  clipCoef: number;
}

/** LoRA parameters (or anything keyed like them) by their PEFT names. */
export function loraByPeftName<T>(
  lora: LoraAdapter,
  pick: (slot: string, ab: "a" | "b") => T,
): Map<string, T> {
  const out = new Map<string, T>();
  for (let layer = 0; layer < lora.numLayers; layer++) {
    for (const module of lora.config.targetModules) {
      const slot = `${layer}.${module}`;
      out.set(peftKey(layer, module, "A"), pick(slot, "a"));
      out.set(peftKey(layer, module, "B"), pick(slot, "b"));
    }
  }
  return out;
}

/**
 * Holds the gradient buffers and the optimizer for a student. `accumulate` adds one
 * micro-batch's gradients; `apply` clips, steps and zeroes them.
 */
export class DistillStep {
  readonly gpu: Gpu;
  readonly student: StudentModel;
  readonly optimizer: AdamW;
  readonly settings: OptimizerSettings;
  readonly loraGrads: LoraGrads = new Map();
  readonly resamplerGrads: ReadonlyMap<string, Tensor>;
  readonly #checkpoint: boolean;
  readonly #gradients: Map<string, Tensor>;
  #losses: Array<{ seq: Tensor; pooled: Tensor; weight: number }> = [];

  constructor(
    gpu: Gpu,
    student: StudentModel,
    settings: OptimizerSettings,
    options: { gradientCheckpointing: boolean },
  ) {
    this.gpu = gpu;
    this.student = student;
    this.settings = settings;
    this.#checkpoint = options.gradientCheckpointing;
    for (const [slot, pair] of student.lora.pairs) {
      this.loraGrads.set(slot, {
        a: gpu.zeros(pair.a.shape, "f32", `grad.${slot}.A`),
        b: gpu.zeros(pair.b.shape, "f32", `grad.${slot}.B`),
      });
    }
    this.resamplerGrads = zeroResamplerGrads(gpu, student.resampler);
    this.#gradients = new Map([
      ...this.resamplerGrads,
      ...loraByPeftName(student.lora, (slot, ab) => this.loraGrads.get(slot)![ab]),
    ]);
    this.optimizer = new AdamW(
      gpu,
      [
        { name: "resampler", lr: settings.lr.resampler, params: student.resampler.params },
        {
          name: "lora",
          lr: settings.lr.lora,
          params: loraByPeftName(student.lora, (slot, ab) => student.lora.pairs.get(slot)![ab]),
        },
      ],
      { weightDecay: settings.weightDecay },
    );
  }

  /** Every gradient buffer by parameter name (PEFT names for LoRA). */
  gradients(): ReadonlyMap<string, Tensor> {
    return this.#gradients;
  }

  /**
   * Forward and backward of one micro-batch; its loss is scaled by `lossScale` (1/k for k
   * accumulated micro-batches) and its gradients added to the buffers. Only records GPU work.
   */
  accumulate(micro: MicroBatch, lossScale: number, dropoutSeed: number): void {
    const { gpu, student } = this;
    const { qwen, lora, resampler } = student;
    const { batch, seqLen } = micro.tokens;
    const c = resampler.config;
    // Host data goes up before any work is recorded: an upload submits what is recorded, so
    // uploading here adds no submission (the forward's own uploads then find nothing to send).
    const tSeq = gpu.upload(micro.targetSeq, [batch, c.numQueries, c.dimSeq], "f32", "target_seq");
    const tPooled = gpu.upload(micro.targetPooled, [batch, c.dimPooled], "f32", "target_pooled");
    const { hidden, state } = qwen3ForwardTrain(gpu, qwen, micro.tokens, {
      lora,
      train: { dropoutSeed },
      checkpoint: this.#checkpoint,
    });
    const hidden3 = hidden.reshape([batch, seqLen, qwen.config.hiddenSize]);
    const { seq, pooled, acts } = resamplerForwardTrain(
      gpu,
      resampler,
      hidden3,
      state.ctx.keyLengths,
    );
    const lossSeq = mseLoss(gpu, seq, tSeq, { lossScale });
    const lossPooled = mseLoss(gpu, pooled, tPooled, { lossScale });
    for (const t of [seq, pooled, tSeq, tPooled]) t.destroy();
    const dHidden = resamplerBackward(
      gpu,
      resampler,
      acts,
      lossSeq.grad,
      lossPooled.grad,
      this.resamplerGrads,
    );
    lossSeq.grad.destroy();
    lossPooled.grad.destroy();
    destroyResamplerActivations(acts);
    hidden.destroy();
    qwen3Backward(
      gpu,
      qwen,
      state,
      dHidden.reshape([batch * seqLen, qwen.config.hiddenSize]),
      lora,
      this.loraGrads,
    );
    dHidden.destroy();
    this.#losses.push({ seq: lossSeq.loss, pooled: lossPooled.loss, weight: lossScale });
  }

  /**
   * Loss of the accumulated micro-batches (their losses weighted by each one's `lossScale`,
   * i.e. its share of the batch) and the gradient norms.
   */
  async measure(): Promise<Omit<StepResult, "clipCoef">> {
    const losses = this.#losses;
    this.#losses = [];
    const norms = recordGradNorms(this.gpu, {
      resampler: [...this.resamplerGrads.values()],
      lora: [...this.loraGrads.values()].flatMap((g) => [g.a, g.b]),
    });
    const lossTensors = losses.flatMap((l) => [l.seq, l.pooled]);
    const values = (await this.gpu.readAll([...lossTensors, norms.partials])) as Float32Array[];
    for (const t of [...lossTensors, norms.partials]) t.destroy();
    let lossSeq = 0;
    let lossPooled = 0;
    losses.forEach(({ weight }, i) => {
      lossSeq += values[2 * i][0] * weight;
      lossPooled += values[2 * i + 1][0] * weight;
    });
    const gradNorm = norms.resolve(values[lossTensors.length]);
    return {
      loss: lossSeq + lossPooled,
      lossSeq,
      lossPooled,
      gradNorm: {
        total: gradNorm.total,
        resampler: gradNorm.groups.resampler,
        lora: gradNorm.groups.lora,
      },
    };
  }

  /** Clips by the global norm, takes one AdamW step at `lrFactor` × each group's lr, zeroes the gradients. */
  apply(totalNorm: number, lrFactor: number): number {
    const clipCoef = clipCoefficient(totalNorm, this.settings.maxGradNorm);
    this.optimizer.step(this.#gradients, { clipCoef, lrFactor });
    for (const g of this.#gradients.values()) this.gpu.clear(g);
    // Submitted now, so the update runs while the host reads and tokenizes the next batch.
    this.gpu.flush();
    return clipCoef;
  }

  /** A whole optimizer step over `micros` (gradient accumulation when there are several). */
  async step(
    micros: readonly MicroBatch[],
    lrFactor: number,
    dropoutSeed: number,
  ): Promise<StepResult> {
    micros.forEach((m, i) =>
      this.accumulate(m, 1 / micros.length, (dropoutSeed + i * 0x632be5ab) >>> 0)
    );
    const measured = await this.measure();
    const clipCoef = this.apply(measured.gradNorm.total, lrFactor);
    return { ...measured, clipCoef };
  }

  destroy(): void {
    this.optimizer.destroy();
    for (const g of this.#gradients.values()) g.destroy();
  }
}

/** Student outputs for a batch (no dropout): seq [B, Q, dimSeq] and pooled [B, dimPooled]. */
export function studentForward(
  gpu: Gpu,
  student: StudentModel,
  tokens: TokenBatch,
): { seq: Tensor; pooled: Tensor } {
  const { qwen, lora, resampler } = student;
  const hidden = qwen3Forward(gpu, qwen, tokens, { lora });
  const out = resamplerForward(
    gpu,
    resampler,
    hidden.reshape([tokens.batch, tokens.seqLen, qwen.config.hiddenSize]),
    tokens.lengths,
  );
  hidden.destroy();
  return out;
}
