/** Plain TypeScript references for the layout ops (row-major, rows x width views). */

/** a [rows, da] and b [rows, db] -> [rows, da + db]. */
export function concatLastAxisRef(
  a: Float32Array,
  da: number,
  b: Float32Array,
  db: number,
): Float32Array {
  const rows = a.length / da;
  const out = new Float32Array(rows * (da + db));
  for (let r = 0; r < rows; r++) {
    out.set(a.subarray(r * da, (r + 1) * da), r * (da + db));
    out.set(b.subarray(r * db, (r + 1) * db), r * (da + db) + da);
  }
  return out;
}

/** x [rows, sum(sizes)] -> [rows, sizes[i]] each. */
export function splitLastAxisRef(x: Float32Array, sizes: readonly number[]): Float32Array[] {
  const width = sizes.reduce((s, n) => s + n, 0);
  const rows = x.length / width;
  let start = 0;
  return sizes.map((size) => {
    const part = new Float32Array(rows * size);
    for (let r = 0; r < rows; r++) {
      part.set(x.subarray(r * width + start, r * width + start + size), r * size);
    }
    start += size;
    return part;
  });
}

/** a [B, Ta, D] and b [B, Tb, D] (or [Tb, D] shared by every batch row) -> [B, Ta + Tb, D]. */
export function concatRowsRef(
  a: Float32Array | Float64Array,
  b: Float32Array | Float64Array,
  batch: number,
  ta: number,
  tb: number,
  dim: number,
  bShared: boolean,
): Float64Array {
  const out = new Float64Array(batch * (ta + tb) * dim);
  for (let i = 0; i < batch; i++) {
    const bRow = bShared ? 0 : i;
    out.set(a.subarray(i * ta * dim, (i + 1) * ta * dim), i * (ta + tb) * dim);
    out.set(b.subarray(bRow * tb * dim, (bRow + 1) * tb * dim), (i * (ta + tb) + ta) * dim);
  }
  return out;
}

/** dOut [B, Ta + Tb, D] -> da [B, Ta, D] and db [B, Tb, D] (or [Tb, D] summed over B when shared). */
export function concatRowsBackwardRef(
  dOut: ArrayLike<number>,
  batch: number,
  ta: number,
  tb: number,
  dim: number,
  bShared: boolean,
): { da: Float64Array; db: Float64Array } {
  const da = new Float64Array(batch * ta * dim);
  const db = new Float64Array((bShared ? 1 : batch) * tb * dim);
  for (let i = 0; i < batch; i++) {
    const bRow = bShared ? 0 : i;
    for (let r = 0; r < ta + tb; r++) {
      for (let d = 0; d < dim; d++) {
        const g = dOut[(i * (ta + tb) + r) * dim + d];
        if (r < ta) da[(i * ta + r) * dim + d] = g;
        else db[(bRow * tb + r - ta) * dim + d] += g;
      }
    }
  }
  return { da, db };
}

/** x [B, T, D] -> [B, D], the mean over the first lengths[b] rows (all rows without lengths). */
export function meanOverSequenceRef(
  x: ArrayLike<number>,
  batch: number,
  t: number,
  dim: number,
  lengths?: ArrayLike<number>,
): Float64Array {
  const out = new Float64Array(batch * dim);
  for (let b = 0; b < batch; b++) {
    const len = lengths ? lengths[b] : t;
    if (len === 0) continue;
    for (let d = 0; d < dim; d++) {
      let sum = 0;
      for (let r = 0; r < len; r++) sum += x[(b * t + r) * dim + d];
      out[b * dim + d] = sum / len;
    }
  }
  return out;
}

/** dy [B, D] -> dx [B, T, D]: dy[b] / len_b on the first len_b rows, 0 on the rest. */
export function meanOverSequenceBackwardRef(
  dy: ArrayLike<number>,
  batch: number,
  t: number,
  dim: number,
  lengths?: ArrayLike<number>,
): Float64Array {
  const dx = new Float64Array(batch * t * dim);
  for (let b = 0; b < batch; b++) {
    const len = lengths ? lengths[b] : t;
    for (let r = 0; r < len; r++) {
      for (let d = 0; d < dim; d++) dx[(b * t + r) * dim + d] = dy[b * dim + d] / len;
    }
  }
  return dx;
}
