/**
 * Matrix products with f32 accumulation: the Linear layer (y = x Wᵀ + b, W [N, K] as PyTorch
 * stores it), y = x W (W [K, N]), and batched products, with x optionally transposed so the
 * backward passes need no copies: dX = dY W is `matmul(dY, W, {transposeW: false})` and
 * dW = dYᵀ X is `matmul(dY, X, {transposeX: true, transposeW: false})`.
 *
 * W may be f32 or raw f16/bf16 bit patterns (unpacked in the kernel, no shader-f16 needed).
 * There is no f16-arithmetic variant: on the CPU adapters this project is tuned for, the time
 * goes to loads, not arithmetic (see kernels/matmul.wgsl), so f16 math would cost accuracy
 * for nothing.
 *
 * Two kernels compute the same products. Every adapter runs kernels/matmul.wgsl by default,
 * which keeps a tile of y per invocation in registers; it takes the tile and workgroup sizes as
 * override constants and, through its markers, the unrolled tile code generated here for each
 * layout, weight type, vector width and tile size; each combination is its own pipeline.
 * `kernel: "workgroup"` runs kernels/matmul_shared.wgsl instead, which stages slabs of both
 * operands in workgroup memory, the usual design for real GPUs. It is tested on every adapter
 * but has not been timed on a real GPU yet (`deno task bench` times both there), so it is not
 * the default anywhere.
 */
import template from "../../kernels/matmul.wgsl" with { type: "text" };
import sharedTemplate from "../../kernels/matmul_shared.wgsl" with { type: "text" };
import paramsCode from "../../kernels/matmul_params.wgsl" with { type: "text" };
import { f32, type Gpu } from "../gpu/device.ts";
import type { Markers } from "../gpu/shader.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut, requireSize } from "./checks.ts";

export type MatmulWeightType = "f32" | "f16" | "bf16";

export interface MatmulOptions {
  /**
   * true (default): W is [N, K] (or [B, N, K]) and y = x Wᵀ, the PyTorch Linear layout;
   * false: W is [K, N] (or [B, K, N]) and y = x W.
   */
  transposeW?: boolean;
  /** x is [K, M] (or [B, K, M]) and y = xᵀ W(ᵀ); default false: x is [..., M, K]. */
  transposeX?: boolean;
  /** f32 [N], added to every row of y. */
  bias?: Tensor;
  /** f32 tensor with the result's size to write into. */
  out?: Tensor;
  /** Scales the product (not the bias); default 1. */
  alpha?: number;
  /** Add the result to what `out` holds (e.g. a LoRA branch into its base output, or a
   * gradient into its accumulator) instead of overwriting it. */
  accumulate?: boolean;
  /** Overrides the adapter's default tile of the register-tiled kernel (benchmarks and tests). */
  tiling?: MatmulTiling;
  /**
   * Which kernel runs: "registers" (kernels/matmul.wgsl, the default) or "workgroup"
   * (workgroup-memory slabs, kernels/matmul_shared.wgsl; `tiling` does not apply to it).
   */
  kernel?: "registers" | "workgroup";
}

/** Rows and columns of y per invocation, and invocations per workgroup. */
export interface MatmulTiling {
  rows: number;
  cols: number;
  workgroup: number;
}

/**
 * CPU adapters (lavapipe, llvmpipe, SwiftShader, WARP) run 8 invocations as one SIMD vector and
 * pay a per-lane loop for every storage load, so big per-invocation tiles win there: 16 x 16
 * does about 2.5x the work per CPU second of 4 x 4 on lavapipe, and larger tiles gain little
 * for f32 while their compile time grows fast (16 x 32: ~9 s, 32 x 32: ~25 s). f16/bf16
 * weights read along K (`packedAlongK`, 8 values per load) make weight loads cheap enough that
 * 16 x 32 is ~1.3x faster than 16 x 16, so the Linear forward over 16-bit weights takes it.
 * GPUs want small tiles and many invocations.
 */
export function defaultMatmulTiling(gpu: Gpu, m: number, packedAlongK = false): MatmulTiling {
  if (!isCpuAdapter(gpu)) return { rows: 4, cols: 4, workgroup: 64 };
  const rows = m <= 4 ? 4 : m <= 8 ? 8 : 16;
  return { rows, cols: packedAlongK ? 32 : 16, workgroup: 16 };
}

export function isCpuAdapter(gpu: Gpu): boolean {
  const info = gpu.adapterInfo;
  return info.isFallbackAdapter ||
    /llvmpipe|lavapipe|swiftshader|basic render driver/i.test(info.description);
}

/** Product shape after checking the arguments: y is [batch, m, n] with reduction length k. */
interface MatmulShape {
  batch: number;
  m: number;
  n: number;
  k: number;
  /** Whether w has its own batch dimension (else one w serves every batch). */
  batchedW: boolean;
  outShape: number[];
}

function matmulShape(x: Tensor, w: Tensor, transposeX: boolean, transposeW: boolean): MatmulShape {
  const xs = x.shape;
  const ws = w.shape;
  const wDesc = `w '${w.name}' [${ws}]`;
  const xDesc = `x '${x.name}' [${xs}]`;
  let batch = 1;
  let m: number;
  let k: number;
  let outLead: number[];
  if (ws.length === 2) {
    if (transposeX) {
      if (xs.length !== 2) {
        throw new Error(
          `matmul: with transposeX, ${xDesc} must be [K, M] for a 2-D w (or [B, K, M] with w [B, ...])`,
        );
      }
      [k, m] = xs;
      outLead = [m];
    } else {
      if (xs.length < 2) throw new Error(`matmul: ${xDesc} must be at least 2-D ([..., M, K])`);
      k = xs[xs.length - 1];
      m = k === 0 ? xs.slice(0, -1).reduce((a, b) => a * b, 1) : x.size / k;
      outLead = xs.slice(0, -1);
    }
  } else if (ws.length === 3) {
    if (xs.length !== 3 || xs[0] !== ws[0]) {
      throw new Error(
        `matmul: for a batched ${wDesc}, x must be [${ws[0]}, ${transposeX ? "K, M" : "M, K"}]; ` +
          `got ${xDesc}`,
      );
    }
    batch = ws[0];
    [m, k] = transposeX ? [xs[2], xs[1]] : [xs[1], xs[2]];
    outLead = [batch, m];
  } else {
    throw new Error(`matmul: ${wDesc} must be 2-D (${transposeW ? "[N, K]" : "[K, N]"}) or 3-D`);
  }
  const [wRows, wCols] = ws.slice(-2);
  const [n, wk] = transposeW ? [wRows, wCols] : [wCols, wRows];
  if (wk !== k) {
    throw new Error(
      `matmul: ${xDesc} has K = ${k} but ${wDesc} has K = ${wk} ` +
        `(transposeX ${transposeX}, transposeW ${transposeW}: w is ${
          transposeW ? "[N, K]" : "[K, N]"
        })`,
    );
  }
  return { batch, m, n, k, batchedW: ws.length === 3, outShape: [...outLead, n] };
}

/** y = x Wᵀ (+ bias) for Linear weights, or the transposed/batched products described above. */
export function matmul(gpu: Gpu, x: Tensor, w: Tensor, options: MatmulOptions = {}): Tensor {
  const { transposeW = true, transposeX = false, bias, out, alpha = 1, accumulate = false } =
    options;
  if (accumulate && !out) throw new Error("matmul: accumulate needs an 'out' tensor to add to");
  requireDType("matmul", "x", x, ["f32"]);
  requireDType("matmul", "w", w, ["f32", "f16", "bf16"]);
  const { batch, m, n, k, batchedW, outShape } = matmulShape(x, w, transposeX, transposeW);
  if (bias) {
    requireDType("matmul", "bias", bias, ["f32"]);
    requireSize("matmul", "bias", bias, n, "one per output feature N");
  }
  const inputs = bias ? [x, w, bias] : [x, w];
  if (out) requireOut("matmul", out, batch * m * n, inputs);
  const y = out ?? gpu.empty(outShape, "f32", `matmul(${x.name}, ${w.name})`);
  if (batch * m * n === 0) return y;

  const xLayout = transposeX ? "km" : "mk";
  const wLayout = transposeW ? "nk" : "kn";
  const wType = w.dtype as MatmulWeightType;
  // kernels/matmul_params.wgsl, the uniform of both kernels.
  const params = [m, n, k, transposeX ? k * m : m * k, batchedW ? n * k : 0, m * n, f32(alpha)];
  if (options.kernel === "workgroup") {
    const groups: [number, number, number] = [
      Math.ceil(n / SHARED_TILE),
      Math.ceil(m / SHARED_TILE),
      batch,
    ];
    checkGroups(gpu, groups, batch, m, n);
    gpu.dispatch({
      kernel: {
        name: `matmul_shared_${wType}`,
        code: sharedTemplate,
        markers: SHARED_MARKERS[wType],
        constants: {
          X_KM: transposeX ? 1 : 0,
          W_KN: transposeW ? 0 : 1,
          ADD_BIAS: bias ? 1 : 0,
          ACCUMULATE: accumulate ? 1 : 0,
        },
      },
      params,
      // Without a bias the binding still needs a buffer; ADD_BIAS 0 keeps it unread.
      bindings: [x, w, y, bias ?? x],
      workgroups: groups,
    });
    return y;
  }
  const packedAlongK = wType !== "f32" && wLayout === "nk" && k % 8 === 0;
  const tiling = options.tiling ?? defaultMatmulTiling(gpu, m, packedAlongK);
  checkTiling(tiling);
  const variant: MatmulVariant = {
    xLayout,
    wLayout,
    wType,
    // A vector load needs every row of the operand to start on a vector boundary.
    xVec: (xLayout === "mk" ? k : m) % 4 === 0 ? 4 : 1,
    wVec: weightVectorWidth(wType, wLayout === "nk" ? k : n, wLayout === "kn" ? tiling.cols : 8),
    // Rows of y start on a vec4 boundary when N is a multiple of 4 (tile widths always are).
    yVec: n % 4 === 0 ? 4 : 1,
    tiling,
    bias: bias !== undefined,
    accumulate,
  };
  const groups: [number, number, number] = [
    Math.ceil(m / tiling.rows),
    Math.ceil(Math.ceil(n / tiling.cols) / tiling.workgroup),
    batch,
  ];
  checkGroups(gpu, groups, batch, m, n);
  const name = variantName(variant);
  let markers = markerCache.get(name);
  if (markers === undefined) markerCache.set(name, markers = matmulMarkers(variant));
  gpu.dispatch({
    kernel: {
      name,
      code: template,
      markers,
      constants: {
        TM: tiling.rows,
        TN: tiling.cols,
        KS: kStep(variant),
        WG: tiling.workgroup,
      },
    },
    params,
    bindings: bias ? [x, w, y, bias] : [x, w, y],
    workgroups: groups,
  });
  return y;
}

function checkGroups(gpu: Gpu, groups: number[], batch: number, m: number, n: number): void {
  const maxGroups = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (groups.some((g) => g > maxGroups)) {
    throw new Error(
      `matmul: [${batch}, ${m}, ${n}] needs workgroups [${groups}], over this adapter's limit ` +
        `${maxGroups} per dimension; split the product`,
    );
  }
}

/** Rows and columns of y per workgroup of kernels/matmul_shared.wgsl. */
const SHARED_TILE = 64;

/** kernels/matmul_shared.wgsl's weight element type and the body of its `weight(index)`. */
const SHARED_MARKERS: Record<MatmulWeightType, Markers> = {
  f32: { MATMUL_PARAMS: paramsCode, W_ELEM: "f32", W_VALUE: "  return w[index];" },
  f16: {
    MATMUL_PARAMS: paramsCode,
    W_ELEM: "u32",
    W_VALUE: "  let pair = unpack2x16float(w[index >> 1u]);\n" +
      "  return select(pair.x, pair.y, (index & 1u) == 1u);",
  },
  bf16: {
    MATMUL_PARAMS: paramsCode,
    W_ELEM: "u32",
    W_VALUE: "  let word = w[index >> 1u];\n" +
      "  return select(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u), " +
      "(index & 1u) == 1u);",
  },
};

function checkTiling({ rows, cols, workgroup }: MatmulTiling): void {
  const ok = (v: number) => Number.isInteger(v) && v > 0 && v % 4 === 0;
  if (!ok(rows) || !ok(cols) || !Number.isInteger(workgroup) || workgroup <= 0) {
    throw new Error(
      `matmul: tiling rows ${rows} and cols ${cols} must be positive multiples of 4 and ` +
        `workgroup ${workgroup} a positive integer`,
    );
  }
}

/**
 * Elements per weight load along its contiguous axis of length `rowLength`: f32 loads vec4
 * (4) or scalars (1); f16/bf16 load vec4<u32> (8 values), one u32 (2) or half a u32 (1).
 * When the vector runs along N it must also divide the tile width `span`.
 */
function weightVectorWidth(type: MatmulWeightType, rowLength: number, span: number): number {
  const widths = type === "f32" ? [4, 1] : [8, 2, 1];
  return widths.find((v) => span % v === 0 && rowLength % v === 0) ?? 1;
}

interface MatmulVariant {
  /** x stored [M, K] ("mk") or [K, M] ("km"). */
  xLayout: "mk" | "km";
  /** w stored [N, K] ("nk") or [K, N] ("kn"). */
  wLayout: "nk" | "kn";
  wType: MatmulWeightType;
  /** x elements per load: 4 (vec4) or 1. */
  xVec: number;
  /** w elements per load, see weightVectorWidth. */
  wVec: number;
  /** y elements per load and store: 4 (vec4) or 1. */
  yVec: number;
  tiling: MatmulTiling;
  bias: boolean;
  /** y += result instead of y = result. */
  accumulate: boolean;
}

/** Generated markers by variant name: a tile body is ~100 KB of WGSL, built once. */
const markerCache = new Map<string, Markers>();

/** Names what the markers depend on (the workgroup size is an override constant). */
function variantName(v: MatmulVariant): string {
  const t = v.tiling;
  return `matmul_${v.xLayout}${v.xVec}_${v.wLayout}${v.wType}${v.wVec}_y${v.yVec}_` +
    `${t.rows}x${t.cols}${v.bias ? "_bias" : ""}${v.accumulate ? "_acc" : ""}`;
}

/** K values per step of the K loop: one load of each operand along K, and at least 4. */
function kStep(v: MatmulVariant): number {
  const kAlongX = v.xLayout === "mk" ? v.xVec : 1;
  const kAlongW = v.wLayout === "nk" ? v.wVec : 1;
  return Math.max(4, kAlongX, kAlongW);
}

const COMPONENTS = ["x", "y", "z", "w"];

/** The markers of kernels/matmul.wgsl for one variant: its element types and unrolled tile. */
function matmulMarkers(v: MatmulVariant): Markers {
  const TM = v.tiling.rows;
  const TN = v.tiling.cols;
  const KS = kStep(v);
  const sixteen = v.wType !== "f32";
  const wordsPerLoad = sixteen ? Math.max(1, v.wVec / 2) : v.wVec;
  const wElem = sixteen
    ? (wordsPerLoad === 4 ? "vec4u" : "u32")
    : (wordsPerLoad === 4 ? "vec4f" : "f32");
  const prologue: string[] = [];
  const body: string[] = [];
  const epilogue: string[] = [];

  // Row bases (clamped, so edge tiles read valid memory; their results are not stored).
  if (v.xLayout === "mk") {
    for (let i = 0; i < TM; i++) {
      prologue.push(`let xr${i} = x_base + min(m0 + ${i}u, p.m - 1u) * p.k;`);
    }
  } else {
    for (let g = 0; g < TM / v.xVec; g++) {
      prologue.push(`let xc${g} = min(m0 + ${g * v.xVec}u, p.m - ${v.xVec}u);`);
    }
  }
  if (v.wLayout === "nk") {
    for (let j = 0; j < TN; j++) {
      prologue.push(`let wr${j} = w_base + min(n0 + ${j}u, p.n - 1u) * p.k;`);
    }
  } else {
    for (let g = 0; g < TN / v.wVec; g++) {
      prologue.push(`let wc${g} = min(n0 + ${g * v.wVec}u, p.n - ${v.wVec}u);`);
    }
  }
  for (let i = 0; i < TM; i++) {
    prologue.push(Array.from({ length: TN }, (_, j) => `var c${i}_${j} = 0.0;`).join(" "));
  }

  // A scalars a{i}_{kk}, zero past K so a partial last step adds nothing.
  for (let kk = 0; kk < KS; kk++) body.push(`let kv${kk} = k + ${kk}u < p.k;`);
  const xAt = (index: string) => v.xVec === 4 ? `x[(${index}) >> 2u]` : `x[${index}]`;
  if (v.xLayout === "mk") {
    for (let i = 0; i < TM; i++) {
      for (let s = 0; s < KS / v.xVec; s++) {
        const kk0 = s * v.xVec;
        body.push(`let xa${i}_${s} = ${xAt(`xr${i} + min(k + ${kk0}u, p.k - ${v.xVec}u)`)};`);
        for (let c = 0; c < v.xVec; c++) {
          const value = v.xVec === 4 ? `xa${i}_${s}.${COMPONENTS[c]}` : `xa${i}_${s}`;
          body.push(`let a${i}_${kk0 + c} = select(0.0, ${value}, kv${kk0 + c});`);
        }
      }
    }
  } else {
    for (let kk = 0; kk < KS; kk++) {
      body.push(`let xk${kk} = x_base + min(k + ${kk}u, p.k - 1u) * p.m;`);
      for (let g = 0; g < TM / v.xVec; g++) {
        body.push(`let xa${kk}_${g} = ${xAt(`xk${kk} + xc${g}`)};`);
        for (let c = 0; c < v.xVec; c++) {
          const value = v.xVec === 4 ? `xa${kk}_${g}.${COMPONENTS[c]}` : `xa${kk}_${g}`;
          body.push(`let a${g * v.xVec + c}_${kk} = select(0.0, ${value}, kv${kk});`);
        }
      }
    }
  }

  // B: each load is followed by the products that use it, so few loaded values stay live.
  const wLoad = (name: string, elementIndex: string): string[] => {
    if (!sixteen) {
      return [
        `let ${name} = ${
          wordsPerLoad === 4 ? `w[(${elementIndex}) >> 2u]` : `w[${elementIndex}]`
        };`,
      ];
    }
    if (v.wVec === 8) return [`let ${name} = w[(${elementIndex}) >> 3u];`];
    if (v.wVec === 2) return [`let ${name} = w[(${elementIndex}) >> 1u];`];
    return [`let ${name}_e = ${elementIndex};`, `let ${name} = w[${name}_e >> 1u];`];
  };
  const unpack = sixteen ? (v.wType === "bf16" ? "bf16" : "f16") : "";
  /** WGSL for element `e` (0 .. wVec-1) of the load named `name`. */
  const wValue = (name: string, e: number): string => {
    if (!sixteen) return wordsPerLoad === 4 ? `${name}.${COMPONENTS[e]}` : name;
    if (v.wVec === 1) {
      return `select(${unpack}_lo(${name}), ${unpack}_hi(${name}), (${name}_e & 1u) == 1u)`;
    }
    const word = v.wVec === 8 ? `${name}.${COMPONENTS[e >> 1]}` : name;
    return `${unpack}_${e % 2 === 0 ? "lo" : "hi"}(${word})`;
  };
  if (v.wLayout === "nk") {
    for (let j = 0; j < TN; j++) {
      for (let s = 0; s < KS / v.wVec; s++) {
        const kk0 = s * v.wVec;
        const name = `wb${j}_${s}`;
        body.push(...wLoad(name, `wr${j} + min(k + ${kk0}u, p.k - ${v.wVec}u)`));
        for (let e = 0; e < v.wVec; e++) {
          body.push(`let b${kk0 + e}_${j} = ${wValue(name, e)};`);
        }
        for (let i = 0; i < TM; i++) {
          const terms = Array.from(
            { length: v.wVec },
            (_, e) => `a${i}_${kk0 + e} * b${kk0 + e}_${j}`,
          );
          body.push(`c${i}_${j} += ${terms.join(" + ")};`);
        }
      }
    }
  } else {
    // Each accumulator takes the KS products of a step in one sum, as in the [N, K] layout:
    // the tile's accumulators do not fit in registers, so every `c += ...` is a load and a
    // store, and one per product made this layout 2x slower (77 x 8192 -> 2048 on lavapipe).
    for (let kk = 0; kk < KS; kk++) {
      body.push(`let wk${kk} = w_base + min(k + ${kk}u, p.k - 1u) * p.n;`);
    }
    for (let g = 0; g < TN / v.wVec; g++) {
      for (let kk = 0; kk < KS; kk++) {
        const name = `wb${kk}_${g}`;
        body.push(...wLoad(name, `wk${kk} + wc${g}`));
        for (let e = 0; e < v.wVec; e++) {
          body.push(`let b${kk}_${g * v.wVec + e} = ${wValue(name, e)};`);
        }
      }
      for (let e = 0; e < v.wVec; e++) {
        const j = g * v.wVec + e;
        for (let i = 0; i < TM; i++) {
          const terms = Array.from({ length: KS }, (_, kk) => `a${i}_${kk} * b${kk}_${j}`);
          body.push(`c${i}_${j} += ${terms.join(" + ")};`);
        }
      }
    }
  }

  if (v.bias) {
    for (let j = 0; j < TN; j++) epilogue.push(`let bias${j} = bias[min(n0 + ${j}u, p.n - 1u)];`);
  }
  const product = (i: number, j: number) =>
    v.bias ? `p.alpha * c${i}_${j} + bias${j}` : `p.alpha * c${i}_${j}`;
  for (let i = 0; i < TM; i++) {
    epilogue.push(`if (m0 + ${i}u < p.m) {`);
    epilogue.push(`  let yr = y_base + (m0 + ${i}u) * p.n + n0;`);
    if (v.yVec === 4) {
      // Four columns per access: with N a multiple of 4, n0 + j < N means all four are in y.
      // Each storage access costs a loop over the SIMD lanes on CPU adapters, which in products
      // with a short K (weight gradients over 77 rows) is a good part of the time.
      for (let j = 0; j < TN; j += 4) {
        const at = `y[(yr + ${j}u) >> 2u]`;
        const products = [0, 1, 2, 3].map((e) => product(i, j + e)).join(", ");
        const value = v.accumulate ? `${at} + vec4f(${products})` : `vec4f(${products})`;
        epilogue.push(`  if (n0 + ${j}u < p.n) { ${at} = ${value}; }`);
      }
    } else {
      for (let j = 0; j < TN; j++) {
        const value = v.accumulate ? `y[yr + ${j}u] + ${product(i, j)}` : product(i, j);
        epilogue.push(`  if (n0 + ${j}u < p.n) { y[yr + ${j}u] = ${value}; }`);
      }
    }
    epilogue.push(`}`);
  }

  const indent = (lines: string[], pad: string) => lines.map((l) => pad + l).join("\n");
  return {
    MATMUL_PARAMS: paramsCode,
    X_ELEM: v.xVec === 4 ? "vec4f" : "f32",
    W_ELEM: wElem,
    Y_ELEM: v.yVec === 4 ? "vec4f" : "f32",
    PROLOGUE: indent(prologue, "  "),
    BODY: indent(body, "    "),
    EPILOGUE: indent(epilogue, "  "),
  };
}
