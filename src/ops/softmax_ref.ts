/** Float64 references for the masked softmax kernel and its backward. */

export interface SoftmaxRefOptions {
  scale?: number;
  causal?: boolean;
  causalOffset?: number;
  /** [batch * Tk], nonzero = visible. */
  keyMask?: ArrayLike<number>;
  /** [batch]. */
  keyLengths?: ArrayLike<number>;
}

/** scores [batch, heads, Tq, Tk]; hidden keys get 0, rows with no visible key are all 0. */
export function softmaxRef(
  scores: ArrayLike<number>,
  [batch, heads, tq, tk]: readonly [number, number, number, number],
  { scale = 1, causal = false, causalOffset = 0, keyMask, keyLengths }: SoftmaxRefOptions = {},
): Float64Array {
  const out = new Float64Array(scores.length);
  for (let b = 0; b < batch; b++) {
    const seen = (i: number, j: number) =>
      (!causal || j <= i + causalOffset) &&
      (!keyMask || keyMask[b * tk + j] !== 0) &&
      (!keyLengths || j < keyLengths[b]);
    for (let h = 0; h < heads; h++) {
      for (let i = 0; i < tq; i++) {
        const base = ((b * heads + h) * tq + i) * tk;
        let max = -Infinity;
        for (let j = 0; j < tk; j++) if (seen(i, j)) max = Math.max(max, scores[base + j] * scale);
        let sum = 0;
        for (let j = 0; j < tk; j++) {
          if (seen(i, j)) sum += Math.exp(scores[base + j] * scale - max);
        }
        for (let j = 0; j < tk; j++) {
          out[base + j] = seen(i, j) ? Math.exp(scores[base + j] * scale - max) / sum : 0;
        }
      }
    }
  }
  return out;
}

/** d scores = scale * P * (dP - sum_j dP_j P_j) per row of length `tk`. */
export function softmaxBackwardRef(
  dP: ArrayLike<number>,
  P: ArrayLike<number>,
  tk: number,
  scale = 1,
): Float64Array {
  const dScores = new Float64Array(P.length);
  for (let base = 0; base < P.length; base += tk) {
    let dot = 0;
    for (let j = 0; j < tk; j++) dot += dP[base + j] * P[base + j];
    for (let j = 0; j < tk; j++) dScores[base + j] = scale * P[base + j] * (dP[base + j] - dot);
  }
  return dScores;
}
