/** Float64 references for RoPE, written as transformers' `q * cos + rotate_half(q) * sin`. */

/** The angle of frequency i (< headDim / 2) at a position. */
export type RopeAngleFn = (position: number, i: number) => number;

/**
 * x [tokens, heads, headDim]; `positions[t]` is token t's position and `angle(pos, i)` the
 * angle of frequency i there.
 */
export function ropeRef(
  x: ArrayLike<number>,
  heads: number,
  headDim: number,
  positions: ArrayLike<number>,
  angle: RopeAngleFn,
): Float64Array {
  const half = headDim / 2;
  const out = new Float64Array(x.length);
  for (let t = 0; t < positions.length; t++) {
    // emb = cat(freqs, freqs): feature d uses frequency d mod hd/2.
    const cos = Array.from({ length: headDim }, (_, d) => Math.cos(angle(positions[t], d % half)));
    const sin = Array.from({ length: headDim }, (_, d) => Math.sin(angle(positions[t], d % half)));
    for (let h = 0; h < heads; h++) {
      const base = (t * heads + h) * headDim;
      for (let d = 0; d < headDim; d++) {
        // rotate_half(q) = cat(-q[half:], q[:half])
        const rotated = d < half ? -x[base + d + half] : x[base + d - half];
        out[base + d] = x[base + d] * cos[d] + rotated * sin[d];
      }
    }
  }
  return out;
}

/** dx from dy: each pair is rotated back by -angle (a rotation's transpose is its inverse). */
export function ropeBackwardRef(
  dy: ArrayLike<number>,
  heads: number,
  headDim: number,
  positions: ArrayLike<number>,
  angle: RopeAngleFn,
): Float64Array {
  return ropeRef(dy, heads, headDim, positions, (pos, i) => -angle(pos, i));
}
