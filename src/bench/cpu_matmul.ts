/**
 * The bench's CPU yardstick: a cache-blocked matmul in plain TypeScript (numpy cannot run
 * inside Deno), so GPU results can be read as "x times what TypeScript alone does here".
 */
import { timeHost } from "./harness.ts";

const BLOCK = 64;

/** c[m, n] = a[m, k] b[k, n], all row-major f32, blocked so each block stays in cache. */
export function blockedMatmul(
  a: Float32Array,
  b: Float32Array,
  m: number,
  n: number,
  k: number,
): Float32Array {
  const c = new Float32Array(m * n);
  for (let i0 = 0; i0 < m; i0 += BLOCK) {
    const i1 = Math.min(i0 + BLOCK, m);
    for (let p0 = 0; p0 < k; p0 += BLOCK) {
      const p1 = Math.min(p0 + BLOCK, k);
      for (let j0 = 0; j0 < n; j0 += BLOCK) {
        const j1 = Math.min(j0 + BLOCK, n);
        for (let i = i0; i < i1; i++) {
          const row = i * n;
          for (let p = p0; p < p1; p++) {
            const av = a[i * k + p];
            const bRow = p * n;
            for (let j = j0; j < j1; j++) c[row + j] += av * b[bRow + j];
          }
        }
      }
    }
  }
  return c;
}

export interface CpuMatmulTiming {
  size: number;
  ms: number;
  gflops: number;
}

/** Median time of `blockedMatmul` on square matrices of each size. */
export function timeBlockedMatmul(sizes: readonly number[], reps = 3): CpuMatmulTiming[] {
  return sizes.map((size) => {
    const a = new Float32Array(size * size).map((_, i) => ((i * 7919) % 1000) / 1000 - 0.5);
    const b = new Float32Array(size * size).map((_, i) => ((i * 104729) % 1000) / 1000 - 0.5);
    const ms = timeHost(() => blockedMatmul(a, b, size, size, size), reps);
    return { size, ms, gflops: (2 * size ** 3) / ms / 1e6 };
  });
}
