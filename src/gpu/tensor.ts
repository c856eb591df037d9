/** Element types a GPU tensor can hold. `bf16` and `f16` are 2 bytes, `u8` is packed bytes. */
export type DType = "f32" | "f16" | "bf16" | "u32" | "i32" | "u8";

const BYTES: Record<DType, number> = { f32: 4, f16: 2, bf16: 2, u32: 4, i32: 4, u8: 1 };

export function dtypeBytes(dtype: DType): number {
  return BYTES[dtype];
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw new Error(`bad dimension ${d} in shape [${shape}]`);
    n *= d;
  }
  return n;
}

/** Storage bindings must be a multiple of 4 bytes, so 2- and 1-byte tensors round up. */
export function paddedByteLength(shape: readonly number[], dtype: DType): number {
  return Math.ceil((numel(shape) * BYTES[dtype]) / 4) * 4;
}

/** Anything that can hand its buffer back to a pool. */
export interface BufferOwner {
  releaseBuffer(buffer: GPUBuffer): void;
  readonly maxBindingBytes: number;
}

/**
 * A dense row-major array in GPU memory. Tensors never own CPU data: upload and
 * download go through the `Gpu` that made them, so reads batch with other work.
 */
export class Tensor {
  #buffer: GPUBuffer | null;
  /** Dimensions, outermost first. */
  readonly shape: readonly number[];
  /** Element type of the buffer's contents. */
  readonly dtype: DType;
  /** Label used in error messages and GPU debug labels. */
  readonly name: string;
  readonly #owner: BufferOwner;
  readonly #ownsBuffer: boolean;

  /**
   * Wraps an existing buffer; use `Gpu.empty`, `Gpu.upload` and friends rather than this.
   * `ownsBuffer` false makes a view whose `destroy` leaves the buffer alone.
   */
  constructor(
    owner: BufferOwner,
    buffer: GPUBuffer,
    shape: readonly number[],
    dtype: DType,
    name = "tensor",
    ownsBuffer = true,
  ) {
    this.#owner = owner;
    this.#ownsBuffer = ownsBuffer;
    this.#buffer = buffer;
    this.shape = [...shape];
    this.dtype = dtype;
    this.name = name;
  }

  /** The GPU buffer; throws once the tensor was destroyed. */
  get buffer(): GPUBuffer {
    if (!this.#buffer) throw new Error(`tensor '${this.name}' was used after destroy()`);
    return this.#buffer;
  }

  /** Number of elements. */
  get size(): number {
    return numel(this.shape);
  }

  /** Bytes the data takes, rounded up to a multiple of 4 as storage bindings require. */
  get byteLength(): number {
    return paddedByteLength(this.shape, this.dtype);
  }

  /** Whether `destroy` was called (views report their own state, not the original's). */
  get destroyed(): boolean {
    return this.#buffer === null;
  }

  /** Whole-tensor binding; fails with the tensor's name when it exceeds the device's binding limit. */
  binding(): GPUBufferBinding {
    return this.range(0, this.byteLength);
  }

  /** A window of the tensor, for ops that walk tensors too large to bind at once. */
  range(byteOffset: number, byteLength: number): GPUBufferBinding {
    if (byteLength > this.#owner.maxBindingBytes) {
      throw new Error(
        `tensor '${this.name}' [${this.shape}] ${this.dtype} needs a ${byteLength}-byte binding, ` +
          `over this adapter's maxStorageBufferBindingSize (${this.#owner.maxBindingBytes}); ` +
          `this op cannot split it, so use a smaller model or an adapter with a larger limit`,
      );
    }
    return { buffer: this.buffer, offset: byteOffset, size: byteLength };
  }

  /** Same memory, new shape (no copy). The view must not outlive the original; destroying it is a no-op. */
  reshape(shape: readonly number[]): Tensor {
    if (numel(shape) !== this.size) {
      throw new Error(`cannot reshape '${this.name}' [${this.shape}] to [${shape}]`);
    }
    return new Tensor(this.#owner, this.buffer, shape, this.dtype, this.name, false);
  }

  /**
   * The first `numel(shape)` elements as a tensor of `shape` (no copy), e.g. the leading rows of
   * a matrix. Like `reshape`, the view must not outlive the original.
   */
  leading(shape: readonly number[]): Tensor {
    if (numel(shape) > this.size) {
      throw new Error(`'${this.name}' [${this.shape}] has no leading [${shape}]`);
    }
    return new Tensor(this.#owner, this.buffer, shape, this.dtype, this.name, false);
  }

  /** Hands the buffer back to the pool; later GPU work in the same submission may reuse it. */
  destroy(): void {
    if (this.#buffer && this.#ownsBuffer) this.#owner.releaseBuffer(this.#buffer);
    this.#buffer = null;
  }
}
