/**
 * The optimiser side of training (docs/numerics.md §5): the MSE loss with its gradient, gradient
 * norms and clipping, AdamW with parameter groups, and the learning-rate schedule.
 *
 * Everything stays f32 on the GPU; the host reads back one small array of partial sums per
 * step (the gradient norms, which are logged and decide the clipping coefficient).
 * Gradient accumulation needs no op of its own: sum micro-batch gradients with
 * `addInPlace` (src/ops/elementwise.ts) and pass `lossScale: 1 / k` to `mseLoss`.
 */
import code from "../../kernels/optim.wgsl" with { type: "text" };
import { f32, type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType } from "../ops/checks.ts";
import { WORKGROUP_REDUCE } from "../ops/row_reduce.ts";

const WG = 256;
/**
 * Workgroups per reduction. Fixed per length (so results are reproducible run to run) and
 * capped so the partial sums stay few: beyond the cap each invocation walks more elements.
 */
const MAX_PARTIALS = 1024;

/** docs/numerics.md §5 defaults. */
export const DEFAULT_LR = { resampler: 1e-4, lora: 2e-5 } as const;
export const DEFAULT_WEIGHT_DECAY = 0.01;
export const DEFAULT_MAX_GRAD_NORM = 1.0;
export const DEFAULT_WARMUP_RATIO = 0.03;
export const DEFAULT_MIN_LR_RATIO = 0.1;

function partialCount(n: number): number {
  return Math.min(Math.ceil(n / WG), MAX_PARTIALS);
}

/**
 * kernels/optim.wgsl with `$ELEM` f32, or vec4f (`vec4`: AdamW and the squared sums over
 * lengths divisible by 4, a quarter of the storage accesses; each is a loop over the SIMD lanes
 * on CPU adapters).
 */
function optimKernel(entry: string, vec4 = false) {
  const markers = {
    ...WORKGROUP_REDUCE,
    ELEM: vec4 ? "vec4f" : "f32",
    SUM_OF_SQUARES: vec4 ? "  return dot(v, v);" : "  return v * v;",
  };
  return { name: vec4 ? "optim_vec4" : "optim", code, markers, entry, constants: { WG } };
}

/** Whether a tensor of `size` elements takes the vec4 variant, and its invocations' p.n. */
function elementsPerAccess(size: number): { vec4: boolean; count: number } {
  const vec4 = size % 4 === 0;
  return { vec4, count: vec4 ? size / 4 : size };
}

export interface MseLossOptions {
  /**
   * Multiplies the gradient (not the returned loss): `1 / k` for each of k accumulated
   * micro-batches, so the summed gradients are those of the mean over the whole batch.
   */
  lossScale?: number;
}

export interface MseLossResult {
  /** `mean((pred - target)^2)`, f32 [1], unscaled: the value to log. */
  loss: Tensor;
  /** `d (lossScale * loss) / d pred = 2 (pred - target) / n * lossScale`, shaped like pred. */
  grad: Tensor;
}

/**
 * Mean squared error and its gradient in one pass (forward and backward side by side),
 * reduced deterministically: per-workgroup tree sums, then one workgroup sums those.
 */
export function mseLoss(
  gpu: Gpu,
  pred: Tensor,
  target: Tensor,
  options: MseLossOptions = {},
): MseLossResult {
  const lossScale = options.lossScale ?? 1;
  requireDType("mseLoss", "pred", pred, ["f32"]);
  requireDType("mseLoss", "target", target, ["f32"]);
  if (pred.size !== target.size || pred.size === 0) {
    throw new Error(
      `mseLoss: pred '${pred.name}' [${pred.shape}] and target '${target.name}' ` +
        `[${target.shape}] must have the same, non-zero number of elements`,
    );
  }
  if (!Number.isFinite(lossScale)) {
    throw new Error(`mseLoss: lossScale must be a finite number, got ${lossScale}`);
  }
  const n = pred.size;
  const groups = partialCount(n);
  const partials = gpu.empty([groups], "f32", "mseLoss.partials");
  const grad = gpu.empty(pred.shape, "f32", `grad(${pred.name})`);
  const loss = gpu.empty([1], "f32", `mseLoss(${pred.name})`);
  gpu.dispatch({
    kernel: optimKernel("mse_partials"),
    params: [n, 0, f32((2 * lossScale) / n)],
    bindings: [pred, target, partials, grad],
    workgroups: [groups],
  });
  gpu.dispatch({
    kernel: optimKernel("sum_partials"),
    params: [groups, 0, f32(1 / n)],
    bindings: [null, null, partials, loss],
    workgroups: [1],
  });
  // Released to the pool: a later op may reuse it only after this submission's reads.
  partials.destroy();
  return { loss, grad };
}

/** Partial sums of squares for several tensors, packed in one buffer. */
export interface SquarePartials {
  partials: Tensor;
  /** `[start, end)` of each input tensor's partial sums in `partials`. */
  segments: Array<[number, number]>;
}

/** Records per-workgroup sums of x^2 for each tensor (one dispatch per tensor). */
export function squareSumPartials(gpu: Gpu, tensors: readonly Tensor[]): SquarePartials {
  const segments: Array<[number, number]> = [];
  let total = 0;
  for (const t of tensors) {
    requireDType("squareSumPartials", "tensor", t, ["f32"]);
    const count = partialCount(elementsPerAccess(t.size).count);
    segments.push([total, total + count]);
    total += count;
  }
  const partials = gpu.empty([Math.max(1, total)], "f32", "squareSumPartials");
  tensors.forEach((t, i) => {
    if (t.size === 0) return;
    const [start, end] = segments[i];
    const { vec4, count } = elementsPerAccess(t.size);
    gpu.dispatch({
      kernel: optimKernel("square_sum_partials", vec4),
      params: [count, start, f32(0)],
      bindings: [null, null, partials, ...new Array(8).fill(null), t],
      workgroups: [end - start],
    });
  });
  return { partials, segments };
}

export interface GradNorms {
  /** L2 norm over all tensors of all groups. */
  total: number;
  /** L2 norm of each group's tensors. */
  groups: Record<string, number>;
}

/** Gradient norms whose reduction is recorded but not yet read back. */
export interface PendingGradNorms {
  /** The per-workgroup partial sums to download (the caller frees them). */
  partials: Tensor;
  /** The norms from the downloaded partials (summed on the host in f64). */
  resolve(values: Float32Array): GradNorms;
}

/**
 * Records the squared-sum reductions of every group's gradients, so the caller can read them
 * back together with other results in one submission.
 */
export function recordGradNorms(
  gpu: Gpu,
  groups: Readonly<Record<string, readonly Tensor[]>>,
): PendingGradNorms {
  const names = Object.keys(groups);
  const { partials, segments } = squareSumPartials(gpu, names.flatMap((name) => groups[name]));
  const resolve = (values: Float32Array): GradNorms => {
    const result: GradNorms = { total: 0, groups: {} };
    let index = 0;
    let all = 0;
    for (const name of names) {
      let sum = 0;
      for (let t = 0; t < groups[name].length; t++, index++) {
        const [start, end] = segments[index];
        for (let i = start; i < end; i++) sum += values[i];
      }
      result.groups[name] = Math.sqrt(sum);
      all += sum;
    }
    result.total = Math.sqrt(all);
    return result;
  };
  return { partials, resolve };
}

/** L2 norms of gradient groups (each group's and the total), with one readback. */
export async function gradNorms(
  gpu: Gpu,
  groups: Readonly<Record<string, readonly Tensor[]>>,
): Promise<GradNorms> {
  const pending = recordGradNorms(gpu, groups);
  const values = await gpu.readF32(pending.partials);
  pending.partials.destroy();
  return pending.resolve(values);
}

/** `torch.nn.utils.clip_grad_norm_`'s factor: every gradient is multiplied by it. */
export function clipCoefficient(norm: number, maxNorm: number): number {
  return Math.min(1, maxNorm / (norm + 1e-6));
}

export interface AdamWGroup {
  /** e.g. "resampler" or "lora". */
  name: string;
  lr: number;
  /** Default: the optimiser's `weightDecay`. */
  weightDecay?: number;
  /** Trainable f32 tensors by name; names must be unique across groups. */
  params: ReadonlyMap<string, Tensor>;
}

export interface AdamWOptions {
  betas?: readonly [number, number];
  eps?: number;
  weightDecay?: number;
}

export interface AdamWStepOptions {
  /** From `clipCoefficient`; applied to the gradients inside the update. Default 1. */
  clipCoef?: number;
  /** Schedule multiplier of every group's lr (`lrFactor`). Default 1. */
  lrFactor?: number;
}

/** Host copy of the optimiser state, for checkpoints. */
export interface AdamWState {
  /** Optimizer steps taken (torch's `state["step"]`, the same for every tensor here). */
  step: number;
  /** First moments (`exp_avg`) by parameter name. */
  m: Map<string, Float32Array>;
  /** Second moments (`exp_avg_sq`) by parameter name. */
  v: Map<string, Float32Array>;
}

interface Slot {
  name: string;
  group: AdamWGroup;
  param: Tensor;
  m: Tensor;
  v: Tensor;
}

/**
 * `torch.optim.AdamW` over parameter groups, updating the parameters in place on the GPU
 * with one dispatch per tensor. The order of operations follows torch's
 * `_single_tensor_adam` (AdamW = Adam with decoupled_weight_decay=True): step += 1; decay
 * the parameter by (1 - lr * wd) before the Adam update; m.lerp_(g, 1 - beta1);
 * v = beta2 v + (1 - beta2) g^2; denom = sqrt(v) / sqrt(1 - beta2^step) + eps;
 * p -= lr / (1 - beta1^step) * m / denom. The scalar factors are computed in f64 on the host
 * as torch does in Python, the elementwise math in f32.
 */
export class AdamW {
  readonly groups: readonly AdamWGroup[];
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly #gpu: Gpu;
  readonly #slots: Slot[] = [];
  #step = 0;

  constructor(gpu: Gpu, groups: readonly AdamWGroup[], options: AdamWOptions = {}) {
    this.#gpu = gpu;
    this.groups = groups;
    [this.beta1, this.beta2] = options.betas ?? [0.9, 0.999];
    this.eps = options.eps ?? 1e-8;
    this.weightDecay = options.weightDecay ?? DEFAULT_WEIGHT_DECAY;
    for (const [what, value] of [["beta1", this.beta1], ["beta2", this.beta2]] as const) {
      if (!(value >= 0 && value < 1)) {
        throw new Error(`AdamW: ${what} must be in [0, 1), got ${value}`);
      }
    }
    if (!(this.eps >= 0)) throw new Error(`AdamW: eps must be >= 0, got ${this.eps}`);
    const seen = new Set<string>();
    for (const group of groups) {
      const wd = group.weightDecay ?? this.weightDecay;
      if (!(group.lr >= 0) || !(wd >= 0)) {
        throw new Error(
          `AdamW: group '${group.name}' needs lr >= 0 and weightDecay >= 0 ` +
            `(got lr ${group.lr}, weightDecay ${wd})`,
        );
      }
      for (const [name, param] of group.params) {
        if (seen.has(name)) {
          throw new Error(`AdamW: parameter '${name}' is in more than one group`);
        }
        seen.add(name);
        requireDType("AdamW", `parameter '${name}'`, param, ["f32"]);
        this.#slots.push({
          name,
          group,
          param,
          m: gpu.zeros(param.shape, "f32", `exp_avg(${name})`),
          v: gpu.zeros(param.shape, "f32", `exp_avg_sq(${name})`),
        });
      }
    }
  }

  /** Optimizer steps taken so far. */
  get stepCount(): number {
    return this.#step;
  }

  /**
   * Records one update of every parameter from `grads` (by parameter name, pre-clip; they
   * are not modified).
   */
  step(grads: ReadonlyMap<string, Tensor>, options: AdamWStepOptions = {}): void {
    const clip = options.clipCoef ?? 1;
    const lrFactor = options.lrFactor ?? 1;
    if (!(clip >= 0) || !(lrFactor >= 0)) {
      throw new Error(
        `AdamW.step: clipCoef and lrFactor must be >= 0 (got ${clip}, ${lrFactor})`,
      );
    }
    for (const { name, param } of this.#slots) {
      const grad = grads.get(name);
      if (!grad) throw new Error(`AdamW.step: no gradient for parameter '${name}'`);
      if (grad.dtype !== "f32" || grad.size !== param.size) {
        throw new Error(
          `AdamW.step: gradient '${grad.name}' [${grad.shape}] ${grad.dtype} does not match ` +
            `parameter '${name}' [${param.shape}] f32`,
        );
      }
    }
    this.#step++;
    const step = this.#step;
    const stepSize = (lr: number) => lr / (1 - this.beta1 ** step);
    const biasCorrection2Sqrt = Math.sqrt(1 - this.beta2 ** step);
    for (const { name, group, param, m, v } of this.#slots) {
      const lr = group.lr * lrFactor;
      const wd = group.weightDecay ?? this.weightDecay;
      const { vec4, count } = elementsPerAccess(param.size);
      this.#gpu.dispatch({
        kernel: optimKernel("adamw", vec4),
        params: [
          count,
          0,
          f32(0),
          f32(1 - lr * wd),
          f32(1 - this.beta1),
          f32(this.beta2),
          f32(1 - this.beta2),
          f32(stepSize(lr)),
          f32(biasCorrection2Sqrt),
          f32(this.eps),
          f32(clip),
        ],
        bindings: [null, null, null, null, param, grads.get(name)!, m, v],
        workgroups: grid1d(this.#gpu, count, WG),
      });
    }
  }

  /** Downloads m and v (one readback) with the step count. */
  async state(): Promise<AdamWState> {
    const values = await this.#gpu.readAll(this.#slots.flatMap((s) => [s.m, s.v]));
    const m = new Map<string, Float32Array>();
    const v = new Map<string, Float32Array>();
    this.#slots.forEach((s, i) => {
      m.set(s.name, values[2 * i] as Float32Array);
      v.set(s.name, values[2 * i + 1] as Float32Array);
    });
    return { step: this.#step, m, v };
  }

  /** Restores a state from `state()`; every parameter must be present with its size. */
  loadState(state: AdamWState): void {
    if (!Number.isInteger(state.step) || state.step < 0) {
      throw new Error(`AdamW.loadState: step must be a non-negative integer, got ${state.step}`);
    }
    for (const s of this.#slots) {
      for (const [what, moments] of [["m", state.m], ["v", state.v]] as const) {
        const values = moments.get(s.name);
        if (!values || values.length !== s.param.size) {
          throw new Error(
            `AdamW.loadState: ${what} for parameter '${s.name}' [${s.param.shape}] is ` +
              (values ? `${values.length} values, not ${s.param.size}` : "missing") +
              `; the checkpoint belongs to another model or LoRA configuration`,
          );
        }
      }
    }
    for (const s of this.#slots) {
      this.#gpu.write(s.m, state.m.get(s.name)!);
      this.#gpu.write(s.v, state.v.get(s.name)!);
    }
    this.#step = state.step;
  }

  /** Releases the moment buffers (not the parameters). */
  destroy(): void {
    for (const s of this.#slots) {
      s.m.destroy();
      s.v.destroy();
    }
  }
}

/** HF `TrainingArguments.get_warmup_steps`: `ceil(total * ratio)`, float product included. */
export function warmupSteps(total: number, ratio: number = DEFAULT_WARMUP_RATIO): number {
  if (!Number.isInteger(total) || total < 0 || !(ratio >= 0 && ratio <= 1)) {
    throw new Error(
      `warmupSteps: total must be a non-negative integer and ratio in [0, 1] ` +
        `(got ${total}, ${ratio})`,
    );
  }
  return Math.ceil(total * ratio);
}

/**
 * Learning-rate multiplier for optimizer step `step` (0-based), as HF
 * `get_cosine_with_min_lr_schedule_with_warmup` (num_cycles 0.5): linear warm-up from 0,
 * then a half cosine from 1 down to `minLrRatio` at `total`.
 */
export function lrFactor(
  step: number,
  total: number,
  warmup: number,
  minLrRatio: number = DEFAULT_MIN_LR_RATIO,
): number {
  if (step < warmup) return step / Math.max(1, warmup);
  const progress = (step - warmup) / Math.max(1, total - warmup);
  // HF's cos(pi * num_cycles * 2 * progress) with num_cycles 0.5.
  const cosine = 0.5 * (1 + Math.cos(Math.PI * progress));
  return Math.max(0, cosine * (1 - minLrRatio) + minLrRatio);
}
