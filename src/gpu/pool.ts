const USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
/** Default for the bytes of freed buffers kept for reuse across submissions (`BufferPool.trim`). */
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
 *
 * Of the free buffers of a class the oldest is handed out first, so a loop that frees all it
 * takes gets the same buffers in the same places every time: a training step then records
 * the same bind groups each step (the `Gpu` caches them) instead of a reshuffled set.
 */
export class BufferPool {
  readonly #device: GPUDevice;
  /** Free buffers per size class, newest first, so `pop` gives the oldest. */
  readonly #free = new Map<number, GPUBuffer[]>();
  readonly #age = new WeakMap<GPUBuffer, number>();
  /** When each free buffer was released (a release counter), for trimming the stalest. */
  readonly #releasedAt = new WeakMap<GPUBuffer, number>();
  #releases = 0;
  #pooledBytes = 0;
  #liveBytes = 0;
  #created = 0;

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

  /** Buffers created so far: flat once a loop that allocates and frees reuses what it freed. */
  get createdCount(): number {
    return this.#created;
  }

  acquire(bytes: number, label: string): GPUBuffer {
    const size = sizeClass(bytes);
    const reused = this.#free.get(size)?.pop();
    this.#liveBytes += size;
    if (reused) {
      this.#pooledBytes -= size;
      return reused;
    }
    const buffer = this.#device.createBuffer({ label, size, usage: USAGE });
    this.#age.set(buffer, this.#created++);
    return buffer;
  }

  release(buffer: GPUBuffer): void {
    const size = buffer.size;
    this.#liveBytes -= size;
    let list = this.#free.get(size);
    if (!list) this.#free.set(size, list = []);
    const age = this.#age.get(buffer)!;
    let at = list.length;
    while (at > 0 && this.#age.get(list[at - 1])! < age) at--;
    list.splice(at, 0, buffer);
    this.#releasedAt.set(buffer, this.#releases++);
    this.#pooledBytes += size;
  }

  /**
   * Destroys free buffers, the longest unused first, until the pool holds at most its cap.
   * Called after a submission (work already submitted keeps a destroyed buffer alive until
   * done): within one recorded pass freed buffers are kept whatever their bytes, since the pass
   * usually takes them again (a training step frees its forward's temporaries before its
   * backward needs as many), and destroying them would mean creating them anew each step;
   * what an earlier job left (another model's buffers) goes first.
   */
  trim(): void {
    if (this.#pooledBytes <= this.#maxPooledBytes) return;
    const stalestFirst = [...this.#free.values()].flat()
      .sort((a, b) => this.#releasedAt.get(a)! - this.#releasedAt.get(b)!);
    for (const buffer of stalestFirst) {
      if (this.#pooledBytes <= this.#maxPooledBytes) break;
      const list = this.#free.get(buffer.size)!;
      list.splice(list.indexOf(buffer), 1);
      this.#pooledBytes -= buffer.size;
      buffer.destroy();
    }
  }

  destroy(): void {
    for (const list of this.#free.values()) for (const b of list) b.destroy();
    this.#free.clear();
    this.#pooledBytes = 0;
  }
}
