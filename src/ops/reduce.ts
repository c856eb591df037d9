/**
 * Deterministic reductions. `columnSum` sums a tensor over every axis but the last, the
 * backward of a broadcast: the gradient of a Linear bias (dY [M, N] -> [N]) or of a tensor
 * shared by every batch row. No atomics: the same inputs give the same bits on every run.
 */
import code from "../../kernels/reduce.wgsl" with { type: "text" };
import { type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut } from "./checks.ts";

const WG = 64;
/**
 * Long columns are summed in chunks of at least this many rows, and at most MAX_CHUNKS
 * chunks, so that both passes keep many invocations busy and the second pass stays short.
 */
const MIN_CHUNK_ROWS = 16;
const MAX_CHUNKS = 256;

function dispatchColumnSum(
  gpu: Gpu,
  x: Tensor,
  out: Tensor,
  rows: number,
  cols: number,
  chunkRows: number,
): void {
  const chunks = Math.ceil(rows / chunkRows);
  const [gx, gy] = grid1d(gpu, cols, WG);
  gpu.dispatch({
    kernel: { name: "reduce", code, entry: "column_sum", constants: { WG } },
    params: [rows, cols, chunkRows],
    bindings: [x, out],
    workgroups: [gx, gy, chunks],
  });
}

/**
 * Rows per chunk when `rows` rows are summed in two passes. An op that writes its own per-chunk
 * partial sums (of a product it never stores, e.g. the norms' dweight) chunks with it and
 * finishes with `sumChunkPartials`, so its sums are added in columnSum's order.
 */
export function columnSumChunkRows(rows: number): number {
  return Math.max(MIN_CHUNK_ROWS, Math.ceil(rows / MAX_CHUNKS));
}

/** partial [chunks, N] f32 -> out [N]: columnSum's second pass, the chunks added in order. */
export function sumChunkPartials(gpu: Gpu, partial: Tensor, out: Tensor): void {
  const [chunks, cols] = partial.shape;
  dispatchColumnSum(gpu, partial, out, chunks, cols, chunks);
}

/** x [..., N] f32 -> [N]: the sum over all leading axes (rows), added in row order per chunk. */
export function columnSum(gpu: Gpu, x: Tensor, out?: Tensor): Tensor {
  const op = "columnSum";
  requireDType(op, "x", x, ["f32"]);
  if (x.shape.length === 0) throw new Error(`${op}: x '${x.name}' must have at least one axis`);
  const cols = x.shape.at(-1)!;
  const rows = cols === 0 ? 0 : x.size / cols;
  if (out) requireOut(op, out, cols, [x]);
  const name = `columnSum(${x.name})`;
  if (rows === 0 && cols > 0) {
    const zeros = gpu.zeros([cols], "f32", name);
    if (!out) return zeros;
    gpu.copy(zeros, 0, out, 0, out.byteLength);
    zeros.destroy();
    return out;
  }
  const result = out ?? gpu.empty([cols], "f32", name);
  if (cols === 0) return result;
  const chunkRows = columnSumChunkRows(rows);
  if (rows <= chunkRows) {
    dispatchColumnSum(gpu, x, result, rows, cols, rows);
    return result;
  }
  const chunks = Math.ceil(rows / chunkRows);
  const partial = gpu.empty([chunks, cols], "f32", `${op}.partial(${x.name})`);
  dispatchColumnSum(gpu, x, partial, rows, cols, chunkRows);
  sumChunkPartials(gpu, partial, result);
  partial.destroy();
  return result;
}
