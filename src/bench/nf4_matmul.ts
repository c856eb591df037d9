/** NF4 matmul throughput at the Qwen3-4B projection shapes, forward and input gradient. */
import { nf4Quantize } from "../ops/nf4.ts";
import { nf4Matmul, nf4MatmulInputGrad, uploadNf4Weight } from "../ops/nf4_matmul.ts";
import { Rng } from "../util/rng.ts";
import { type Bench, type BenchResult, timeGpu } from "./harness.ts";

/** [m, k, n]: 256 tokens through up/gate and down of Qwen3-4B, and a 32-token q/o projection. */
export const NF4_BENCH_SHAPES: ReadonlyArray<readonly [number, number, number]> = [
  [256, 2560, 9728],
  [256, 9728, 2560],
  [32, 2560, 2560],
];

export const nf4MatmulBench: Bench = {
  name: "nf4_matmul",
  summary: "fused NF4 dequant-matmul (y = x Wᵀ) and its input gradient (dx = dy W)",
  async run({ gpu, baselineGflops }) {
    const results: BenchResult[] = [];
    const rng = new Rng(7);
    for (const [m, k, n] of NF4_BENCH_SHAPES) {
      const fill = (size: number) => rng.fillNormal(new Float32Array(size), 0.5);
      const w = uploadNf4Weight(gpu, nf4Quantize(fill(n * k)), n, k, "bench.w");
      const x = gpu.upload(fill(m * k), [m, k], "f32", "bench.x");
      const dy = gpu.upload(fill(m * n), [m, n], "f32", "bench.dy");
      const y = gpu.empty([m, n], "f32", "bench.y");
      const dx = gpu.empty([m, k], "f32", "bench.dx");
      const flops = 2 * m * n * k;
      const cases = [
        ["nf4_matmul", () => nf4Matmul(gpu, x, w, { out: y })],
        ["nf4_matmul_input_grad", () => nf4MatmulInputGrad(gpu, dy, w, { out: dx })],
      ] as const;
      for (const [name, record] of cases) {
        const { ms, cpuMs } = await timeGpu(gpu, record, { reps: 3 });
        const gflops = flops / ms / 1e6;
        results.push({ name, m, n, k, ms, cpuMs, gflops, vsBaseline: gflops / baselineGflops });
      }
      for (const t of [w.packed, w.absmax, x, dy, y, dx]) t.destroy();
    }
    return results;
  },
};
