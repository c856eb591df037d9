const USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
/** Default for the bytes of freed buffers kept for reuse; beyond it they are destroyed. */
export const DEFAULT_MAX_POOLED_BYTES = 512 * 1024 * 1024;

const MIB = 1 << 20;

/**
 * Rounds to 2^k or 1.5·2^k so sizes recur and buffers get reused; from 4 MiB up to the next
 * MiB instead, since large buffers are mostly weights (allocated once) whose waste would count.
 */
export function sizeClass(bytes: number): number {
  if (bytes >= 4 * MIB) return Math.ceil(bytes / MIB) * MIB;
  const n = Math.max(16, bytes);
  const pow = 2 ** Math.ceil(Math.log2(n));
  const threeQuarter = pow * 0.75;
  return n <= threeQuarter && Number.isInteger(threeQuarter) ? threeQuarter : pow;
}

/**
 * Storage buffers by size class. A released buffer may be handed out again before the
 * GPU has run the work that reads it: that is safe because dispatches in one queue run
 * in order, and host writes (`Gpu.write`) submit pending work first.
 */
export class BufferPool {
  readonly #device: GPUDevice;
  readonly #free = new Map<number, GPUBuffer[]>();
  #pooledBytes = 0;
  #liveBytes = 0;
  /** Released past the cap: destroyed after the next submission, since recorded work may use them. */
  #retired: GPUBuffer[] = [];

  readonly #maxPooledBytes: number;

  constructor(device: GPUDevice, maxPooledBytes = DEFAULT_MAX_POOLED_BYTES) {
    this.#device = device;
    this.#maxPooledBytes = maxPooledBytes;
  }

  get pooledBytes(): number {
    return this.#pooledBytes;
  }

  get liveBytes(): number {
    return this.#liveBytes;
  }

  acquire(bytes: number, label: string): GPUBuffer {
    const size = sizeClass(bytes);
    const reused = this.#free.get(size)?.pop();
    this.#liveBytes += size;
    if (reused) {
      this.#pooledBytes -= size;
      return reused;
    }
    return this.#device.createBuffer({ label, size, usage: USAGE });
  }

  release(buffer: GPUBuffer): void {
    const size = buffer.size;
    this.#liveBytes -= size;
    if (this.#pooledBytes + size > this.#maxPooledBytes) {
      this.#retired.push(buffer);
      return;
    }
    let list = this.#free.get(size);
    if (!list) this.#free.set(size, list = []);
    list.push(buffer);
    this.#pooledBytes += size;
  }

  /** Call after submitting: work already submitted keeps a destroyed buffer alive until done. */
  destroyRetired(): void {
    for (const b of this.#retired) b.destroy();
    this.#retired = [];
  }

  destroy(): void {
    this.destroyRetired();
    for (const list of this.#free.values()) for (const b of list) b.destroy();
    this.#free.clear();
    this.#pooledBytes = 0;
  }
}
