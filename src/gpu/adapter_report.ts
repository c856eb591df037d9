import type { Gpu } from "./device.ts";

const LIMITS = [
  "maxBufferSize",
  "maxStorageBufferBindingSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupsPerDimension",
  "maxStorageBuffersPerShaderStage",
  "minStorageBufferOffsetAlignment",
  "minUniformBufferOffsetAlignment",
] as const;

/** A WebGPU adapter's identity, backend, optional features and the limits distill cares about. */
export interface AdapterReport {
  /** Human-readable adapter name (falls back to the device name). */
  description: string;
  /** GPU vendor as WebGPU reports it (may be empty). */
  vendor: string;
  /** GPU architecture as WebGPU reports it (may be empty). */
  architecture: string;
  /** True for a software adapter (such as lavapipe), which is much slower than a GPU. */
  isFallbackAdapter: boolean;
  /** The `DENO_WEBGPU_BACKEND` override, or the platform default. */
  backend: string;
  /** The optional features in use (see `GpuFeatures`). */
  features: Record<string, boolean>;
  /** The WebGPU limits that bound tensor and workgroup sizes, by their WebGPU name. */
  limits: Record<string, number>;
}

/** What the adapter is and offers, as `info` prints it and the bench records it. */
export function adapterReport(gpu: Gpu): AdapterReport {
  const info = gpu.adapterInfo;
  const limits: Record<string, number> = {};
  for (const key of LIMITS) limits[key] = gpu.limits[key];
  return {
    description: info.description || info.device || "unknown adapter",
    vendor: info.vendor,
    architecture: info.architecture,
    isFallbackAdapter: (info as GPUAdapterInfo & { isFallbackAdapter?: boolean })
      .isFallbackAdapter ?? false,
    backend: Deno.env.get("DENO_WEBGPU_BACKEND") ?? "default (Vulkan / Metal / D3D12)",
    features: { ...gpu.features },
    limits,
  };
}
