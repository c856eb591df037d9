/**
 * GPU time per kernel from timestamp queries: while `Gpu.startProfile()` is on, every dispatch
 * gets its own compute pass whose beginning and end write a timestamp, and
 * `Gpu.stopProfile()` sums the differences by kernel. What it says is where the GPU's time goes
 * (the step profile in `deno task bench --only student`); one pass per dispatch adds a little
 * time of its own, so the bench's wall times are measured without it.
 */

/** GPU time of one kernel (pipeline name, with the entry point when it has several). */
export interface KernelTime {
  /** `name` or `name:entry` of the kernel (src/gpu/device.ts's `Kernel`). */
  kernel: string;
  /** GPU seconds summed over its calls. */
  seconds: number;
  /** Dispatches of it that were timed. */
  calls: number;
}

/** What `Gpu.stopProfile` returns. */
export interface KernelProfile {
  /** By GPU time, longest first. */
  kernels: KernelTime[];
  /** Sum over the profiled dispatches. */
  seconds: number;
  /** Dispatches past the query set's capacity, recorded but not timed. */
  untimed: number;
}

/** WebGPU's maximum query count per set: two per dispatch. */
const MAX_QUERIES = 4096;

/** The query set and kernel names of one profile; `Gpu` drives it. */
export class DispatchProfiler {
  readonly #querySet: GPUQuerySet;
  readonly #kernels: string[] = [];
  #untimed = 0;

  constructor(device: GPUDevice) {
    this.#querySet = device.createQuerySet({ type: "timestamp", count: MAX_QUERIES });
  }

  /** The timestamp writes for the pass of the next dispatch, or undefined once the set is full. */
  next(kernel: string): GPUComputePassTimestampWrites | undefined {
    const index = 2 * this.#kernels.length;
    if (index + 2 > MAX_QUERIES) {
      this.#untimed++;
      return undefined;
    }
    this.#kernels.push(kernel);
    return {
      querySet: this.#querySet,
      beginningOfPassWriteIndex: index,
      endOfPassWriteIndex: index + 1,
    };
  }

  /** Reads the timestamps (after the profiled work was submitted) and frees the query set. */
  async resolve(device: GPUDevice): Promise<KernelProfile> {
    const count = 2 * this.#kernels.length;
    const byKernel = new Map<string, KernelTime>();
    let total = 0;
    if (count > 0) {
      const bytes = count * 8;
      const resolved = device.createBuffer({
        size: bytes,
        usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
      });
      const staging = device.createBuffer({
        size: bytes,
        usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
      });
      const encoder = device.createCommandEncoder();
      encoder.resolveQuerySet(this.#querySet, 0, count, resolved, 0);
      encoder.copyBufferToBuffer(resolved, 0, staging, 0, bytes);
      device.queue.submit([encoder.finish()]);
      await staging.mapAsync(GPUMapMode.READ);
      const stamps = new BigUint64Array(staging.getMappedRange().slice(0));
      staging.unmap();
      staging.destroy();
      resolved.destroy();
      this.#kernels.forEach((kernel, i) => {
        // Nanoseconds; a clock that steps back between two passes counts as zero.
        const end = stamps[2 * i + 1];
        const begin = stamps[2 * i];
        const seconds = end > begin ? Number(end - begin) / 1e9 : 0;
        const entry = byKernel.get(kernel) ?? { kernel, seconds: 0, calls: 0 };
        entry.seconds += seconds;
        entry.calls++;
        byKernel.set(kernel, entry);
        total += seconds;
      });
    }
    this.#querySet.destroy();
    return {
      kernels: [...byKernel.values()].sort((a, b) => b.seconds - a.seconds),
      seconds: total,
      untimed: this.#untimed,
    };
  }
}
