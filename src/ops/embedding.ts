/**
 * Embedding lookup: rows of a [V, D] f32/f16/bf16 table gathered into f32.
 *
 * The table is never bound whole: it is walked in windows of rows no larger than the
 * adapter's storage-binding limit (a Qwen3-4B table is 778 MB of bf16, lavapipe binds
 * 128 MiB), one dispatch per window, each writing the output rows whose id lies in it.
 */
import code from "../../kernels/embedding.wgsl" with { type: "text" };
import { type Gpu, grid1d } from "../gpu/device.ts";
import { dtypeBytes, type Tensor } from "../gpu/tensor.ts";
import { requireDType, requirePositiveInteger } from "./checks.ts";
import { type IndexInput, indexTensor } from "./indices.ts";

const WG = 256;

export interface EmbeddingOptions {
  /**
   * Largest table window bound at once, in bytes (default and upper bound:
   * `gpu.maxBindingBytes`). Tests lower it to walk many windows on a small table.
   */
  maxWindowBytes?: number;
}

/** Table rows [rowBegin, rowEnd) bound as bytes [byteOffset, byteOffset + byteLength). */
export interface TableWindow {
  rowBegin: number;
  rowEnd: number;
  byteOffset: number;
  byteLength: number;
}

/**
 * Splits `rows` rows of `rowBytes` bytes into windows of at most `maxBytes` bytes whose
 * start is a multiple of `alignment` (so a window may begin mid-row before its first whole
 * row) and whose length is a multiple of 4.
 */
export function tableWindows(
  rows: number,
  rowBytes: number,
  alignment: number,
  maxBytes: number,
): TableWindow[] {
  const limit = Math.floor(maxBytes / 4) * 4;
  const windows: TableWindow[] = [];
  for (let rowBegin = 0; rowBegin < rows;) {
    const byteOffset = Math.floor((rowBegin * rowBytes) / alignment) * alignment;
    const rowEnd = Math.min(rows, Math.floor((byteOffset + limit) / rowBytes));
    if (rowEnd <= rowBegin) {
      throw new Error(
        `embeddingGather: a ${maxBytes}-byte window cannot hold one ${rowBytes}-byte table row ` +
          `after aligning its start to ${alignment} bytes; allow at least ` +
          `${Math.ceil((rowBytes + alignment) / 4) * 4}`,
      );
    }
    const byteLength = Math.ceil((rowEnd * rowBytes) / 4) * 4 - byteOffset;
    windows.push({ rowBegin, rowEnd, byteOffset, byteLength });
    rowBegin = rowEnd;
  }
  return windows;
}

/**
 * out[n, :] = f32(table[ids[n], :]). Host ids are checked against the vocabulary (an id
 * outside [0, V) throws, naming it) and give [N, D]; an id tensor (u32/i32, any shape) gives
 * [...ids.shape, D], and its out-of-range ids, which cannot be checked without a readback,
 * give zero rows.
 */
export function embeddingGather(
  gpu: Gpu,
  table: Tensor,
  ids: IndexInput,
  opts: EmbeddingOptions = {},
): Tensor {
  const op = "embeddingGather";
  requireDType(op, "table", table, ["f32", "f16", "bf16"]);
  if (table.shape.length !== 2) {
    throw new Error(`${op}: table '${table.name}' [${table.shape}] must be [vocab, dim]`);
  }
  const [vocab, dim] = table.shape;
  requirePositiveInteger(op, "table rows", vocab);
  requirePositiveInteger(op, "table dim", dim);
  if (table.size >= 2 ** 31) {
    throw new Error(`${op}: table '${table.name}' [${table.shape}] has over 2^31 elements`);
  }
  const index = indexTensor(gpu, op, "ids", ids, {
    check: (id, at) => {
      if (id < 0 || id >= vocab) {
        throw new Error(
          `${op}: id ${id} at position ${at} is outside the vocabulary of table ` +
            `'${table.name}' (${vocab} rows)`,
        );
      }
    },
  });
  const count = index.tensor.size * dim;
  const shape = index.owned ? [index.tensor.size, dim] : [...index.tensor.shape, dim];
  const name = `embedding(${table.name})`;
  // Host ids were all checked, so every output row is written by exactly one window.
  const out = index.owned ? gpu.empty(shape, "f32", name) : gpu.zeros(shape, "f32", name);
  const elementBytes = dtypeBytes(table.dtype);
  const maxBytes = Math.min(opts.maxWindowBytes ?? gpu.maxBindingBytes, gpu.maxBindingBytes);
  const windows = tableWindows(
    vocab,
    dim * elementBytes,
    gpu.limits.minStorageBufferOffsetAlignment,
    maxBytes,
  );
  for (const w of windows) {
    gpu.dispatch({
      kernel: { name: "embedding", code, entry: `gather_${table.dtype}` },
      params: [count, dim, w.rowBegin, w.rowEnd, w.byteOffset / elementBytes],
      bindings: [table.range(w.byteOffset, w.byteLength), index.tensor, out],
      workgroups: grid1d(gpu, count, WG),
    });
  }
  if (index.owned) index.tensor.destroy();
  return out;
}
