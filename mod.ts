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
  type Dispatch,
  f32,
  Gpu,
  type GpuFeatures,
  type GpuOptions,
  grid1d,
  type HostArray,
  type Kernel,
} from "./src/gpu/device.ts";
export { type DType, Tensor } from "./src/gpu/tensor.ts";
export { type AdapterReport, adapterReport } from "./src/cli/info.ts";

export {
  type Conditioning,
  destroyStudent,
  encodePrompts,
  loadStudent,
  type LoadStudentOptions,
  type Student,
} from "./src/models/student.ts";
export { QwenTokenizer } from "./src/text/qwen_tokenizer.ts";
export { type Qwen3Config, type Qwen3Weights } from "./src/models/qwen3_weights.ts";
export { type LoraAdapter, type LoraConfig } from "./src/models/lora.ts";
export { type ResamplerWeights } from "./src/models/resampler.ts";
export {
  type EncodedFile,
  type EncodeOptions,
  readPromptsFile,
  runEncode,
  writeConditioning,
} from "./src/cli/encode.ts";

export { type CacheOptions, runCache, type TeacherSource } from "./src/cli/cache.ts";
export {
  buildTargetCache,
  type BuildTargetCacheOptions,
  CACHE_FORMAT,
  CACHE_VERSION,
  type CacheManifest,
  type CacheShardEntry,
  type CacheWorker,
  type JsonScalar,
  mergeCacheManifests,
  openTargetCache,
  TargetCache,
  type TargetRows,
  type Teacher,
  type TeacherRecord,
  verifyCache,
} from "./src/data/target_cache.ts";
export {
  loadSdxlTeacher,
  type LoadSdxlTeacherOptions,
  type SdxlTeacher,
} from "./src/models/sdxl_teacher.ts";
export {
  type CaptionFormat,
  type CaptionRow,
  type CaptionSet,
  readCaptions,
  readCaptionSet,
  type ReadCaptionsOptions,
  type SprightChoice,
} from "./src/data/captions.ts";

export {
  type EvalResult,
  type ResamplerShape,
  train,
  type TrainHooks,
  type TrainOptions,
  type TrainProgress,
  type TrainResult,
} from "./src/train/trainer.ts";
export {
  type BaseModelRecord,
  type DistillConfig,
  loadAdapter,
  type PromptSettings,
  saveAdapter,
  type TrainedAdapter,
} from "./src/train/adapter.ts";

import { main } from "./src/cli/main.ts";
export { main };

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
