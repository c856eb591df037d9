/** Float64 reference for the masked softmax kernel. */

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
  scores: Float32Array,
  [batch, heads, tq, tk]: readonly [number, number, number, number],
  { scale = 1, causal = false, causalOffset = 0, keyMask, keyLengths }: SoftmaxRefOptions = {},
): Float32Array {
  const out = new Float32Array(scores.length);
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
