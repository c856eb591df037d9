import { DispatchProfiler, type KernelProfile } from "./profile.ts";
import { type DType, dtypeBytes, numel, paddedByteLength, Tensor } from "./tensor.ts";
import { BufferPool, sizeClass } from "./pool.ts";
import { type Markers, sameMarkers, specialise } from "./shader.ts";

/** Optional adapter features the kernels can use; every code path also works without each. */
export interface GpuFeatures {
  /** `shader-f16`: f16 arithmetic in WGSL. Without it f16 data is still stored and unpacked to f32. */
  f16: boolean;
  /** `timestamp-query`: GPU-side timings in the bench. */
  timestampQuery: boolean;
  /** `subgroups`: subgroup reductions. */
  subgroups: boolean;
}

/** How `Gpu.create` picks the adapter and which optional features it may use. */
export interface GpuOptions {
  /** Pretend an optional feature is missing, to exercise the fallback paths on any adapter. */
  disable?: Array<keyof GpuFeatures>;
  /** Which adapter to ask WebGPU for; default `high-performance` (the discrete GPU on laptops). */
  powerPreference?: GPUPowerPreference;
  /**
   * Bytes of freed buffers kept for reuse across submissions (default 512 MiB); beyond it they
   * are destroyed after each submission.
   */
  maxPooledBytes?: number;
}

/**
 * A WGSL compute kernel, specialised as src/gpu/shader.ts describes: numbers through `override`
 * constants, types and shared WGSL pieces through `$NAME` markers. `name` must identify the code
 * and markers uniquely (it keys the pipeline cache).
 */
export interface Kernel {
  /** Label in errors and the pipeline cache key; two different sources must not share it. */
  name: string;
  /** The WGSL source, with `$NAME` markers where `markers` gives text. */
  code: string;
  /** WGSL text for each `$NAME` marker in `code`. */
  markers?: Markers;
  /** Entry point to run; default `main`. */
  entry?: string;
  /** Values for WGSL `override` declarations; each distinct set is its own pipeline. */
  constants?: Record<string, number>;
}

/** A float parameter; plain numbers in `params` are written as u32 (or i32 when negative). */
export class F32Param {
  /** Wraps `value` so it is written as an f32 rather than an integer. */
  constructor(readonly value: number) {}
}
/** Marks a dispatch parameter as f32, e.g. `params: [n, f32(eps)]`. */
export const f32 = (value: number): F32Param => new F32Param(value);
/** One uniform parameter of a dispatch: an integer (u32, or i32 when negative) or an `f32(...)`. */
export type ParamValue = number | F32Param;

/** What `Gpu.stats` counts. */
export interface GpuStats {
  /** Kernel dispatches recorded. */
  dispatches: number;
  /** Command buffers submitted to the queue. */
  submits: number;
  /** Buffers mapped back to the host. */
  readbacks: number;
  /** Bind groups built (a cached one is not counted again). */
  bindGroupsCreated: number;
  /** GPU buffers created (a pooled one handed out again is not counted). */
  buffersCreated: number;
  /** Bytes of free buffers the pool keeps for reuse. */
  pooledBytes: number;
  /** Bytes of buffers in use. */
  liveBytes: number;
}

/** One kernel launch as `Gpu.dispatch` records it. */
export interface Dispatch {
  /** The kernel to run. */
  kernel: Kernel;
  /** Written to a uniform struct at @group(0) @binding(0) when present. */
  params?: readonly ParamValue[];
  /**
   * Storage buffers at @binding(1), @binding(2), ... (from @binding(0) when there are no
   * params). `null` skips a slot that this entry point does not use.
   */
  bindings: ReadonlyArray<Tensor | GPUBufferBinding | null>;
  /** Workgroup counts on x, y and z (y and z default to 1); see `grid1d` for large 1-D grids. */
  workgroups: readonly [number, number?, number?];
}

/** CPU-side tensor data: Float32Array for f32, raw Uint16Array bits for f16/bf16, and so on. */
export type HostArray = Float32Array | Uint16Array | Uint32Array | Int32Array | Uint8Array;

/** How many workgroups on x and y cover `count` invocations of `workgroupSize` (x wraps at the limit). */
export function grid1d(gpu: Gpu, count: number, workgroupSize: number): [number, number, number] {
  const groups = Math.max(1, Math.ceil(count / workgroupSize));
  const maxX = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (groups <= maxX) return [groups, 1, 1];
  return [maxX, Math.ceil(groups / maxX), 1];
}

const UNIFORM_RING_BYTES = 1 << 20;
/** Host writes queued past this are submitted, so wgpu's staging copies do not pile up. */
const MAX_PENDING_WRITE_BYTES = 64 << 20;
const MAX_PARAM_BYTES = 256;
/**
 * Readback staging buffers are kept for the next read (a step reads the same losses and norms)
 * up to this many bytes in all; larger or further ones are destroyed after the read.
 */
const MAX_KEPT_STAGING_BYTES = 16 << 20;
/**
 * Bind groups kept for reuse; past it the cache starts over. A training step records about a
 * thousand distinct ones, the same each step.
 */
const MAX_CACHED_BIND_GROUPS = 8192;

const NO_ADAPTER_HELP = "no WebGPU adapter found. On Linux without a GPU install Mesa's CPU " +
  "drivers (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`, which provides lavapipe); " +
  "with a GPU install its Vulkan driver. On macOS Metal and on Windows D3D12 are used directly.";

/**
 * The WebGPU device plus what every op needs: a buffer pool, a pipeline cache and one
 * command encoder that records dispatches until `flush()` or a read submits them.
 */
export class Gpu {
  /** The underlying WebGPU device, for code that needs raw WebGPU calls. */
  readonly device: GPUDevice;
  /** Vendor, architecture and description of the adapter the device came from. */
  readonly adapterInfo: GPUAdapterInfo;
  /** Optional features that were both available and not disabled by `GpuOptions.disable`. */
  readonly features: GpuFeatures;
  /** The device's limits: the adapter's own maxima, which `create` requests. */
  readonly limits: GPUSupportedLimits;
  readonly #pool: BufferPool;
  readonly #pipelines = new Map<
    string,
    { code: string; markers?: Markers; pipeline: GPUComputePipeline; id: number }
  >();
  /** Bind groups by pipeline, uniform offset and bound ranges: steps repeat the same ones. */
  readonly #bindGroups = new Map<string, GPUBindGroup>();
  readonly #bufferIds = new WeakMap<GPUBuffer, number>();
  readonly #staging = new Map<number, GPUBuffer[]>();
  readonly #uniforms: GPUBuffer;
  readonly #uniformStage = new ArrayBuffer(UNIFORM_RING_BYTES);
  readonly #uniformStride: number;
  #uniformUsed = 0;
  #encoder: GPUCommandEncoder | null = null;
  #pass: GPUComputePassEncoder | null = null;
  #profiler: DispatchProfiler | null = null;
  #recorded = 0;
  #errors: string[] = [];
  #lost: string | null = null;
  #dispatchCount = 0;
  #submitCount = 0;
  #readbackCount = 0;
  #bindGroupCount = 0;
  #stagingCreated = 0;
  #keptStagingBytes = 0;
  #nextBufferId = 0;
  #pendingWriteBytes = 0;

  private constructor(
    adapter: GPUAdapter,
    device: GPUDevice,
    features: GpuFeatures,
    maxPooledBytes?: number,
  ) {
    this.device = device;
    this.adapterInfo = adapter.info;
    this.features = features;
    this.limits = device.limits;
    this.#pool = new BufferPool(device, maxPooledBytes);
    this.#uniformStride = Math.max(
      MAX_PARAM_BYTES,
      device.limits.minUniformBufferOffsetAlignment,
    );
    this.#uniforms = device.createBuffer({
      label: "params-ring",
      size: UNIFORM_RING_BYTES,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
    device.addEventListener("uncapturederror", (event) => {
      this.#errors.push((event as GPUUncapturedErrorEvent).error.message);
    });
    device.lost.then((info) => {
      this.#lost = info.message || info.reason || "unknown reason";
    });
  }

  /** Takes the best adapter and asks for its own maximum limits and the optional features it has. */
  static async create(options: GpuOptions = {}): Promise<Gpu> {
    if (!("gpu" in navigator) || !navigator.gpu) throw new Error(NO_ADAPTER_HELP);
    const adapter = await navigator.gpu.requestAdapter({
      powerPreference: options.powerPreference ?? "high-performance",
    });
    if (!adapter) throw new Error(NO_ADAPTER_HELP);
    const disabled = new Set(options.disable ?? []);
    const has = (name: GPUFeatureName, key: keyof GpuFeatures) =>
      adapter.features.has(name) && !disabled.has(key);
    const features: GpuFeatures = {
      f16: has("shader-f16", "f16"),
      timestampQuery: has("timestamp-query", "timestampQuery"),
      subgroups: has("subgroups" as GPUFeatureName, "subgroups"),
    };
    const requiredFeatures: GPUFeatureName[] = [];
    if (features.f16) requiredFeatures.push("shader-f16");
    if (features.timestampQuery) requiredFeatures.push("timestamp-query");
    if (features.subgroups) requiredFeatures.push("subgroups" as GPUFeatureName);
    const requiredLimits: Record<string, number> = {};
    for (const key in adapter.limits) {
      const value = (adapter.limits as unknown as Record<string, unknown>)[key];
      if (typeof value === "number") requiredLimits[key] = value;
    }
    const device = await adapter.requestDevice({ requiredFeatures, requiredLimits });
    return new Gpu(adapter, device, features, options.maxPooledBytes);
  }

  /** Largest single storage binding; bigger tensors must be walked in windows. */
  get maxBindingBytes(): number {
    return this.limits.maxStorageBufferBindingSize;
  }

  /**
   * Counters for benchmarks and leak checks: dispatches, submits, readbacks (waits for the
   * GPU), bind groups and buffers (storage and readback staging) created so far, bytes idle in
   * the buffer pool and bytes held by live tensors.
   */
  get stats(): GpuStats {
    return {
      dispatches: this.#dispatchCount,
      submits: this.#submitCount,
      readbacks: this.#readbackCount,
      bindGroupsCreated: this.#bindGroupCount,
      buffersCreated: this.#pool.createdCount + this.#stagingCreated,
      pooledBytes: this.#pool.pooledBytes,
      liveBytes: this.#pool.liveBytes,
    };
  }

  /** Returns a tensor's buffer to the pool for reuse; `Tensor.destroy` calls this. */
  releaseBuffer(buffer: GPUBuffer): void {
    this.#pool.release(buffer);
  }

  /** An uninitialised tensor (pooled memory may hold old data). */
  empty(shape: readonly number[], dtype: DType, name = "tensor"): Tensor {
    const bytes = paddedByteLength(shape, dtype);
    if (bytes > this.limits.maxBufferSize) {
      throw new Error(
        `tensor '${name}' [${shape}] ${dtype} needs ${bytes} bytes, over this adapter's ` +
          `maxBufferSize (${this.limits.maxBufferSize})`,
      );
    }
    return new Tensor(this, this.#pool.acquire(bytes, name), shape, dtype, name);
  }

  /** A zero-filled tensor. */
  zeros(shape: readonly number[], dtype: DType, name = "tensor"): Tensor {
    const t = this.empty(shape, dtype, name);
    this.clear(t);
    return t;
  }

  /** Records zeroing `t` (e.g. gradient buffers between optimizer steps). */
  clear(t: Tensor): void {
    this.#endPass();
    this.#commandEncoder().clearBuffer(t.buffer, 0, t.byteLength);
    this.#recorded++;
  }

  /**
   * Copies host data into a new tensor. f16/bf16 data is passed as raw 16-bit patterns.
   * Pending work is submitted first because the queue write happens at submission time
   * and the pooled buffer may still be read by recorded dispatches.
   */
  upload(data: HostArray, shape: readonly number[], dtype: DType, name = "tensor"): Tensor {
    const expected = numel(shape) * dtypeBytes(dtype);
    if (data.byteLength !== expected) {
      throw new Error(
        `upload of '${name}': ${data.byteLength} bytes given for [${shape}] ${dtype} (${expected} expected)`,
      );
    }
    const t = this.empty(shape, dtype, name);
    this.write(t, data);
    return t;
  }

  /** Overwrites a tensor's contents from the host (same rules as `upload`). */
  write(t: Tensor, data: HostArray, byteOffset = 0): void {
    this.flush();
    const bytes = new Uint8Array(data.buffer as ArrayBuffer, data.byteOffset, data.byteLength);
    const aligned = bytes.byteLength & ~3;
    if (aligned > 0) this.device.queue.writeBuffer(t.buffer, byteOffset, bytes, 0, aligned);
    if (aligned < bytes.byteLength) {
      const tail = new Uint8Array(4);
      tail.set(bytes.subarray(aligned));
      this.device.queue.writeBuffer(t.buffer, byteOffset + aligned, tail);
    }
    this.#pendingWriteBytes += bytes.byteLength;
    if (this.#pendingWriteBytes > MAX_PENDING_WRITE_BYTES) this.#submitWrites();
  }

  /** An empty submission makes the queue carry out (and free the staging of) pending writes. */
  #submitWrites(): void {
    this.device.queue.submit([]);
    this.#pendingWriteBytes = 0;
  }

  /** Records one compute dispatch; nothing runs until `flush()` or a read. */
  dispatch(d: Dispatch): void {
    const { pipeline, id } = this.#pipeline(d.kernel);
    const entries: GPUBindGroupEntry[] = [];
    let key = String(id);
    let binding = 0;
    if (d.params) {
      const offset = this.#writeParams(d.params);
      entries.push({
        binding: binding++,
        resource: { buffer: this.#uniforms, offset, size: MAX_PARAM_BYTES },
      });
      key += `|u${offset}`;
    }
    for (const b of d.bindings) {
      if (b) {
        const range = b instanceof Tensor ? b.binding() : b;
        entries.push({ binding, resource: range });
        key += `|${binding}:${this.#bufferId(range.buffer)}:${range.offset ?? 0}:${range.size}`;
      }
      binding++;
    }
    let bindGroup = this.#bindGroups.get(key);
    if (!bindGroup) {
      if (this.#bindGroups.size >= MAX_CACHED_BIND_GROUPS) this.#bindGroups.clear();
      bindGroup = this.device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries });
      this.#bindGroups.set(key, bindGroup);
      this.#bindGroupCount++;
    }
    const pass = this.#profiler ? this.#profiledPass(d.kernel) : this.#computePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    const [x, y = 1, z = 1] = d.workgroups;
    const maxDim = this.limits.maxComputeWorkgroupsPerDimension;
    if (x > maxDim || y > maxDim || z > maxDim) {
      throw new Error(
        `kernel '${d.kernel.name}': workgroups [${x},${y},${z}] over the limit ${maxDim}`,
      );
    }
    pass.dispatchWorkgroups(x, y, z);
    this.#recorded++;
    this.#dispatchCount++;
  }

  /** Records a buffer-to-buffer copy (byte offsets and length must be multiples of 4). */
  copy(src: Tensor, srcOffset: number, dst: Tensor, dstOffset: number, bytes: number): void {
    this.#endPass();
    this.#commandEncoder().copyBufferToBuffer(src.buffer, srcOffset, dst.buffer, dstOffset, bytes);
    this.#recorded++;
  }

  /** Submits everything recorded so far. */
  flush(): void {
    this.#throwIfBroken();
    if (!this.#encoder) {
      if (this.#pendingWriteBytes > 0) this.#submitWrites();
      return;
    }
    this.#endPass();
    if (this.#uniformUsed > 0) {
      this.device.queue.writeBuffer(this.#uniforms, 0, this.#uniformStage, 0, this.#uniformUsed);
    }
    this.device.queue.submit([this.#encoder.finish()]);
    this.#pendingWriteBytes = 0;
    this.#pool.trim();
    this.#submitCount++;
    this.#encoder = null;
    this.#recorded = 0;
    this.#uniformUsed = 0;
  }

  /** Waits until the GPU has finished everything submitted, then reports any device error. */
  async sync(): Promise<void> {
    this.flush();
    await this.device.queue.onSubmittedWorkDone();
    this.#throwIfBroken();
  }

  /** Downloads several tensors with one submission and one wait (each readback costs milliseconds). */
  async readAll(tensors: readonly Tensor[]): Promise<HostArray[]> {
    this.#endPass();
    const staging = tensors.map((t) => {
      const buffer = this.#stagingBuffer(t);
      this.#commandEncoder().copyBufferToBuffer(t.buffer, 0, buffer, 0, t.byteLength);
      return buffer;
    });
    this.flush();
    this.#readbackCount++;
    await Promise.all(staging.map((b) => b.mapAsync(GPUMapMode.READ, 0, b.size)));
    this.#throwIfBroken();
    return tensors.map((t, i) => {
      const buffer = staging[i];
      const bytes = buffer.getMappedRange(0, buffer.size).slice(0, t.size * dtypeBytes(t.dtype));
      this.#returnStaging(buffer);
      return hostView(bytes, t.dtype);
    });
  }

  /** A mappable buffer to copy `t` into: a kept one of its size class when there is one. */
  #stagingBuffer(t: Tensor): GPUBuffer {
    const size = sizeClass(t.byteLength);
    const kept = this.#staging.get(size)?.pop();
    if (kept) {
      this.#keptStagingBytes -= size;
      return kept;
    }
    this.#stagingCreated++;
    return this.device.createBuffer({
      label: `read:${t.name}`,
      size,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
  }

  /** Keeps the buffer for the next read while the kept ones stay under the cap. */
  #returnStaging(buffer: GPUBuffer): void {
    if (this.#keptStagingBytes + buffer.size > MAX_KEPT_STAGING_BYTES) {
      buffer.destroy();
      return;
    }
    this.#keptStagingBytes += buffer.size;
    buffer.unmap();
    let list = this.#staging.get(buffer.size);
    if (!list) this.#staging.set(buffer.size, list = []);
    list.push(buffer);
  }

  /** Downloads one tensor (submitting recorded work first); the array type follows its dtype. */
  async read(t: Tensor): Promise<HostArray> {
    return (await this.readAll([t]))[0];
  }

  /** Downloads an f32 tensor. */
  async readF32(t: Tensor): Promise<Float32Array> {
    if (t.dtype !== "f32") throw new Error(`readF32: tensor '${t.name}' is ${t.dtype}, not f32`);
    return (await this.read(t)) as Float32Array;
  }

  /**
   * Times every dispatch from now on the GPU, each in a pass of its own, until `stopProfile`
   * (src/gpu/profile.ts). Needs the `timestamp-query` feature.
   */
  startProfile(): void {
    if (!this.features.timestampQuery) {
      throw new Error(
        "Gpu.startProfile: this adapter has no timestamp-query feature (e.g. llvmpipe through " +
          "OpenGL); check gpu.features.timestampQuery first",
      );
    }
    if (this.#profiler) throw new Error("Gpu.startProfile: a profile is already running");
    this.#endPass();
    this.#profiler = new DispatchProfiler(this.device);
  }

  /** Waits for the profiled work and returns its GPU time per kernel. */
  async stopProfile(): Promise<KernelProfile> {
    const profiler = this.#profiler;
    if (!profiler) throw new Error("Gpu.stopProfile: no profile is running (call startProfile)");
    await this.sync();
    this.#profiler = null;
    return await profiler.resolve(this.device);
  }

  /** Frees the pooled buffers and the device; the `Gpu` and its tensors are unusable after. */
  destroy(): void {
    this.#pool.destroy();
    this.#uniforms.destroy();
    for (const list of this.#staging.values()) for (const b of list) b.destroy();
    this.#staging.clear();
    this.#bindGroups.clear();
    this.#pipelines.clear();
    this.device.destroy();
  }

  #throwIfBroken(): void {
    if (this.#lost) throw new Error(`WebGPU device lost: ${this.#lost}`);
    if (this.#errors.length > 0) {
      const errors = this.#errors.splice(0);
      throw new Error(`WebGPU error: ${errors.join("\n")}`);
    }
  }

  #pipeline(kernel: Kernel): { pipeline: GPUComputePipeline; id: number } {
    const entry = kernel.entry ?? "main";
    const key = `${kernel.name}|${entry}|${JSON.stringify(kernel.constants ?? {})}`;
    const cached = this.#pipelines.get(key);
    if (cached) {
      if (cached.code !== kernel.code || !sameMarkers(cached.markers, kernel.markers)) {
        throw new Error(`kernel name '${kernel.name}' is used for two different WGSL sources`);
      }
      return cached;
    }
    const code = specialise(kernel.name, kernel.code, kernel.markers);
    const module = this.device.createShaderModule({ label: kernel.name, code });
    const pipeline = this.device.createComputePipeline({
      label: `${kernel.name}:${entry}`,
      layout: "auto",
      compute: { module, entryPoint: entry, constants: kernel.constants },
    });
    const compiled = {
      code: kernel.code,
      markers: kernel.markers,
      pipeline,
      id: this.#pipelines.size,
    };
    this.#pipelines.set(key, compiled);
    return compiled;
  }

  /** A number per buffer for bind group keys (a buffer object is never reused for another). */
  #bufferId(buffer: GPUBuffer): number {
    let id = this.#bufferIds.get(buffer);
    if (id === undefined) this.#bufferIds.set(buffer, id = this.#nextBufferId++);
    return id;
  }

  #writeParams(params: readonly ParamValue[]): number {
    if (params.length * 4 > MAX_PARAM_BYTES) throw new Error("too many kernel parameters");
    if (this.#uniformUsed + this.#uniformStride > UNIFORM_RING_BYTES) this.flush();
    const offset = this.#uniformUsed;
    const view = new DataView(this.#uniformStage, offset, MAX_PARAM_BYTES);
    params.forEach((p, i) => {
      if (p instanceof F32Param) view.setFloat32(i * 4, p.value, true);
      else if (p < 0) view.setInt32(i * 4, p, true);
      else view.setUint32(i * 4, p, true);
    });
    this.#uniformUsed += this.#uniformStride;
    return offset;
  }

  #commandEncoder(): GPUCommandEncoder {
    if (!this.#encoder) this.#encoder = this.device.createCommandEncoder();
    return this.#encoder;
  }

  /** A pass of its own for one dispatch, with timestamps at its beginning and end. */
  #profiledPass(kernel: Kernel): GPUComputePassEncoder {
    this.#endPass();
    const name = kernel.entry ? `${kernel.name}:${kernel.entry}` : kernel.name;
    const timestampWrites = this.#profiler!.next(name);
    this.#pass = this.#commandEncoder().beginComputePass(
      timestampWrites ? { timestampWrites } : undefined,
    );
    return this.#pass;
  }

  #computePass(): GPUComputePassEncoder {
    if (!this.#pass) this.#pass = this.#commandEncoder().beginComputePass();
    return this.#pass;
  }

  #endPass(): void {
    if (this.#pass) {
      this.#pass.end();
      this.#pass = null;
    }
  }
}

function hostView(bytes: ArrayBuffer, dtype: DType): HostArray {
  switch (dtype) {
    case "f32":
      return new Float32Array(bytes);
    case "f16":
    case "bf16":
      return new Uint16Array(bytes);
    case "u32":
      return new Uint32Array(bytes);
    case "i32":
      return new Int32Array(bytes);
    case "u8":
      return new Uint8Array(bytes);
  }
}
