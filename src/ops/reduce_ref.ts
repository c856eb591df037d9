/** Plain TypeScript reference for the reductions (f64 sums). */

/** x [rows, cols] -> [cols], the sum of every column. */
export function columnSumRef(x: ArrayLike<number>, cols: number): Float64Array {
  const out = new Float64Array(cols);
  const rows = cols === 0 ? 0 : x.length / cols;
  for (let r = 0; r < rows; r++) {
    for (let j = 0; j < cols; j++) out[j] += x[r * cols + j];
  }
  return out;
}
