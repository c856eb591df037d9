/**
 * distill: condition Stable Diffusion XL on a 4-bit Qwen3 student (LoRA + Perceiver
 * Resampler) distilled from SDXL's two CLIP text encoders, with every kernel in WGSL
 * running on Deno's WebGPU.
 *
 * Used as a library, this module exports the GPU runtime and the ops; run as a program
 * it is the `distill` command line (`deno run mod.ts --help`).
 *
 * @module
 */

export {
  f32,
  Gpu,
  type GpuFeatures,
  type GpuOptions,
  grid1d,
  type Kernel,
} from "./src/gpu/device.ts";
export { type DType, Tensor } from "./src/gpu/tensor.ts";
export { type AdapterReport, adapterReport } from "./src/cli/info.ts";
import { main } from "./src/cli/main.ts";

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
