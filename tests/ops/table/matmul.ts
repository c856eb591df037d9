/** matmul (f32, f16 and bf16 weights, every layout, batched, alpha, accumulate) and nf4Matmul. */
import {
  bf16ArrayToF32,
  f16ArrayToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
} from "../../../src/io/dtype.ts";
import { matmul, type MatmulTiling } from "../../../src/ops/matmul.ts";
import { matmulRef, type MatmulRefShape } from "../../../src/ops/matmul_ref.ts";
import { nf4Quantize } from "../../../src/ops/nf4.ts";
import { nf4Matmul, nf4MatmulInputGrad, uploadNf4Weight } from "../../../src/ops/nf4_matmul.ts";
import { nf4MatmulInputGradRef, nf4MatmulRef } from "../../../src/ops/nf4_matmul_ref.ts";
import { type Draw, gpuCase, type OpCheck, type Scope } from "../harness.ts";

/** A product's shape and layouts (as matmulRef takes them), with what the GPU run adds. */
interface MatmulSpec extends Omit<MatmulRefShape, "bias" | "accumulateInto"> {
  bias?: boolean;
  /** Accumulate into an `out` that already holds random values. */
  accumulate?: boolean;
  wType?: "f32" | "f16" | "bf16";
  /** x as [3, M / 3, K] instead of [M, K]: leading dims flatten into M. */
  x3d?: boolean;
  tiling?: MatmulTiling;
  kernel?: "registers" | "workgroup";
  /** Why the case is ignored on OpenGL, if it is. */
  glIgnore?: string;
}

/** `matmul nt 37x29x53 f32 bias`: layout letters for x and w (t = transposed), then options. */
function matmulName(s: MatmulSpec): string {
  const layout = `${s.transposeX ? "t" : "n"}${s.transposeW === false ? "n" : "t"}`;
  const dims = `${s.batch ? `${s.batch}x` : ""}${s.m}x${s.n}x${s.k}`;
  const flags = [
    s.batchedW ? "batched-w" : "",
    s.x3d ? "x3d" : "",
    s.bias ? "bias" : "",
    s.alpha !== undefined ? `alpha${s.alpha}` : "",
    s.accumulate ? "acc" : "",
    s.tiling ? `tile${s.tiling.rows}x${s.tiling.cols}` : "",
    s.kernel ? `${s.kernel}-kernel` : "",
  ].filter(Boolean);
  return ["matmul", layout, dims, s.wType ?? "f32", ...flags].join(" ");
}

interface MatmulHost {
  x: Float32Array;
  /** The weights as stored: 16-bit ones already rounded. */
  w: Float32Array;
  wBits?: Uint16Array;
  bias?: Float32Array;
  into?: Float32Array;
}

function matmulCase(s: MatmulSpec): OpCheck {
  const { m, n, k, batch = 1, batchedW = false, transposeX = false, transposeW = true } = s;
  const wType = s.wType ?? "f32";
  return gpuCase<MatmulHost>({
    name: matmulName(s),
    glIgnore: s.glIgnore,
    inputs(draw: Draw) {
      const x = draw.randn(batch * m * k);
      let w = draw.randn((batchedW ? batch : 1) * n * k, 0.5);
      let wBits: Uint16Array | undefined;
      if (wType !== "f32") {
        wBits = wType === "f16" ? f32ArrayToF16(w) : f32ArrayToBf16(w);
        w = wType === "f16" ? f16ArrayToF32(wBits) : bf16ArrayToF32(wBits);
      }
      const bias = s.bias ? draw.randn(n) : undefined;
      const into = s.accumulate ? draw.randn(batch * m * n) : undefined;
      return { x, w, wBits, bias, into };
    },
    gpu(scope: Scope, h) {
      const xDims = transposeX ? [k, m] : [m, k];
      const xShape = batchedW ? [batch, ...xDims] : s.x3d ? [3, m / 3, k] : xDims;
      const wDims = transposeW ? [n, k] : [k, n];
      const wShape = batchedW ? [batch, ...wDims] : wDims;
      const y = matmul(
        scope.gpu,
        scope.upload(h.x, xShape, "f32", "x"),
        scope.upload(h.wBits ?? h.w, wShape, wType, "w"),
        {
          transposeX,
          transposeW,
          bias: h.bias && scope.upload(h.bias, [n], "f32", "bias"),
          tiling: s.tiling,
          kernel: s.kernel,
          alpha: s.alpha,
          out: h.into && scope.upload(h.into, [batch * m * n], "f32", "out"),
          accumulate: s.accumulate,
        },
      );
      return { y };
    },
    reference: (h) => ({
      y: matmulRef(h.x, h.w, {
        m,
        n,
        k,
        batch,
        batchedW,
        transposeX,
        transposeW,
        bias: h.bias,
        alpha: s.alpha,
        accumulateInto: h.into,
      }),
    }),
    // The reference uses the rounded weights, so 16-bit weights only add f32 rounding too.
    nmse: 1e-7,
  });
}

const nt = { transposeW: true };
const nn = { transposeW: false };
const tn = { transposeX: true, transposeW: false };
const tt = { transposeX: true, transposeW: true };

/**
 * Odd sizes: a 1x1x1 product and 3 rows in the smallest row tile (pooled [B, D] inputs take it
 * forward and backward), and 65 rows over several row tiles with 7 columns in a partial column
 * tile and K = 33 left after 32. xᵀ Wᵀ keeps M a multiple of 4: its scalar-load variant takes
 * 13 s to compile on llvmpipe's OpenGL, and nothing runs it.
 */
const ODD: MatmulSpec[] = [
  ...[nt, nn].flatMap((layout) => [
    { m: 1, n: 1, k: 1, ...layout },
    { m: 3, n: 65, k: 7, ...layout },
    { m: 65, n: 7, k: 33, ...layout },
  ]),
  { m: 65, n: 7, k: 33, ...tn },
  { m: 36, n: 7, k: 33, ...tt, bias: true },
];

/** Batched [B, M, K] x [B, ., .] in every layout (a bias with xᵀ Wᵀ). */
function batchedSpecs(): MatmulSpec[] {
  return ([[nt, 52], [nn, 53], [tn, 53], [tt, 52]] as const).map(([layout, k]) => ({
    batch: 3,
    batchedW: true,
    m: 37,
    n: 29,
    k,
    ...layout,
    bias: layout === tt,
  }));
}

/**
 * The workgroup-memory kernel (`kernel: "workgroup"`, opt-in until timed on a real GPU): odd sizes
 * within one 64 x 64 tile and over several (M 130, N 70, K 33 past two 16-deep slabs), every
 * layout, batched, bias, alpha, accumulate and 16-bit weights. llvmpipe's OpenGL compiles each
 * variant of it in 20-46 s (Vulkan in well under 1 s), so on OpenGL two cases cover it: the
 * Linear layout with a bias and alpha, and dW's layout accumulating.
 */
const GL_SLOW = "llvmpipe takes 20-46 s to compile each variant of the workgroup kernel";
const WORKGROUP_KERNEL_SPECS: MatmulSpec[] = [
  ...([
    ...[nt, nn, tn, tt].flatMap((layout): MatmulSpec[] => [
      { m: 1, n: 1, k: 1, ...layout },
      { m: 130, n: 70, k: 33, ...layout },
    ]),
    { m: 37, n: 29, k: 53, ...nn, accumulate: true },
    ...batchedSpecs(),
    { m: 21, n: 29, k: 52, x3d: true },
    ...(["f16", "bf16"] as const).flatMap((wType): MatmulSpec[] => [
      { m: 37, n: 29, k: 53, wType, bias: true },
      { m: 37, n: 30, k: 21, wType, ...nn },
    ]),
  ] as MatmulSpec[]).map((spec): MatmulSpec => ({
    ...spec,
    kernel: "workgroup",
    glIgnore: GL_SLOW,
  })),
  { m: 3, n: 65, k: 7, bias: true, alpha: -0.37, kernel: "workgroup" },
  { m: 36, n: 29, k: 21, ...tn, alpha: 0.5, accumulate: true, kernel: "workgroup" },
];

const matmulSpecs: MatmulSpec[] = [
  ...ODD,
  // Linear layout: odd K (scalar loads), K % 4 == 0 (vec4 loads, partial last k-step).
  { m: 37, n: 29, k: 53 },
  { m: 37, n: 29, k: 53, bias: true },
  { m: 37, n: 29, k: 52, bias: true },
  { m: 21, n: 29, k: 52, x3d: true },
  { m: 5, n: 33, k: 20 },
  // y = x W and y = xᵀ W (dW = dYᵀ X), as backward uses.
  { m: 37, n: 29, k: 53, ...nn },
  { m: 37, n: 36, k: 52, ...nn },
  { m: 37, n: 29, k: 53, ...tn },
  { m: 36, n: 40, k: 21, ...tn },
  { m: 36, n: 29, k: 21, ...tt, bias: true },
  // alpha scales the product, accumulate adds it to out (LoRA and gradients).
  { m: 37, n: 29, k: 53, alpha: -0.37 },
  { m: 37, n: 29, k: 52, alpha: 2, bias: true },
  { m: 37, n: 29, k: 53, ...nn, accumulate: true },
  { m: 36, n: 29, k: 21, ...tn, alpha: 0.5, accumulate: true },
  ...batchedSpecs(),
  // 16-bit weights: half-word, u32 and vec4<u32> loads along K (Wᵀ) or N (W).
  ...(["f16", "bf16"] as const).flatMap((wType): MatmulSpec[] => [
    { m: 37, n: 29, k: 53, wType, bias: true },
    { m: 37, n: 29, k: 56, wType },
    { m: 37, n: 29, k: 54, wType },
    { m: 37, n: 29, k: 21, wType, ...nn },
    { m: 37, n: 40, k: 21, wType, ...nn },
    { m: 37, n: 30, k: 21, wType, ...nn },
  ]),
  ...WORKGROUP_KERNEL_SPECS,
  // The small GPU tile computes the same products.
  { m: 37, n: 29, k: 52, bias: true, tiling: { rows: 4, cols: 4, workgroup: 64 } },
  { m: 37, n: 40, k: 21, ...nn, wType: "bf16", tiling: { rows: 4, cols: 4, workgroup: 64 } },
];

interface Nf4Host {
  x: Float32Array;
  w: ReturnType<typeof nf4Quantize>;
  bias?: Float32Array;
  into?: Float32Array;
}

/** A [n, k] weight (std 0.05, like trained projections) quantised to NF4, and x or dy. */
function nf4Case(
  op: "nf4Matmul" | "nf4MatmulInputGrad",
  [m, k, n]: [number, number, number],
  variant: "" | "bias" | "acc",
): OpCheck {
  const forward = op === "nf4Matmul";
  return gpuCase<Nf4Host>({
    name: [op, forward ? `${m}x${n}x${k}` : `${m}x${k}x${n}`, "nf4", variant].join(" ").trim(),
    inputs: (draw) => ({
      w: nf4Quantize(draw.randn(n * k, 0.05)),
      x: draw.randn(m * (forward ? k : n)),
      bias: variant === "bias" ? draw.randn(n) : undefined,
      into: variant === "acc" ? draw.randn(m * k) : undefined,
    }),
    gpu(scope, h) {
      const w = uploadNf4Weight(scope.gpu, h.w, n, k, `w${n}x${k}`);
      scope.own(w.packed);
      scope.own(w.absmax);
      const x = scope.upload(h.x, [m, forward ? k : n], "f32", forward ? "x" : "dy");
      if (forward) {
        return {
          y: nf4Matmul(scope.gpu, x, w, { bias: h.bias && scope.upload(h.bias, [n], "f32", "b") }),
        };
      }
      const out = h.into && scope.upload(h.into, [m, k], "f32", "acc");
      return { y: nf4MatmulInputGrad(scope.gpu, x, w, { out, accumulate: Boolean(out) }) };
    },
    reference(h) {
      if (forward) return { y: nf4MatmulRef(h.x, h.w, n, k, h.bias) };
      const grad = nf4MatmulInputGradRef(h.x, h.w, n, k);
      return { y: h.into ? grad.map((g, i) => g + h.into![i]) : grad };
    },
    nmse: 1e-7,
  });
}

// [m, k, n]: k % 64 != 0 and k % 8 != 0 take the general kernels (blocks straddle rows);
// the others the tiled ones, with partial row tiles (7, 33, 40), several row tiles (33, 40),
// several reduction chunks (k = 640 with 32-row tiles) and a 1-row tile. 64 rows or more
// (DEQUANTIZE_MIN_ROWS): W dequantised once, then the f32 matmul.
const NF4_SHAPES: Array<[number, number, number]> = [
  [7, 100, 37],
  [1, 64, 5],
  [33, 192, 65],
  [7, 96, 37],
  [5, 37, 9],
  [40, 128, 70],
  [33, 640, 19],
  [1, 2560, 40],
  [9, 8, 3],
  [70, 192, 65],
  [64, 37, 9],
  [3, 2, 1],
  [65, 66, 7],
];

export const MATMUL_CHECKS: OpCheck[] = [
  ...matmulSpecs.map(matmulCase),
  ...NF4_SHAPES.flatMap((shape) => [
    nf4Case("nf4Matmul", shape, ""),
    nf4Case("nf4Matmul", shape, "bias"),
    nf4Case("nf4MatmulInputGrad", shape, ""),
    nf4Case("nf4MatmulInputGrad", shape, "acc"),
  ]),
  // n = 1100 with 32-row tiles is three chunks of 512 along the reduction.
  nf4Case("nf4MatmulInputGrad", [33, 64, 1100], ""),
  nf4Case("nf4MatmulInputGrad", [33, 64, 1100], "acc"),
];
