/**
 * distill: condition Stable Diffusion XL on a 4-bit Qwen3 student (LoRA + Perceiver
 * Resampler) distilled from SDXL's two CLIP text encoders, with every kernel in WGSL
 * running on Deno's WebGPU.
 *
 * Run as a program, this module is the `distill` command line (`deno run mod.ts --help`).
 * Used as a library, it exports each stage of the pipeline:
 *
 * - runtime: {@linkcode Gpu} (a WebGPU device with a buffer pool and pipeline cache) and
 *   {@linkcode Tensor};
 * - encode: {@linkcode loadStudent} + {@linkcode encodePrompts} turn prompts into SDXL
 *   conditioning with a trained adapter; {@linkcode runEncode} also writes the file;
 * - serve: {@linkcode startServer} keeps a student loaded and answers `POST /v1/encode`;
 * - cache: {@linkcode runCache} / {@linkcode buildTargetCache} compute the SDXL teacher's
 *   targets for a caption data set, {@linkcode openTargetCache} reads them back;
 * - train: {@linkcode train} distils the student from a target cache into an adapter folder;
 * - CLI: {@linkcode main} runs a command line and returns its exit code.
 *
 * Encoding prompts with a trained adapter (the Qwen3 folder it was trained on, and the
 * `adapter/` folder `train` wrote):
 *
 * ```ts
 * import { destroyStudent, encodePrompts, Gpu, loadStudent } from "@distill/cli";
 *
 * const gpu = await Gpu.create();
 * const student = await loadStudent(gpu, "models/Qwen3-4B", "runs/qwen3-4b-coco/adapter");
 * try {
 *   const conditioning = await encodePrompts(gpu, student, ["a red cube on a blue sphere"]);
 *   // prompt_embeds [1, 77, 2048] and pooled_prompt_embeds [1, 1280], row-major f32.
 *   const { promptEmbeds, pooled, seqLen, seqDim } = conditioning;
 *   console.log(seqLen, seqDim, promptEmbeds.length, pooled.length);
 * } finally {
 *   destroyStudent(student);
 *   gpu.destroy();
 * }
 * ```
 *
 * @module
 */

// Runtime: the WebGPU device, tensors and what a kernel dispatch is made of.
export {
  type Dispatch,
  f32,
  F32Param,
  Gpu,
  type GpuFeatures,
  type GpuOptions,
  type GpuStats,
  grid1d,
  type HostArray,
  type Kernel,
  type ParamValue,
} from "./src/gpu/device.ts";
export { type DType, Tensor } from "./src/gpu/tensor.ts";
export { type Markers } from "./src/gpu/shader.ts";
export type { KernelProfile, KernelTime } from "./src/gpu/profile.ts";
export { type AdapterReport, adapterReport } from "./src/gpu/adapter_report.ts";

// Encode: a trained student turns prompts into SDXL conditioning; these are its parts.
export {
  type Conditioning,
  destroyStudent,
  encodePrompts,
  loadStudent,
  type LoadStudentOptions,
  type Student,
} from "./src/train/student.ts";
export {
  type QwenBatchEncoding,
  type QwenEncodeOptions,
  type QwenEncoding,
  type QwenPromptMode,
  QwenTokenizer,
} from "./src/text/qwen_tokenizer.ts";
export {
  type ClipBatchEncoding,
  type ClipEncoding,
  ClipTokenizer,
} from "./src/text/clip_tokenizer.ts";
export { type Nf4Weight } from "./src/ops/nf4_matmul.ts";
export {
  type FrozenLinear,
  type Qwen3Config,
  type Qwen3Layer,
  type Qwen3Weights,
} from "./src/models/qwen3_weights.ts";
export {
  type LinearName,
  type LoraAdapter,
  type LoraConfig,
  type LoraPair,
  QWEN3_LINEARS,
} from "./src/models/lora.ts";
export { type ResamplerConfig } from "./src/models/resampler_config.ts";
export { type ResamplerWeights } from "./src/models/resampler_weights.ts";
export {
  type EncodedFile,
  type EncodeOptions,
  runEncode,
  writeConditioning,
} from "./src/train/encode_file.ts";
export { readPromptsFile } from "./src/data/prompts_file.ts";
export { type RunningServer, type ServeOptions, startServer } from "./src/train/server.ts";

// Cache: the SDXL teacher's targets for a caption data set.
export { type CacheOptions, runCache, type TeacherSource } from "./src/data/cache_job.ts";
export {
  buildTargetCache,
  type BuildTargetCacheOptions,
  type CacheProgress,
} from "./src/data/cache_build.ts";
export {
  CACHE_FORMAT,
  CACHE_VERSION,
  type CacheManifest,
  type CacheShardEntry,
  type CacheWorker,
  type TeacherRecord,
} from "./src/data/cache_format.ts";
export {
  type CacheVerifyReport,
  mergeCacheManifests,
  verifyCache,
} from "./src/data/cache_merge.ts";
export {
  openTargetCache,
  type OpenTargetCacheOptions,
  TargetCache,
  type TargetRows,
} from "./src/data/target_cache.ts";
export {
  loadSdxlTeacher,
  type LoadSdxlTeacherOptions,
  type SdxlTeacher,
} from "./src/models/sdxl_teacher.ts";
export {
  CAPTION_FORMATS,
  type CaptionFormat,
  type CaptionRow,
  type CaptionSet,
  readCaptions,
  readCaptionSet,
  type ReadCaptionsOptions,
  type SkipCounts,
  type SprightChoice,
} from "./src/data/captions.ts";

export type { JsonScalar, Teacher } from "./src/models/teacher.ts";

// Train: distil the student from a target cache into an adapter folder.
export { type EvalResult } from "./src/train/evaluation.ts";
export { type ResamplerShape, type TrainOptions } from "./src/train/options.ts";
export {
  train,
  type TrainHooks,
  type TrainProgress,
  type TrainResult,
} from "./src/train/trainer.ts";
// Held-out figures beside the prompt-independent mean predictor and a word-neighbour reference.
export {
  describeHeldOut,
  type HeldOutFigures,
  type HeldOutReport,
} from "./src/train/evaluation.ts";
export {
  type BaseModelRecord,
  type DistillConfig,
  loadAdapter,
  type PromptSettings,
  saveAdapter,
  type TrainedAdapter,
} from "./src/train/adapter.ts";
// Live W&B tracking: `WandbRun.start(...)`, then `onMetrics: (r) => run.record(r)` in the
// train hooks and `run.finish(exitCode)` at the end.
export {
  type EvalRecord,
  type GroupValues,
  type MetricsRecord,
  type RunRecord,
  type StepRecord,
} from "./src/train/metrics.ts";
export {
  type WandbConnection,
  wandbConnection,
  WandbRun,
  type WandbRunOptions,
  type WandbStartOptions,
  type WandbTiming,
} from "./src/train/wandb.ts";

// The command line: `main(args)` runs one command and resolves to its exit code.
import { main } from "./src/cli/main.ts";
export { main };

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
