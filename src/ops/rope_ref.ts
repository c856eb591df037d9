/** Float64 reference for RoPE, written as transformers' `q * cos + rotate_half(q) * sin`. */

/**
 * x [tokens, heads, headDim]; `positions[t]` is token t's position and `angle(pos, i)` the
 * angle of frequency i (< headDim / 2) there.
 */
export function ropeRef(
  x: Float32Array,
  heads: number,
  headDim: number,
  positions: ArrayLike<number>,
  angle: (position: number, i: number) => number,
): Float32Array {
  const half = headDim / 2;
  const out = new Float32Array(x.length);
  for (let t = 0; t < positions.length; t++) {
    // emb = cat(freqs, freqs): feature d uses frequency d mod hd/2.
    const cos = Array.from({ length: headDim }, (_, d) => Math.cos(angle(positions[t], d % half)));
    const sin = Array.from({ length: headDim }, (_, d) => Math.sin(angle(positions[t], d % half)));
    for (let h = 0; h < heads; h++) {
      const q = x.subarray((t * heads + h) * headDim, (t * heads + h + 1) * headDim);
      // rotate_half(q) = cat(-q[half:], q[:half])
      const rotated = Array.from(
        { length: headDim },
        (_, d) => (d < half ? -q[d + half] : q[d - half]),
      );
      for (let d = 0; d < headDim; d++) {
        out[(t * heads + h) * headDim + d] = q[d] * cos[d] + rotated[d] * sin[d];
      }
    }
  }
  return out;
}
