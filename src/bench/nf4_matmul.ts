/**
 * NF4 matmul at the student bench's projection shapes (256 tokens): the NF4 product (decode +
 * matmul) and the same product over an f32 weight, forward (y = x Wᵀ) and input gradient
 * (dx = dy W), so the NF4 overhead per shape reads off the rows; then the decode of W alone and
 * the products with W decoded to f16. One few-row shape times the fused kernels encode takes.
 */
import { matmul } from "../ops/matmul.ts";
import { NF4_BLOCK_SIZE, nf4Dequantize, nf4Quantize } from "../ops/nf4.ts";
import {
  DEQUANTIZE_MIN_ROWS,
  nf4DecodeWeight,
  nf4Matmul,
  nf4MatmulInputGrad,
  type Nf4Weight,
  uploadNf4Weight,
} from "../ops/nf4_matmul.ts";
import { qwen3LinearShapes } from "../models/qwen3_weights.ts";
import { Rng } from "../util/rng.ts";
import { type Bench, type BenchResult, timeGpu } from "./harness.ts";
import { STUDENT_BENCH_CONFIG, STUDENT_BENCH_TOKENS } from "./student.ts";

/** [m, k, n] and the projections of the student bench model that have that shape. */
function benchShapes(): Array<{ m: number; k: number; n: number; layers: string }> {
  const byShape = new Map<string, { m: number; k: number; n: number; layers: string }>();
  for (const [name, { in: k, out: n }] of Object.entries(qwen3LinearShapes(STUDENT_BENCH_CONFIG))) {
    const key = `${k}x${n}`;
    const known = byShape.get(key);
    if (known) known.layers += `,${name}`;
    else byShape.set(key, { m: STUDENT_BENCH_TOKENS, k, n, layers: name });
  }
  // One prompt's worth of rows: the fused kernels on CPU adapters (fewer than
  // DEQUANTIZE_MIN_ROWS rows); real GPUs decode W first at any row count.
  return [...byShape.values(), { m: 32, k: 1024, n: 3072, layers: "gate_proj,up_proj" }];
}

export const nf4MatmulBench: Bench = {
  name: "nf4_matmul",
  summary: "NF4 decode, NF4 matmul and the same matmul over f32 weights, per student shape",
  async run({ gpu, baselineGflops }) {
    const results: BenchResult[] = [];
    const rng = new Rng(7);
    for (const { m, k, n, layers } of benchShapes()) {
      const fill = (size: number) => rng.fillNormal(new Float32Array(size), 0.05);
      const q = nf4Quantize(fill(n * k));
      const w = uploadNf4Weight(gpu, q, n, k, "bench.w");
      const w16 = uploadNf4Weight(gpu, q, n, k, "bench.w16", NF4_BLOCK_SIZE, "f16");
      const wf = gpu.upload(nf4Dequantize(q.packed, q.absmax, n * k), [n, k], "f32", "bench.wf");
      const x = gpu.upload(fill(m * k), [m, k], "f32", "bench.x");
      const dy = gpu.upload(fill(m * n), [m, n], "f32", "bench.dy");
      const y = gpu.empty([m, n], "f32", "bench.y");
      const dx = gpu.empty([m, k], "f32", "bench.dx");
      const flops = 2 * m * n * k;
      const forward = (weight: Nf4Weight) => () => nf4Matmul(gpu, x, weight, { out: y });
      const inputGrad = (weight: Nf4Weight) => () =>
        nf4MatmulInputGrad(gpu, dy, weight, { out: dx });
      const cases: Array<[string, () => void, number]> = [
        ["nf4_matmul", forward(w), flops],
        ["f32_matmul", () => matmul(gpu, x, wf, { out: y }), flops],
        ["nf4_matmul_input_grad", inputGrad(w), flops],
        ["f32_matmul_input_grad", () => matmul(gpu, dy, wf, { transposeW: false, out: dx }), flops],
      ];
      if (m >= DEQUANTIZE_MIN_ROWS) {
        // The decode alone, and the products over W decoded to f16 (`decode: "f16"`).
        cases.push(
          ["nf4_decode_f32", () => nf4DecodeWeight(gpu, w).destroy(), 0],
          ["nf4_decode_f16", () => nf4DecodeWeight(gpu, w16).destroy(), 0],
          ["nf4_matmul_f16", forward(w16), flops],
          ["nf4_matmul_input_grad_f16", inputGrad(w16), flops],
        );
      }
      for (const [name, record, work] of cases) {
        const { ms, cpuMs } = await timeGpu(gpu, record, { reps: 3 });
        const gflops = work / ms / 1e6;
        results.push({
          name,
          m,
          n,
          k,
          layers,
          ms,
          cpuMs,
          ...(work > 0 ? { gflops, vsBaseline: gflops / baselineGflops } : {}),
        });
      }
      for (const t of [w.packed, w.absmax, w16.packed, w16.absmax, wf, x, dy, y, dx]) t.destroy();
    }
    return results;
  },
};
