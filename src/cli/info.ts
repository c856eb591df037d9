import { Gpu } from "../gpu/device.ts";
import { type Command, parseCommandArgs } from "./args.ts";

const HELP = `distill info: show the WebGPU adapter, backend, features and limits distill gets.

Usage: distill info [--json]

Options:
  --json      print one JSON object instead of text
  -h, --help  show this help

The backend is chosen by Deno (Vulkan on Linux, Metal on macOS, D3D12 on Windows);
set DENO_WEBGPU_BACKEND=gl to force OpenGL.`;

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

export const infoCommand: Command = {
  name: "info",
  summary: "show the WebGPU adapter, backend, features and limits",
  async run(args) {
    const { values } = parseCommandArgs("info", args, { json: { type: "boolean" } });
    if (values.help) return console.log(HELP);
    const gpu = await Gpu.create();
    const report = adapterReport(gpu);
    gpu.destroy();
    if (values.json) return console.log(JSON.stringify(report, null, 2));
    console.log(
      `adapter:  ${report.description}${report.isFallbackAdapter ? " (CPU fallback)" : ""}`,
    );
    console.log(`vendor:   ${report.vendor || "-"}  architecture: ${report.architecture || "-"}`);
    console.log(`backend:  ${report.backend}`);
    console.log(
      `features: ${
        Object.entries(report.features).map(([k, v]) => `${k} ${v ? "yes" : "no"}`).join(", ")
      }`,
    );
    for (const [k, v] of Object.entries(report.limits)) console.log(`  ${k.padEnd(36)} ${v}`);
  },
};
