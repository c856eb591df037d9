/** Plain TypeScript references for the norm kernels (float64 accumulation). */

/** torch.nn.LayerNorm over runs of `weight.length` elements; also returns per-row mean and rstd. */
export function layerNormRef(
  x: Float32Array,
  weight: Float32Array,
  bias: Float32Array,
  eps: number,
): { y: Float32Array; mean: Float32Array; rstd: Float32Array } {
  const d = weight.length;
  const rows = x.length / d;
  const y = new Float32Array(x.length);
  const mean = new Float32Array(rows);
  const rstd = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    const row = x.subarray(r * d, (r + 1) * d);
    let sum = 0;
    for (const v of row) sum += v;
    const mu = sum / d;
    let sq = 0;
    for (const v of row) sq += (v - mu) * (v - mu);
    const s = 1 / Math.sqrt(sq / d + eps);
    for (let j = 0; j < d; j++) y[r * d + j] = (row[j] - mu) * s * weight[j] + bias[j];
    mean[r] = mu;
    rstd[r] = s;
  }
  return { y, mean, rstd };
}

/** `x / sqrt(mean(x^2) + eps) * weight` over runs of `weight.length` elements, with rstd per row. */
export function rmsNormRef(
  x: Float32Array,
  weight: Float32Array,
  eps: number,
): { y: Float32Array; rstd: Float32Array } {
  const d = weight.length;
  const rows = x.length / d;
  const y = new Float32Array(x.length);
  const rstd = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    const row = x.subarray(r * d, (r + 1) * d);
    let sq = 0;
    for (const v of row) sq += v * v;
    const s = 1 / Math.sqrt(sq / d + eps);
    for (let j = 0; j < d; j++) y[r * d + j] = row[j] * s * weight[j];
    rstd[r] = s;
  }
  return { y, rstd };
}
