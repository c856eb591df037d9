/**
 * Layout ops: concatenation and splitting along the last axis or the sequence axis, and
 * the (masked) mean over the sequence axis. The copies move raw 4-byte words, so they take
 * f32, u32 and i32 tensors alike and return the input dtype. Backward passes (f32) sit beside
 * their forwards; concatLastAxis and splitLastAxis are each other's backward.
 */
import code from "../../kernels/layout.wgsl" with { type: "text" };
import { type Gpu, grid1d } from "../gpu/device.ts";
import type { DType, Tensor } from "../gpu/tensor.ts";
import { requireDType, requirePositiveInteger } from "./checks.ts";
import { type IndexInput, type IndexTensor, indexTensor } from "./indices.ts";

const WG = 256;
const WORD_TYPES: readonly DType[] = ["f32", "u32", "i32"];

/** A block copy of n0 x n1 x n2 elements (n2 contiguous); strides and offsets in elements. */
interface BlockCopy {
  n: readonly [number, number, number];
  src: { offset: number; strides: readonly [number, number] };
  dst: { offset: number; strides: readonly [number, number] };
}

/** The kernels' CopyParams struct. */
function blockParams(c: BlockCopy): number[] {
  return [...c.n, c.src.offset, ...c.src.strides, c.dst.offset, ...c.dst.strides];
}

function copyBlock(gpu: Gpu, src: Tensor, dst: Tensor, c: BlockCopy): void {
  const count = c.n[0] * c.n[1] * c.n[2];
  if (count === 0) return;
  gpu.dispatch({
    kernel: { name: "layout", code, entry: "copy_block" },
    params: blockParams(c),
    bindings: [src, dst],
    workgroups: grid1d(gpu, count, WG),
  });
}

function lastAxis(t: Tensor): number {
  return t.shape.at(-1) ?? 1;
}

/** How many rows of the last axis a tensor holds (the product of the other axes). */
function leadingRows(t: Tensor): number {
  return t.shape.slice(0, -1).reduce((s, n) => s * n, 1);
}

/**
 * a [..., Da] and b [..., Db] with the same leading shape -> [..., Da + Db]. Backward:
 * `splitLastAxis(gpu, dOut, [Da, Db])` gives [da, db].
 */
export function concatLastAxis(gpu: Gpu, a: Tensor, b: Tensor): Tensor {
  const op = "concatLastAxis";
  requireDType(op, "a", a, WORD_TYPES);
  requireDType(op, "b", b, [a.dtype]);
  const lead = a.shape.slice(0, -1);
  if (
    a.shape.length === 0 || b.shape.length !== a.shape.length ||
    lead.some((d, i) => d !== b.shape[i])
  ) {
    throw new Error(
      `${op}: a '${a.name}' [${a.shape}] and b '${b.name}' [${b.shape}] must have the same ` +
        `shape except the last axis`,
    );
  }
  const [da, db] = [lastAxis(a), lastAxis(b)];
  const width = da + db;
  const rows = leadingRows(a);
  const out = gpu.empty([...lead, width], a.dtype, `concat(${a.name}, ${b.name})`);
  copyBlock(gpu, a, out, {
    n: [1, rows, da],
    src: { offset: 0, strides: [0, da] },
    dst: { offset: 0, strides: [0, width] },
  });
  copyBlock(gpu, b, out, {
    n: [1, rows, db],
    src: { offset: 0, strides: [0, db] },
    dst: { offset: da, strides: [0, width] },
  });
  return out;
}

/**
 * x [..., sum(sizes)] -> one tensor [..., sizes[i]] per size, in order. Backward: concatenate
 * the parts' gradients with `concatLastAxis`.
 */
export function splitLastAxis(gpu: Gpu, x: Tensor, sizes: readonly number[]): Tensor[] {
  const op = "splitLastAxis";
  requireDType(op, "x", x, WORD_TYPES);
  const width = lastAxis(x);
  const total = sizes.reduce((s, n) => s + n, 0);
  if (x.shape.length === 0 || sizes.some((n) => !Number.isInteger(n) || n < 0) || total !== width) {
    throw new Error(
      `${op}: sizes [${sizes}] must be non-negative integers adding up to the last axis of ` +
        `'${x.name}' [${x.shape}] (${width})`,
    );
  }
  const lead = x.shape.slice(0, -1);
  const rows = leadingRows(x);
  let start = 0;
  return sizes.map((size, i) => {
    const part = gpu.empty([...lead, size], x.dtype, `${x.name}[${i}]`);
    copyBlock(gpu, x, part, {
      n: [1, rows, size],
      src: { offset: start, strides: [0, width] },
      dst: { offset: 0, strides: [0, size] },
    });
    start += size;
    return part;
  });
}

interface ConcatRowsShape {
  batch: number;
  ta: number;
  tb: number;
  dim: number;
  /** b is shared by every batch row ([1, Tb, D] or [Tb, D] with a 3-D a). */
  bBroadcast: boolean;
  /** The result's shape: [B, Ta+Tb, D], or [Ta+Tb, D] for a 2-D a. */
  out: number[];
}

function concatRowsShape(
  op: string,
  a: { name: string; shape: readonly number[] },
  b: { name: string; shape: readonly number[] },
): ConcatRowsShape {
  const [batch, ta, dim] = a.shape.length === 2 ? [1, ...a.shape] : a.shape;
  const [bBatch, tb, bDim] = b.shape.length === 2 ? [1, ...b.shape] : b.shape;
  const ranksFit = (a.shape.length === 3 && (b.shape.length === 2 || b.shape.length === 3)) ||
    (a.shape.length === 2 && b.shape.length === 2);
  if (!ranksFit || bDim !== dim || (bBatch !== batch && bBatch !== 1)) {
    throw new Error(
      `${op}: a '${a.name}' [${a.shape}] must be [B, Ta, D] (or [Ta, D]) and b '${b.name}' ` +
        `[${b.shape}] [B or 1, Tb, D] (or [Tb, D]) with the same D`,
    );
  }
  const t = ta + tb;
  return {
    batch,
    ta,
    tb,
    dim,
    bBroadcast: a.shape.length === 3 && bBatch === 1 && batch !== 1,
    out: a.shape.length === 2 ? [t, dim] : [batch, t, dim],
  };
}

/**
 * Per batch row, the rows of a then the rows of b: a [B, Ta, D] and b [B, Tb, D] -> [B, Ta+Tb, D]
 * (the resampler's concat_seq(x, latents)). b [1, Tb, D] or [Tb, D] is shared by every batch
 * row (broadcast). A 2-D a [Ta, D] takes a 2-D b and gives [Ta+Tb, D].
 */
export function concatRows(gpu: Gpu, a: Tensor, b: Tensor): Tensor {
  const op = "concatRows";
  requireDType(op, "a", a, WORD_TYPES);
  requireDType(op, "b", b, [a.dtype]);
  const { batch, ta, tb, dim, bBroadcast, out: shape } = concatRowsShape(op, a, b);
  const t = ta + tb;
  const out = gpu.empty(shape, a.dtype, `concatRows(${a.name}, ${b.name})`);
  copyBlock(gpu, a, out, {
    n: [batch, ta, dim],
    src: { offset: 0, strides: [ta * dim, dim] },
    dst: { offset: 0, strides: [t * dim, dim] },
  });
  copyBlock(gpu, b, out, {
    n: [batch, tb, dim],
    src: { offset: 0, strides: [bBroadcast ? 0 : tb * dim, dim] },
    dst: { offset: ta * dim, strides: [t * dim, dim] },
  });
  return out;
}

export interface ConcatRowsGrads {
  /** Shaped like a. */
  da: Tensor;
  /** Shaped like b; for a b shared by every batch row, the sum over the batch rows. */
  db: Tensor;
}

/**
 * Gradients of concatRows from dOut (f32, the forward's result shape) and the shapes of the
 * forward's a and b: dOut's rows split back, summed over the batch (in order, deterministic)
 * where b was broadcast.
 */
export function concatRowsBackward(
  gpu: Gpu,
  dOut: Tensor,
  aShape: readonly number[],
  bShape: readonly number[],
): ConcatRowsGrads {
  const op = "concatRowsBackward";
  requireDType(op, "dOut", dOut, ["f32"]);
  const s = concatRowsShape(op, { name: "a", shape: aShape }, { name: "b", shape: bShape });
  const { batch, ta, tb, dim } = s;
  if (dOut.shape.length !== s.out.length || dOut.shape.some((d, i) => d !== s.out[i])) {
    throw new Error(
      `${op}: dOut '${dOut.name}' [${dOut.shape}] must be [${s.out}], the shape concatRows ` +
        `gives for a [${aShape}] and b [${bShape}]`,
    );
  }
  const t = ta + tb;
  const da = gpu.empty([...aShape], "f32", `${op}.da(${dOut.name})`);
  const db = gpu.empty([...bShape], "f32", `${op}.db(${dOut.name})`);
  copyBlock(gpu, dOut, da, {
    n: [batch, ta, dim],
    src: { offset: 0, strides: [t * dim, dim] },
    dst: { offset: 0, strides: [ta * dim, dim] },
  });
  const bRows: BlockCopy = {
    n: [batch, tb, dim],
    src: { offset: ta * dim, strides: [t * dim, dim] },
    dst: { offset: 0, strides: [tb * dim, dim] },
  };
  if (!s.bBroadcast) {
    copyBlock(gpu, dOut, db, bRows);
  } else if (tb * dim > 0) {
    gpu.dispatch({
      kernel: { name: "layout", code, entry: "sum_block" },
      params: blockParams(bRows),
      bindings: [dOut, db],
      workgroups: grid1d(gpu, tb * dim, WG),
    });
  }
  return { da, db };
}

/** Host lengths checked against [0, T] and uploaded, or a u32/i32 tensor [B]; null without. */
function sequenceLengths(
  gpu: Gpu,
  op: string,
  lengths: IndexInput | undefined,
  batch: number,
  t: number,
): IndexTensor | null {
  if (lengths === undefined) return null;
  return indexTensor(gpu, op, "lengths", lengths, {
    length: { count: batch, meaning: "one length per batch row" },
    check: (len, b) => {
      if (len < 0 || len > t) throw new Error(`${op}: lengths[${b}] = ${len} is outside [0, ${t}]`);
    },
  });
}

/** Records mean_rows or mean_rows_backward (src -> dst, x [B, T, D]); frees uploaded lengths. */
function dispatchMean(
  gpu: Gpu,
  entry: "mean_rows" | "mean_rows_backward",
  [batch, t, dim]: readonly number[],
  src: Tensor,
  lens: IndexTensor | null,
  dst: Tensor,
): void {
  gpu.dispatch({
    kernel: { name: "layout", code, entry },
    params: [batch, t, dim, lens ? 1 : 0],
    // Without lengths the kernel never reads them, but the slot needs a buffer: src is
    // read-only there too, so binding it twice is allowed.
    bindings: [src, lens?.tensor ?? src, dst],
    workgroups: grid1d(gpu, dst.size, WG),
  });
  if (lens?.owned) lens.tensor.destroy();
}

/**
 * x [B, T, D] f32 -> [B, D]: the mean over the first lengths[b] rows of each batch row (all T
 * rows without lengths); a batch row with length 0 gives zeros. Host lengths are checked
 * against [0, T]; a u32/i32 tensor [B] is used as it is (values above T count as T).
 */
export function meanOverSequence(gpu: Gpu, x: Tensor, lengths?: IndexInput): Tensor {
  const op = "meanOverSequence";
  requireDType(op, "x", x, ["f32"]);
  if (x.shape.length !== 3) throw new Error(`${op}: x '${x.name}' [${x.shape}] must be [B, T, D]`);
  const [batch, t, dim] = x.shape;
  const lens = sequenceLengths(gpu, op, lengths, batch, t);
  const out = gpu.empty([batch, dim], "f32", `mean(${x.name})`);
  dispatchMean(gpu, "mean_rows", x.shape, x, lens, out);
  return out;
}

/**
 * Gradient of meanOverSequence: dy [B, D] -> dx [B, seqLen, D] with dx[b, t] = dy[b] / len_b
 * for the first len_b = lengths[b] rows (seqLen without lengths) and 0 for the padded rows.
 */
export function meanOverSequenceBackward(
  gpu: Gpu,
  dy: Tensor,
  seqLen: number,
  lengths?: IndexInput,
): Tensor {
  const op = "meanOverSequenceBackward";
  requireDType(op, "dy", dy, ["f32"]);
  if (dy.shape.length !== 2) throw new Error(`${op}: dy '${dy.name}' [${dy.shape}] must be [B, D]`);
  requirePositiveInteger(op, "seqLen", seqLen);
  const [batch, dim] = dy.shape;
  const shape = [batch, seqLen, dim];
  const lens = sequenceLengths(gpu, op, lengths, batch, seqLen);
  const dx = gpu.empty(shape, "f32", `${op}(${dy.name})`);
  dispatchMean(gpu, "mean_rows_backward", shape, dy, lens, dx);
  return dx;
}
