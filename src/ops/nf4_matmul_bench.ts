/** Timings of the NF4 matmuls at Qwen3-4B projection shapes, for scripts/bench.ts. */
import type { Gpu } from "../gpu/device.ts";
import { nf4Quantize } from "../models/nf4.ts";
import { nf4Matmul, nf4MatmulInputGrad, uploadNf4Weight } from "./nf4_matmul.ts";

export interface Nf4MatmulBenchEntry {
  /** "nf4_matmul" (y = x W^T) or "nf4_matmul_input_grad" (dx = dy W). */
  name: string;
  m: number;
  n: number;
  k: number;
  /** Best wall time of one call over the repetitions, GPU work included. */
  ms: number;
  gflops: number;
}

/** [m, k, n]: 256 tokens through up/gate and down of Qwen3-4B, and a 32-token q/o projection. */
export const NF4_BENCH_SHAPES: ReadonlyArray<readonly [number, number, number]> = [
  [256, 2560, 9728],
  [256, 9728, 2560],
  [32, 2560, 2560],
];

/** Deterministic values in [-1, 1) without a PRNG dependency. */
function filled(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = s / 2 ** 31 - 1;
  }
  return a;
}

async function bestOf(gpu: Gpu, reps: number, run: () => void): Promise<number> {
  run(); // compiles the pipelines and stages the tile buffer
  await gpu.sync();
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const start = performance.now();
    run();
    await gpu.sync();
    best = Math.min(best, performance.now() - start);
  }
  return best;
}

/**
 * Times `nf4Matmul` and `nf4MatmulInputGrad` for each [m, k, n] shape (best of `reps` calls
 * after a warm-up call) and returns one entry per op and shape.
 */
export async function benchNf4Matmul(
  gpu: Gpu,
  opts: { shapes?: ReadonlyArray<readonly [number, number, number]>; reps?: number } = {},
): Promise<Nf4MatmulBenchEntry[]> {
  const { shapes = NF4_BENCH_SHAPES, reps = 2 } = opts;
  const entries: Nf4MatmulBenchEntry[] = [];
  for (const [m, k, n] of shapes) {
    const w = uploadNf4Weight(gpu, nf4Quantize(filled(n * k, 1)), n, k, "bench.w");
    const x = gpu.upload(filled(m * k, 2), [m, k], "f32", "bench.x");
    const dy = gpu.upload(filled(m * n, 3), [m, n], "f32", "bench.dy");
    const y = gpu.empty([m, n], "f32", "bench.y");
    const dx = gpu.empty([m, k], "f32", "bench.dx");
    const flops = 2 * m * n * k;
    const timed = [
      ["nf4_matmul", () => nf4Matmul(gpu, x, w, { out: y })],
      ["nf4_matmul_input_grad", () => nf4MatmulInputGrad(gpu, dy, w, { out: dx })],
    ] as const;
    for (const [name, run] of timed) {
      const ms = await bestOf(gpu, reps, run);
      entries.push({ name, m, n, k, ms, gflops: flops / ms / 1e6 });
    }
    for (const t of [w.packed, w.absmax, x, dy, y, dx]) t.destroy();
  }
  return entries;
}
