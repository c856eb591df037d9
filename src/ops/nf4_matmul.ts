/**
 * Linear layers through a frozen NF4 weight (docs/numerics.md §3.1): `nf4Matmul` computes y = x W^T (+ bias)
 * and `nf4MatmulInputGrad` the gradient dx = dy W that training sends back through the frozen
 * weight. W stays packed on the GPU.
 *
 * With at least DEQUANTIZE_MIN_ROWS activation rows (training and batch encoding), or at any
 * row count on an adapter that is not a CPU, W is decoded into a pooled scratch tensor once per
 * call and the plain matmul does the product: decoding is then a small share of the work, and
 * the matmul's tiles are faster than any kernel that decodes as it multiplies. The scratch holds
 * the exact f32 products code * absmax (docs/numerics.md §3.1); for the input gradient they are
 * written transposed, as Wᵀ, so that dx = dy W runs as the matmul's fastest layout, x Wᵀ. A
 * weight uploaded with `decode: "f16"` decodes instead, when every decoded weight is 0 or a
 * normal f16, to f16 bit patterns [N, K], code * absmax rounded once to f16 (2^-11 relative,
 * what bitsandbytes computes in an fp16 compute dtype), and the matmul reads 16-bit weights
 * packed along K with larger tiles than f32 allows (~1.1-1.25x faster on lavapipe) at the cost
 * of no longer matching the float64 oracle to the fixtures' tolerances. With fewer rows on a CPU
 * adapter, decoding costs as much as the product, so it happens in registers: when K is a
 * multiple of the block (every Qwen3 projection), the activation operand is first copied into
 * 64 KiB uniform-buffer tiles (kernels/nf4_matmul.wgsl explains why) and each tile of rows is
 * multiplied chunk by chunk along the reduction; other shapes take a plain kernel.
 */
import code from "../../kernels/nf4_matmul.wgsl" with { type: "text" };
import { f32, type Gpu, grid1d } from "../gpu/device.ts";
import { numel, type Tensor } from "../gpu/tensor.ts";
import { isCpuAdapter, matmul } from "./matmul.ts";
import { NF4_BLOCK_SIZE, NF4_CODE, type Nf4Quantized } from "./nf4.ts";
import { requireDType, requireOut, requirePositiveInteger, requireSize } from "./checks.ts";

/** A frozen [outFeatures, inFeatures] weight in NF4, as `nf4Quantize` lays it out. */
export interface Nf4Weight {
  /** u8, ceil(out * in / 2) bytes (the buffer is padded to 4 bytes). */
  packed: Tensor;
  /** f32, one absmax per block of the flattened weight. */
  absmax: Tensor;
  /** Rows of the weight (output features). */
  outFeatures: number;
  /** Columns of the weight (input features). */
  inFeatures: number;
  /** Elements per absmax block; 64 (bitsandbytes' default) when absent. */
  blockSize?: number;
  /**
   * Whether the many-row products decode W to f16 rather than f32: `uploadNf4Weight` sets it
   * for `decode: "f16"` when every decoded weight is 0 or a normal f16. Absent: f32.
   */
  decodesToF16?: boolean;
}

/** What the many-row products decode an NF4 weight to: exact f32, or f16 like bitsandbytes' fp16 compute dtype. */
export type Nf4Decode = "f32" | "f16";

export interface Nf4MatmulOptions {
  /** f32 tensor of M * outFeatures elements to write y into. */
  out?: Tensor;
  /** f32 [outFeatures], added to every row. */
  bias?: Tensor;
}

export interface Nf4InputGradOptions {
  /** f32 tensor of M * inFeatures elements to write dx into. */
  out?: Tensor;
  /** Add dy W to what `out` holds (e.g. the LoRA path's share of dx) instead of overwriting it. */
  accumulate?: boolean;
}

const KERNEL = "nf4_matmul";
const ACCUMULATE = 1;
const ADD_BIAS = 2;
/** One tile fills a 64 KiB uniform binding, the least maxUniformBufferBindingSize WebGPU allows. */
const TILE_FLOATS = 16384;
const TILE_BYTES = TILE_FLOATS * 4;
/**
 * Bytes of tiles staged per pass (more when one row of tiles is larger): 4 MiB keeps the buffer
 * small, and passes cost nothing since each tile is read by one dispatch anyway.
 */
const TILE_PASS_BYTES = 4 * 1024 * 1024;
/** Must match MAX_TM in the WGSL. */
const MAX_TILE_ROWS = 32;
const TILED_WORKGROUP = 64;
const GENERAL_WORKGROUP = 64;
const STAGE_WORKGROUP = 256;
/** Must match the dequantize entries' workgroup size; each invocation decodes 8 elements. */
const DEQUANTIZE_WORKGROUP = 256;
/** Activation rows from which W is dequantised once and multiplied by the f32 matmul. */
export const DEQUANTIZE_MIN_ROWS = 64;

/**
 * Whether a product over `m` rows decodes W first. Real GPUs always do: there the decode is a
 * memory-bound pass of microseconds, and the fused few-row kernels, written for CPU adapters,
 * were the slow path. At 32 x 1024 -> 3072 on an NVIDIA H200 they took 7.9 ms (forward) and
 * 18.8 ms (input gradient) against 1.7 and 1.9 ms for the same products over f32 weights, timed
 * alike; decoding first, the NF4 products take 0.15 and 0.46 ms (the decode 0.02 ms), 1.25x and
 * 1.28x the f32 ones.
 */
function decodesFirst(gpu: Gpu, m: number): boolean {
  return m >= DEQUANTIZE_MIN_ROWS || !isCpuAdapter(gpu);
}
/** Invocations of the tiled kernels each cover 8 outputs along N (forward) or K (input grad). */
const COLUMNS_PER_INVOCATION = 8;

const CODE_PARAMS = [...NF4_CODE].map(f32);
/** The largest finite f16. */
const F16_MAX = 65504;
/** Smallest absmax whose smallest nonzero code (0.0796) still decodes to a normal f16 (2^-14). */
const F16_MIN_ABSMAX = 2 ** -14 / Math.min(...[...NF4_CODE].filter((c) => c !== 0).map(Math.abs));

/** Whether code * absmax is 0 or a normal f16 for every code and every block's absmax. */
function decodesToF16(absmax: Float32Array): boolean {
  for (const a of absmax) {
    if (a !== 0 && !(a >= F16_MIN_ABSMAX && a <= F16_MAX)) return false;
  }
  return true;
}

/**
 * Uploads `nf4Quantize` output as an `Nf4Weight` of shape [outFeatures, inFeatures]; `decode`
 * picks what the many-row products decode it to (see the module comment).
 */
export function uploadNf4Weight(
  gpu: Gpu,
  quantized: Nf4Quantized,
  outFeatures: number,
  inFeatures: number,
  name = "nf4",
  blockSize = NF4_BLOCK_SIZE,
  decode: Nf4Decode = "f32",
): Nf4Weight {
  requirePositiveInteger("uploadNf4Weight", "outFeatures", outFeatures);
  requirePositiveInteger("uploadNf4Weight", "inFeatures", inFeatures);
  requirePositiveInteger("uploadNf4Weight", "blockSize", blockSize);
  const n = outFeatures * inFeatures;
  const bytes = Math.ceil(n / 2);
  const blocks = Math.ceil(n / blockSize);
  if (quantized.packed.length !== bytes || quantized.absmax.length !== blocks) {
    throw new Error(
      `uploadNf4Weight '${name}': a [${outFeatures}, ${inFeatures}] weight in blocks of ` +
        `${blockSize} needs ${bytes} packed bytes and ${blocks} absmax values, got ` +
        `${quantized.packed.length} and ${quantized.absmax.length}; quantise it with ` +
        `nf4Quantize(weights, ${blockSize}) from the same [out, in] weight`,
    );
  }
  return {
    packed: gpu.upload(quantized.packed, [bytes], "u8", `${name}.packed`),
    absmax: gpu.upload(quantized.absmax, [blocks], "f32", `${name}.absmax`),
    outFeatures,
    inFeatures,
    blockSize,
    decodesToF16: decode === "f16" && decodesToF16(quantized.absmax),
  };
}

function checkWeight(op: string, w: Nf4Weight): number {
  const block = w.blockSize ?? NF4_BLOCK_SIZE;
  requirePositiveInteger(op, "w.outFeatures", w.outFeatures);
  requirePositiveInteger(op, "w.inFeatures", w.inFeatures);
  requirePositiveInteger(op, "w.blockSize", block);
  const n = w.outFeatures * w.inFeatures;
  requireDType(op, "w.packed", w.packed, ["u8"]);
  requireDType(op, "w.absmax", w.absmax, ["f32"]);
  requireSize(op, "w.packed", w.packed, Math.ceil(n / 2), "ceil(out * in / 2) bytes");
  requireSize(op, "w.absmax", w.absmax, Math.ceil(n / block), "one per block");
  return block;
}

/** Rows of the activation operand `t` whose last dimension is `width`. */
function rowsOf(op: string, arg: string, t: Tensor, width: number): number {
  requireDType(op, arg, t, ["f32"]);
  if (t.shape.length === 0 || t.shape[t.shape.length - 1] !== width) {
    throw new Error(
      `${op}: ${arg} '${t.name}' [${t.shape}] must have last dimension ${width}`,
    );
  }
  return t.size / width;
}

/** Smallest power of two >= rows, at most MAX_TILE_ROWS: few-token calls waste no FMAs. */
function tileRows(rows: number): number {
  let tm = 1;
  while (tm < rows && tm < MAX_TILE_ROWS) tm *= 2;
  return tm;
}

/**
 * The per-device buffer the tiles are staged in. It is reused by every call: work recorded
 * later in the same submission runs later, so a call never overwrites tiles still to be read.
 */
const tileBuffers = new WeakMap<Gpu, GPUBuffer>();

function tileBuffer(gpu: Gpu, bytes: number): GPUBuffer {
  const current = tileBuffers.get(gpu);
  if (current && current.size >= bytes) return current;
  if (current) {
    // Recorded dispatches may still read the old buffer: submit them before it goes.
    gpu.flush();
    current.destroy();
  }
  const buffer = gpu.device.createBuffer({
    label: "nf4_matmul.tiles",
    size: Math.max(bytes, TILE_PASS_BYTES),
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.STORAGE,
  });
  tileBuffers.set(gpu, buffer);
  return buffer;
}

/**
 * Records `entry` for every tile of the activation `act` [rows, width] (x for the forward, dy
 * for the input gradient; `width` is the reduction). Tiles hold `tm` rows and one chunk of
 * TILE_FLOATS / tm columns; the first chunk starts from `firstFlags`, later ones accumulate.
 * Rows are staged in passes so the tile buffer stays bindable whatever M is.
 */
function tiledProduct(
  gpu: Gpu,
  entry: "forward_tiled" | "input_grad_tiled",
  act: Tensor,
  rows: number,
  w: Nf4Weight,
  block: number,
  bias: Tensor,
  out: Tensor,
  firstFlags: number,
): void {
  const { outFeatures: n, inFeatures: k } = w;
  const [width, columns] = entry === "forward_tiled" ? [k, n] : [n, k];
  const tm = tileRows(rows);
  const chunk = TILE_FLOATS / tm;
  const chunks = Math.ceil(width / chunk);
  const rowTiles = Math.ceil(rows / tm);
  const tilesPerPass = Math.min(
    rowTiles,
    Math.max(1, Math.floor(TILE_PASS_BYTES / (chunks * TILE_BYTES))),
  );
  const buffer = tileBuffer(gpu, tilesPerPass * chunks * TILE_BYTES);
  const stage = { name: KERNEL, code, entry: "stage", constants: { TM: tm } };
  const kernel = { name: KERNEL, code, entry, constants: { TM: tm, BLOCK: block } };
  const workgroups: [number] = [Math.ceil(columns / COLUMNS_PER_INVOCATION / TILED_WORKGROUP)];
  for (let pass = 0; pass < rowTiles; pass += tilesPerPass) {
    const count = Math.min(tilesPerPass, rowTiles - pass);
    gpu.dispatch({
      kernel: stage,
      params: [...CODE_PARAMS, rows, 0, 0, pass * tm, 0, count, 0, width],
      bindings: [null, null, null, null, null, act, { buffer, size: count * chunks * TILE_BYTES }],
      workgroups: grid1d(gpu, count * chunks * tm * chunk, STAGE_WORKGROUP),
    });
    for (let r = 0; r < count; r++) {
      for (let c = 0; c < chunks; c++) {
        const c0 = c * chunk;
        gpu.dispatch({
          kernel,
          params: [
            ...CODE_PARAMS,
            rows,
            n,
            k,
            (pass + r) * tm,
            c0,
            Math.min(chunk, width - c0),
            c > 0 ? ACCUMULATE : firstFlags,
            0,
          ],
          bindings: [
            { buffer, offset: (r * chunks + c) * TILE_BYTES, size: TILE_BYTES },
            w.packed,
            w.absmax,
            bias,
            out,
            null,
            null,
          ],
          workgroups,
        });
      }
    }
  }
}

/**
 * W [outFeatures, inFeatures] decoded into a pooled tensor for the many-row products: f16 bit
 * patterns when `w.decodesToF16` and the element count is a multiple of 8, else exact f32; one
 * packed word per invocation when the count is a multiple of 8. The caller destroys it; a later
 * call of the same shape gets the same buffer back from the pool, so the layers of a model
 * share one scratch per shape.
 */
export function nf4DecodeWeight(gpu: Gpu, w: Nf4Weight): Tensor {
  return decodeWeight(gpu, w, false);
}

/**
 * Wᵀ [inFeatures, outFeatures] decoded to exact f32 into a pooled tensor, for the input
 * gradient dx = dy W as the x Wᵀ product (the matmul's fastest layout). Needs outFeatures *
 * inFeatures a multiple of 8. The caller destroys it.
 */
export function nf4DecodeWeightTransposed(gpu: Gpu, w: Nf4Weight): Tensor {
  return decodeWeight(gpu, w, true);
}

function decodeWeight(gpu: Gpu, w: Nf4Weight, transposed: boolean): Tensor {
  const block = checkWeight("nf4DecodeWeight", w);
  const { outFeatures: n, inFeatures: k } = w;
  const name = `${w.packed.name}.decoded`;
  const constants = { BLOCK: block };
  const params = [...CODE_PARAMS, 0, n, k, 0, 0, 0, 0, 0];
  if (transposed) {
    if ((n * k) % 8 !== 0) {
      throw new Error(`nf4DecodeWeightTransposed: ${n} x ${k} is not a multiple of 8 elements`);
    }
    const out = gpu.empty([k, n], "f32", `${name}.transposed`);
    if (n % 4 === 0 && k % 8 === 0) {
      gpu.dispatch({
        kernel: { name: KERNEL, code, entry: "dequantize_f32_transposed_vec4", constants },
        params,
        bindings: [null, w.packed, w.absmax, null, null, null, null, null, out],
        workgroups: grid1d(gpu, (n / 4) * (k / 8), DEQUANTIZE_WORKGROUP),
      });
      return out;
    }
    gpu.dispatch({
      kernel: { name: KERNEL, code, entry: "dequantize_f32_transposed", constants },
      params,
      bindings: [null, w.packed, w.absmax, null, null, null, out],
      workgroups: grid1d(gpu, (n * k) / 8, DEQUANTIZE_WORKGROUP),
    });
    return out;
  }
  if ((n * k) % 8 === 0) {
    const f16 = w.decodesToF16 === true;
    const out = gpu.empty([n, k], f16 ? "f16" : "f32", name);
    const bindings = [
      null,
      w.packed,
      w.absmax,
      null,
      null,
      null,
      null,
      ...(f16 ? [out] : [null, out]),
    ];
    gpu.dispatch({
      kernel: { name: KERNEL, code, entry: f16 ? "dequantize_f16" : "dequantize_f32", constants },
      params,
      bindings,
      workgroups: grid1d(gpu, (n * k) / 8, DEQUANTIZE_WORKGROUP),
    });
    return out;
  }
  const out = gpu.empty([n, k], "f32", name);
  gpu.dispatch({
    kernel: { name: KERNEL, code, entry: "dequantize", constants },
    params,
    bindings: [null, w.packed, w.absmax, null, null, null, out],
    workgroups: grid1d(gpu, Math.ceil((n * k) / 8), DEQUANTIZE_WORKGROUP),
  });
  return out;
}

/** Records the one-output-per-invocation kernel `entry`, for shapes the tiled ones cannot take. */
function generalProduct(
  gpu: Gpu,
  entry: "forward_general" | "input_grad_general",
  act: Tensor,
  rows: number,
  w: Nf4Weight,
  block: number,
  bias: Tensor,
  out: Tensor,
  flags: number,
): void {
  const { outFeatures: n, inFeatures: k } = w;
  gpu.dispatch({
    kernel: { name: KERNEL, code, entry, constants: { BLOCK: block } },
    params: [...CODE_PARAMS, rows, n, k, 0, 0, 0, flags, 0],
    bindings: [null, w.packed, w.absmax, bias, out, act, null],
    workgroups: grid1d(gpu, out.size, GENERAL_WORKGROUP),
  });
}

/** y = x W^T (+ bias): x f32 [..., inFeatures] -> y f32 [..., outFeatures]. */
export function nf4Matmul(
  gpu: Gpu,
  x: Tensor,
  w: Nf4Weight,
  opts: Nf4MatmulOptions = {},
): Tensor {
  const op = "nf4Matmul";
  const block = checkWeight(op, w);
  const { outFeatures: n, inFeatures: k } = w;
  const m = rowsOf(op, "x", x, k);
  const shape = [...x.shape.slice(0, -1), n];
  const inputs = [x, w.packed, w.absmax, ...(opts.bias ? [opts.bias] : [])];
  if (opts.out) requireOut(op, opts.out, numel(shape), inputs);
  if (opts.bias) {
    requireDType(op, "bias", opts.bias, ["f32"]);
    requireSize(op, "bias", opts.bias, n, "outFeatures");
  }
  const y = opts.out ?? gpu.empty(shape, "f32", `nf4Matmul(${x.name})`);
  if (m === 0) return y;
  if (decodesFirst(gpu, m)) {
    const wf = nf4DecodeWeight(gpu, w);
    matmul(gpu, x.reshape([m, k]), wf, { bias: opts.bias, out: y });
    wf.destroy();
    return y;
  }
  const flags = opts.bias ? ADD_BIAS : 0;
  // Without a bias the binding still needs a buffer; the flag keeps it unread.
  const bias = opts.bias ?? w.absmax;
  const pitch = TILE_FLOATS / tileRows(m);
  if (k % block === 0 && block % 8 === 0 && pitch % block === 0) {
    tiledProduct(gpu, "forward_tiled", x, m, w, block, bias, y, flags);
  } else {
    generalProduct(gpu, "forward_general", x, m, w, block, bias, y, flags);
  }
  return y;
}

/** dx = dy W: dy f32 [..., outFeatures] -> dx f32 [..., inFeatures] (W stays frozen). */
export function nf4MatmulInputGrad(
  gpu: Gpu,
  dy: Tensor,
  w: Nf4Weight,
  opts: Nf4InputGradOptions = {},
): Tensor {
  const op = "nf4MatmulInputGrad";
  const block = checkWeight(op, w);
  const { outFeatures: n, inFeatures: k } = w;
  const m = rowsOf(op, "dy", dy, n);
  const shape = [...dy.shape.slice(0, -1), k];
  if (opts.out) requireOut(op, opts.out, numel(shape), [dy, w.packed, w.absmax]);
  if (opts.accumulate && !opts.out) {
    throw new Error(`${op}: accumulate needs an 'out' tensor holding what to add to`);
  }
  const dx = opts.out ?? gpu.empty(shape, "f32", `nf4MatmulInputGrad(${dy.name})`);
  if (m === 0) return dx;
  if (decodesFirst(gpu, m)) {
    // Exact f32 decodes straight into Wᵀ, so the product takes the matmul's fastest layout;
    // the f16 decode stays [N, K] (packed along K, as its 16-bit matmul reads it).
    const transposed = !w.decodesToF16 && (n * k) % 8 === 0;
    const wf = transposed ? nf4DecodeWeightTransposed(gpu, w) : nf4DecodeWeight(gpu, w);
    matmul(gpu, dy.reshape([m, n]), wf, {
      transposeW: transposed,
      out: dx,
      accumulate: opts.accumulate,
    });
    wf.destroy();
    return dx;
  }
  const flags = opts.accumulate ? ACCUMULATE : 0;
  // The bias binding is unused here (no ADD_BIAS flag) but still needs a buffer.
  if (k % 8 === 0 && block % 8 === 0) {
    tiledProduct(gpu, "input_grad_tiled", dy, m, w, block, w.absmax, dx, flags);
  } else {
    generalProduct(gpu, "input_grad_general", dy, m, w, block, w.absmax, dx, flags);
  }
  return dx;
}
