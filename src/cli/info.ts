import { Gpu } from "../gpu/device.ts";
import { adapterReport } from "../gpu/adapter_report.ts";
import { type Command, parseCommandArgs } from "./args.ts";

const HELP = `distill info: show the WebGPU adapter, backend, features and limits distill gets.

Usage: distill info [--json]

Options:
  --json      print one JSON object instead of text
  -h, --help  show this help

The backend is chosen by Deno (Vulkan on Linux, Metal on macOS, D3D12 on Windows);
set DENO_WEBGPU_BACKEND=gl to force OpenGL.`;

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
