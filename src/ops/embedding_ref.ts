/** Plain TypeScript reference for the embedding gather. */

/** table [V, dim] (already widened to f32) -> out [ids.length, dim]. */
export function embeddingGatherRef(
  table: Float32Array,
  dim: number,
  ids: ArrayLike<number>,
): Float32Array {
  const out = new Float32Array(ids.length * dim);
  for (let n = 0; n < ids.length; n++) {
    out.set(table.subarray(ids[n] * dim, (ids[n] + 1) * dim), n * dim);
  }
  return out;
}
