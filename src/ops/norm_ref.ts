/**
 * Plain TypeScript references for the norm kernels, forward and backward, all in float64
 * (inputs may be f32 or f64 arrays) so the backward passes can be checked by finite differences.
 */

export interface LayerNormGradsRef {
  dx: Float64Array;
  dweight: Float64Array;
  dbias: Float64Array;
}

export interface RmsNormGradsRef {
  dx: Float64Array;
  dweight: Float64Array;
}

/** torch.nn.LayerNorm over runs of `weight.length` elements; also returns per-row mean and rstd. */
export function layerNormRef(
  x: ArrayLike<number>,
  weight: ArrayLike<number>,
  bias: ArrayLike<number>,
  eps: number,
): { y: Float64Array; mean: Float64Array; rstd: Float64Array } {
  const d = weight.length;
  const rows = x.length / d;
  const y = new Float64Array(x.length);
  const mean = new Float64Array(rows);
  const rstd = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let sum = 0;
    for (let j = 0; j < d; j++) sum += x[r * d + j];
    const mu = sum / d;
    let sq = 0;
    for (let j = 0; j < d; j++) sq += (x[r * d + j] - mu) ** 2;
    const s = 1 / Math.sqrt(sq / d + eps);
    for (let j = 0; j < d; j++) y[r * d + j] = (x[r * d + j] - mu) * s * weight[j] + bias[j];
    mean[r] = mu;
    rstd[r] = s;
  }
  return { y, mean, rstd };
}

/** `x / sqrt(mean(x^2) + eps) * weight` over runs of `weight.length` elements, with rstd per row. */
export function rmsNormRef(
  x: ArrayLike<number>,
  weight: ArrayLike<number>,
  eps: number,
): { y: Float64Array; rstd: Float64Array } {
  const d = weight.length;
  const rows = x.length / d;
  const y = new Float64Array(x.length);
  const rstd = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let sq = 0;
    for (let j = 0; j < d; j++) sq += x[r * d + j] ** 2;
    const s = 1 / Math.sqrt(sq / d + eps);
    for (let j = 0; j < d; j++) y[r * d + j] = x[r * d + j] * s * weight[j];
    rstd[r] = s;
  }
  return { y, rstd };
}

/**
 * Gradients of sum(dy * y) for y = norm(x) * weight (+ bias), with xhat the normalised row
 * (centred for LayerNorm) and g = dy * weight:
 *   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (no mean(g) term for RMSNorm)
 *   dweight = sum over rows of dy * xhat, dbias = sum over rows of dy.
 */
function normBackwardRef(
  dy: ArrayLike<number>,
  x: ArrayLike<number>,
  weight: ArrayLike<number>,
  mean: ArrayLike<number> | null,
  rstd: ArrayLike<number>,
): LayerNormGradsRef {
  const d = weight.length;
  const rows = x.length / d;
  const dx = new Float64Array(x.length);
  const dweight = new Float64Array(d);
  const dbias = new Float64Array(d);
  for (let r = 0; r < rows; r++) {
    const mu = mean ? mean[r] : 0;
    const xhat = Array.from({ length: d }, (_, j) => (x[r * d + j] - mu) * rstd[r]);
    const g = Array.from({ length: d }, (_, j) => dy[r * d + j] * weight[j]);
    const meanG = mean ? g.reduce((a, b) => a + b) / d : 0;
    const meanGx = g.reduce((a, gj, j) => a + gj * xhat[j], 0) / d;
    for (let j = 0; j < d; j++) {
      dx[r * d + j] = rstd[r] * (g[j] - meanG - xhat[j] * meanGx);
      dweight[j] += dy[r * d + j] * xhat[j];
      dbias[j] += dy[r * d + j];
    }
  }
  return { dx, dweight, dbias };
}

export function layerNormBackwardRef(
  dy: ArrayLike<number>,
  x: ArrayLike<number>,
  weight: ArrayLike<number>,
  eps: number,
): LayerNormGradsRef {
  const { mean, rstd } = layerNormRef(x, weight, new Float64Array(weight.length), eps);
  return normBackwardRef(dy, x, weight, mean, rstd);
}

export function rmsNormBackwardRef(
  dy: ArrayLike<number>,
  x: ArrayLike<number>,
  weight: ArrayLike<number>,
  eps: number,
): RmsNormGradsRef {
  const { dx, dweight } = normBackwardRef(dy, x, weight, null, rmsNormRef(x, weight, eps).rstd);
  return { dx, dweight };
}
