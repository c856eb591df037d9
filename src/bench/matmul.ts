/** Matmul throughput: square f32 products and the Linear shapes the models run. */
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { f32ArrayToBf16, f32ArrayToF16 } from "../io/dtype.ts";
import { isCpuAdapter, matmul, type MatmulWeightType } from "../ops/matmul.ts";
import { Rng } from "../util/rng.ts";
import { type Bench, type BenchResult, timeGpu } from "./harness.ts";

const SQUARE_SIZES = [256, 512, 1000, 1024, 2048];

/** [m, k, n] with what runs it: y [m, n] = x [m, k] Wᵀ, W [n, k]. */
const MODEL_SHAPES: ReadonlyArray<{ m: number; k: number; n: number; model: string }> = [
  { m: 256, k: 2560, n: 9728, model: "Qwen3-4B MLP up/gate, 256 tokens" },
  { m: 77, k: 1280, n: 5120, model: "CLIP ViT-bigG MLP fc1, 77 tokens" },
];

const WEIGHT_TYPES: readonly MatmulWeightType[] = ["f32", "f16", "bf16"];

/** Seeded values in [-0.5, 0.5): the bench times the products, the values only must be finite. */
function uniformValues(n: number, seed: number): Float32Array {
  return new Rng(seed).fillUniform(new Float32Array(n), -0.5, 0.5);
}

function uploadWeight(gpu: Gpu, type: MatmulWeightType, n: number, k: number): Tensor {
  const values = uniformValues(n * k, 2);
  const data = type === "f32"
    ? values
    : type === "f16"
    ? f32ArrayToF16(values)
    : f32ArrayToBf16(values);
  return gpu.upload(data, [n, k], type, `bench.w.${type}`);
}

async function timeCase(
  gpu: Gpu,
  m: number,
  n: number,
  k: number,
  type: MatmulWeightType,
  extra: Record<string, unknown>,
  baselineGflops: number,
  kernel: "registers" | "workgroup" = "registers",
): Promise<BenchResult> {
  const x = gpu.upload(uniformValues(m * k, 1), [m, k], "f32", "bench.x");
  const w = uploadWeight(gpu, type, n, k);
  const y = gpu.empty([m, n], "f32", "bench.y");
  const flops = 2 * m * n * k;
  // Products over a second get 3 timed repetitions instead of 5 to keep the bench short.
  const reps = flops > 1e10 ? 3 : 5;
  const { ms, cpuMs } = await timeGpu(gpu, () => matmul(gpu, x, w, { out: y, kernel }), { reps });
  for (const t of [x, w, y]) t.destroy();
  const gflops = flops / ms / 1e6;
  return {
    name: "matmul",
    m,
    n,
    k,
    weights: type,
    layout: "y = x Wᵀ",
    kernel,
    ...extra,
    ms,
    cpuMs,
    gflops,
    vsBaseline: gflops / baselineGflops,
  };
}

export const matmulBench: Bench = {
  name: "matmul",
  summary: "f32 square products and the models' Linear shapes with f32, f16 and bf16 weights",
  async run({ gpu, baselineGflops, torch }) {
    const results: BenchResult[] = [];
    for (const s of SQUARE_SIZES) {
      const result = await timeCase(gpu, s, s, s, "f32", {}, baselineGflops);
      // The yardstick: 1024³ against PyTorch's (numpy's) OpenBLAS in the same run.
      if (s === 1024 && torch?.matmul1024Gflops) {
        result.torchGflops = torch.matmul1024Gflops;
        result.fractionOfTorch = result.gflops! / torch.matmul1024Gflops;
      }
      results.push(result);
      // On a real GPU the workgroup-memory kernel too, beside the default register-tiled one,
      // to tell which should be the default there (CPU adapters would compile it for minutes).
      if (!isCpuAdapter(gpu)) {
        results.push(await timeCase(gpu, s, s, s, "f32", {}, baselineGflops, "workgroup"));
      }
    }
    for (const { m, k, n, model } of MODEL_SHAPES) {
      for (const type of WEIGHT_TYPES) {
        results.push(await timeCase(gpu, m, n, k, type, { model }, baselineGflops));
      }
    }
    return results;
  },
};
