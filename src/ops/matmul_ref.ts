/** Plain TypeScript reference for the matmul kernels (f64 accumulation). */

export interface MatmulRefShape {
  m: number;
  n: number;
  k: number;
  /** Batches (default 1); x, w (when batchedW) and y are laid out batch after batch. */
  batch?: number;
  /** w has a batch dimension; otherwise one w serves every batch. */
  batchedW?: boolean;
  /** x is [K, M] per batch instead of [M, K]. */
  transposeX?: boolean;
  /** w is [N, K] per batch (default) instead of [K, N]. */
  transposeW?: boolean;
  /** [N], added to every row. */
  bias?: Float32Array;
  /** Scales the product (not the bias); default 1. */
  alpha?: number;
  /** The result is added to these values (the kernel's `accumulate` into `out`). */
  accumulateInto?: Float32Array;
}

/** y[b, m, n] = into + alpha · sum_k x(b, m, k) w(b, k, n) + bias[n], per the layouts in `shape`. */
export function matmulRef(x: Float32Array, w: Float32Array, shape: MatmulRefShape): Float32Array {
  const {
    m,
    n,
    k,
    batch = 1,
    batchedW = false,
    transposeX = false,
    transposeW = true,
    bias,
    alpha = 1,
    accumulateInto,
  } = shape;
  const y = new Float32Array(batch * m * n);
  for (let b = 0; b < batch; b++) {
    const xb = b * m * k;
    const wb = batchedW ? b * n * k : 0;
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let sum = 0;
        for (let t = 0; t < k; t++) {
          const xv = transposeX ? x[xb + t * m + i] : x[xb + i * k + t];
          const wv = transposeW ? w[wb + j * k + t] : w[wb + t * n + j];
          sum += xv * wv;
        }
        const at = (b * m + i) * n + j;
        y[at] = (accumulateInto ? accumulateInto[at] : 0) + alpha * sum + (bias ? bias[j] : 0);
      }
    }
  }
  return y;
}
