/** Plain f64 TypeScript references for the optimiser kernels (src/train/optim.ts). */

/** `mean((pred - target)^2)` and `2 (pred - target) / n * lossScale`. */
export function mseLossRef(
  pred: ArrayLike<number>,
  target: ArrayLike<number>,
  lossScale = 1,
): { loss: number; grad: Float64Array } {
  const n = pred.length;
  const grad = new Float64Array(n);
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const d = pred[i] - target[i];
    sum += d * d;
    grad[i] = (2 * d * lossScale) / n;
  }
  return { loss: sum / n, grad };
}

export function sumOfSquaresRef(x: ArrayLike<number>): number {
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
  return sum;
}

export interface AdamWStepRef {
  lr: number;
  weightDecay: number;
  beta1: number;
  beta2: number;
  eps: number;
  /** 1-based step count after this update. */
  step: number;
  clipCoef: number;
}

/** One AdamW update in place, in the textbook form (decay first, then the Adam step). */
export function adamwStepRef(
  param: Float64Array,
  grad: ArrayLike<number>,
  m: Float64Array,
  v: Float64Array,
  o: AdamWStepRef,
): void {
  for (let i = 0; i < param.length; i++) {
    const g = grad[i] * o.clipCoef;
    m[i] = o.beta1 * m[i] + (1 - o.beta1) * g;
    v[i] = o.beta2 * v[i] + (1 - o.beta2) * g * g;
    const mHat = m[i] / (1 - o.beta1 ** o.step);
    const vHat = v[i] / (1 - o.beta2 ** o.step);
    param[i] *= 1 - o.lr * o.weightDecay;
    param[i] -= (o.lr * mHat) / (Math.sqrt(vHat) + o.eps);
  }
}
