/**
 * Plain TypeScript references for the NF4 matmuls: dequantise W with `nf4Dequantize`, then
 * float64 loops.
 */
import { NF4_BLOCK_SIZE, nf4Dequantize, type Nf4Quantized } from "./nf4.ts";

/** y [m, n] = x [m, k] W^T (+ bias), W [n, k] given quantised. */
export function nf4MatmulRef(
  x: ArrayLike<number>,
  w: Nf4Quantized,
  n: number,
  k: number,
  bias?: ArrayLike<number>,
  blockSize = NF4_BLOCK_SIZE,
): Float64Array {
  const weight = nf4Dequantize(w.packed, w.absmax, n * k, blockSize);
  const m = x.length / k;
  const y = new Float64Array(m * n);
  for (let r = 0; r < m; r++) {
    for (let c = 0; c < n; c++) {
      let sum = bias ? bias[c] : 0;
      for (let i = 0; i < k; i++) sum += x[r * k + i] * weight[c * k + i];
      y[r * n + c] = sum;
    }
  }
  return y;
}

/** dx [m, k] = dy [m, n] W, W [n, k] given quantised. */
export function nf4MatmulInputGradRef(
  dy: ArrayLike<number>,
  w: Nf4Quantized,
  n: number,
  k: number,
  blockSize = NF4_BLOCK_SIZE,
): Float64Array {
  const weight = nf4Dequantize(w.packed, w.absmax, n * k, blockSize);
  const m = dy.length / n;
  const dx = new Float64Array(m * k);
  for (let r = 0; r < m; r++) {
    for (let c = 0; c < n; c++) {
      const d = dy[r * n + c];
      for (let i = 0; i < k; i++) dx[r * k + i] += d * weight[c * k + i];
    }
  }
  return dx;
}
