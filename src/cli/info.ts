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

export interface AdapterReport {
  description: string;
  vendor: string;
  architecture: string;
  isFallbackAdapter: boolean;
  backend: string;
  features: Record<string, boolean>;
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
