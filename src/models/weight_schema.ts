/**
 * One weight loader for every model (as candle's var_builder): a model declares each tensor
 * once in a `WeightSchema` (name, shape from its config, how it goes on the GPU, whether it
 * is optional; every weight may be saved as F32, F16 or BF16), and `loadWeights` walks that
 * schema against a safetensors file or a Hugging Face model folder. Every header is checked against the schema (missing, misshapen, wrongly typed and
 * unexpected tensors) before any tensor data is read or anything touches the GPU; then the
 * tensors stream on one at a time in file order, shard by shard, so host memory peaks at about
 * one tensor (large 16-bit tensors in row-aligned pieces) beyond a scratch array reused for all.
 */
import { join } from "node:path";
import type { Gpu } from "../gpu/device.ts";
import { type DType, dtypeBytes, numel, Tensor } from "../gpu/tensor.ts";
import type { ModelFolder } from "../io/hf.ts";
import { type SafeDType, SafetensorsFile, type TensorInfo } from "../io/safetensors.ts";
import { NF4_BLOCK_SIZE, nf4Quantize, type Nf4Quantized } from "../ops/nf4.ts";
import { type Nf4Decode, type Nf4Weight, uploadNf4Weight } from "../ops/nf4_matmul.ts";

/**
 * How a tensor goes on the GPU:
 * - "f32": decoded to f32 (exactly, from F32/F16/BF16);
 * - "stored": in the file's own dtype (16-bit weights stay 16-bit), in row-aligned pieces;
 * - "nf4": an [out, in] weight quantized to NF4 as it is read;
 * - "unread": checked against the schema but never read (parts a load does not need).
 */
export type WeightPlacement = "f32" | "stored" | "nf4" | "unread";

/** One tensor a model declares. */
export interface WeightSpec {
  name: string;
  shape: number[];
  placement: WeightPlacement;
  /** Absent from a file without error (e.g. an lm_head the encoder never reads). */
  optional?: boolean;
}

/** Every tensor of one model, in the order the model lists them. */
export interface WeightSchema {
  /** What the weights are, for errors: "a Qwen3 decoder with 2 layers". */
  model: string;
  /** The file the names and shapes come from (a config.json), for errors. */
  config: string;
  tensors: WeightSpec[];
  /** Names a checkpoint may carry that are not weights (saved buffers); skipped unchecked. */
  ignore?: (name: string) => boolean;
}

export interface LoadWeightsOptions {
  /** Called after each tensor is on the GPU, with the count of tensors this load reads. */
  onTensor?: (name: string, done: number, total: number) => void;
  /**
   * "stored" tensors are streamed in row-aligned pieces of about this many bytes (default
   * 64 MiB), so the host never holds a whole embedding table.
   */
  storedChunkBytes?: number;
  /** What products over many rows decode "nf4" weights to (`uploadNf4Weight`); default "f32". */
  nf4Decode?: Nf4Decode;
}

/** The dtypes a weight may be saved in, with the GPU dtype a "stored" weight keeps. */
const GPU_DTYPE: Partial<Record<SafeDType, DType>> = { F32: "f32", F16: "f16", BF16: "bf16" };
const WEIGHT_DTYPE_LIST = "F32, F16 or BF16";
const DEFAULT_STORED_CHUNK_BYTES = 64 << 20;

/** `specs(i)` of layers 0..count-1, each name prefixed with `prefix(i)`. */
export function perLayer(
  count: number,
  prefix: (layer: number) => string,
  specs: (layer: number) => WeightSpec[],
): WeightSpec[] {
  return Array.from(
    { length: count },
    (_, i) => specs(i).map((spec) => ({ ...spec, name: prefix(i) + spec.name })),
  ).flat();
}

/** The checkpoint a schema is checked against and streamed from: one file or a model folder. */
export type WeightFiles = SafetensorsFile | ModelFolder;

/** What the loader needs of either kind of `WeightFiles`. */
interface WeightSource {
  /** The file named when a tensor is missing (the single file or the shard index). */
  weightsPath: string;
  names(): string[];
  info(name: string): TensorInfo;
  /** The file that holds `name`. */
  fileOf(name: string): string;
  /** Names to read together from one open file, and how to release it after. */
  groups(): { names: string[]; release: () => void }[];
  readRange(name: string, byteOffset: number, byteLength: number): Promise<Uint8Array>;
  readF32(name: string, into?: Float32Array): Promise<Float32Array>;
}

function weightSource(files: WeightFiles): WeightSource {
  if (files instanceof SafetensorsFile) {
    return {
      weightsPath: files.path,
      names: () => files.names(),
      info: (name) => files.info(name),
      fileOf: () => files.path,
      groups: () => [{ names: files.names(), release: () => files.close() }],
      readRange: (name, offset, length) => files.readRange(name, offset, length),
      readF32: (name, into) => files.readF32(name, into),
    };
  }
  return {
    weightsPath: files.weightsPath,
    names: () => files.names(),
    info: (name) => files.info(name),
    fileOf: (name) => join(files.dir, files.shardOf(name)),
    groups: () =>
      files.shards().map((shard) => ({
        names: files.namesInShard(shard),
        release: () => files.closeShard(shard),
      })),
    readRange: (name, offset, length) => files.readRange(name, offset, length),
    readF32: (name, into) => files.readF32(name, into),
  };
}

/** Every way the source's headers disagree with the schema, one sentence each. */
function schemaProblems(source: WeightSource, schema: WeightSchema): string[] {
  const problems: string[] = [];
  const declared = new Set<string>();
  const present = new Set(source.names());
  for (const spec of schema.tensors) {
    declared.add(spec.name);
    const tensor = `tensor "${spec.name}"`;
    if (!present.has(spec.name)) {
      if (spec.optional) continue;
      problems.push(
        `${source.weightsPath}: ${tensor} is missing, but ${schema.model} per ${schema.config} ` +
          `needs it (${WEIGHT_DTYPE_LIST}, shape [${spec.shape}]); the config and the weights ` +
          "disagree, or the download is incomplete",
      );
      continue;
    }
    const info = source.info(spec.name);
    const file = source.fileOf(spec.name);
    if (info.shape.join(",") !== spec.shape.join(",")) {
      problems.push(
        `${file}: ${tensor} has shape [${info.shape}] but ${schema.config} implies ` +
          `[${spec.shape}] for ${schema.model}; the config and the weights disagree`,
      );
    }
    if (!(info.dtype in GPU_DTYPE)) {
      problems.push(
        `${file}: ${tensor} is ${info.dtype}, but ${schema.model} reads it as ` +
          `${WEIGHT_DTYPE_LIST}; save the weights in one of those dtypes`,
      );
    }
  }
  for (const name of present) {
    if (!declared.has(name) && !schema.ignore?.(name)) {
      problems.push(
        `${source.fileOf(name)}: unexpected tensor "${name}": ${schema.model} per ` +
          `${schema.config} has no such tensor; the config and the weights disagree`,
      );
    }
  }
  return problems;
}

/**
 * Checks the headers of `files` against `schema` (reads no tensor data). Throws the first
 * problem, with how many more there are.
 */
export function checkWeights(files: WeightFiles, schema: WeightSchema): void {
  const problems = schemaProblems(weightSource(files), schema);
  if (problems.length === 0) return;
  const more = problems.length - 1;
  throw new Error(
    problems[0] + (more > 0 ? ` (and ${more} more problem${more > 1 ? "s" : ""})` : ""),
  );
}

/** The weights a load put on the GPU, by name. */
export class LoadedWeights {
  readonly #byName: Map<string, Tensor | Nf4Weight>;
  /** Bytes of GPU memory the weights take. */
  readonly gpuBytes: number;

  constructor(byName: Map<string, Tensor | Nf4Weight>, gpuBytes: number) {
    this.#byName = byName;
    this.gpuBytes = gpuBytes;
  }

  /** A tensor placed "f32" or "stored". */
  tensor(name: string): Tensor {
    const t = this.#byName.get(name);
    if (!(t instanceof Tensor)) throw new Error(`weights: no tensor "${name}" was loaded`);
    return t;
  }

  /** A weight placed "nf4". */
  nf4(name: string): Nf4Weight {
    const w = this.#byName.get(name);
    if (!w || w instanceof Tensor) throw new Error(`weights: no NF4 weight "${name}" was loaded`);
    return w;
  }
}

function destroyWeight(w: Tensor | Nf4Weight): void {
  if (w instanceof Tensor) w.destroy();
  else {
    w.packed.destroy();
    w.absmax.destroy();
  }
}

/**
 * Host arrays reused for every "f32" and "nf4" tensor, sized for the largest: allocating each
 * tensor's values and NF4 arrays afresh would hand gigabytes to the garbage collector over a
 * load. Safe because each upload copies the data before the next read.
 */
interface Scratch {
  values: Float32Array;
  nf4: Nf4Quantized;
}

function scratchFor(specs: WeightSpec[]): Scratch {
  const decoded = specs.filter((s) => s.placement === "f32" || s.placement === "nf4");
  const largest = Math.max(0, ...decoded.map((s) => numel(s.shape)));
  const quantized = Math.max(
    0,
    ...decoded.filter((s) => s.placement === "nf4").map((s) => numel(s.shape)),
  );
  return {
    values: new Float32Array(largest),
    nf4: {
      packed: new Uint8Array(Math.ceil(quantized / 2)),
      absmax: new Float32Array(Math.ceil(quantized / NF4_BLOCK_SIZE)),
    },
  };
}

/**
 * Streams a tensor onto the GPU in its own dtype, in pieces of whole rows (the first dimension)
 * of about `targetChunkBytes`, so the host never holds all of it.
 */
async function uploadStored(
  gpu: Gpu,
  source: WeightSource,
  spec: WeightSpec,
  targetChunkBytes: number,
): Promise<Tensor> {
  const dtype = GPU_DTYPE[source.info(spec.name).dtype]!;
  const t = gpu.empty(spec.shape, dtype, spec.name);
  const rowBytes = numel(spec.shape.slice(1)) * dtypeBytes(dtype);
  let rows = Math.max(1, Math.floor(targetChunkBytes / rowBytes));
  // Queue writes need 4-byte aligned offsets: 2-byte rows of odd width go in pairs.
  if (rowBytes % 4 !== 0 && rows % 2 !== 0) rows++;
  const chunkBytes = rows * rowBytes;
  const totalBytes = numel(spec.shape) * dtypeBytes(dtype);
  for (let offset = 0; offset < totalBytes; offset += chunkBytes) {
    const length = Math.min(chunkBytes, totalBytes - offset);
    gpu.write(t, await source.readRange(spec.name, offset, length), offset);
  }
  return t;
}

async function uploadWeight(
  gpu: Gpu,
  source: WeightSource,
  spec: WeightSpec,
  scratch: Scratch,
  options: LoadWeightsOptions,
): Promise<Tensor | Nf4Weight> {
  if (spec.placement === "stored") {
    const chunkBytes = options.storedChunkBytes ?? DEFAULT_STORED_CHUNK_BYTES;
    return await uploadStored(gpu, source, spec, chunkBytes);
  }
  const values = await source.readF32(spec.name, scratch.values);
  if (spec.placement === "f32") return gpu.upload(values, spec.shape, "f32", spec.name);
  const [out, inFeatures] = spec.shape;
  const q = nf4Quantize(values, NF4_BLOCK_SIZE, scratch.nf4);
  return uploadNf4Weight(gpu, q, out, inFeatures, spec.name, NF4_BLOCK_SIZE, options.nf4Decode);
}

function gpuBytesOf(w: Tensor | Nf4Weight): number {
  return w instanceof Tensor ? w.byteLength : w.packed.byteLength + w.absmax.byteLength;
}

/**
 * Checks `files` against `schema` (see `checkWeights`), then uploads every tensor that is not
 * "unread", one at a time in file order, releasing each shard after its last tensor. On an
 * error midway, what was uploaded is destroyed.
 */
export async function loadWeights(
  gpu: Gpu,
  files: WeightFiles,
  schema: WeightSchema,
  options: LoadWeightsOptions = {},
): Promise<LoadedWeights> {
  checkWeights(files, schema);
  const source = weightSource(files);
  const present = new Set(source.names());
  const toRead = new Map(
    schema.tensors
      .filter((s) => s.placement !== "unread" && present.has(s.name))
      .map((s) => [s.name, s]),
  );
  const scratch = scratchFor([...toRead.values()]);
  const byName = new Map<string, Tensor | Nf4Weight>();
  let gpuBytes = 0;
  try {
    for (const { names, release } of source.groups()) {
      for (const name of names) {
        const spec = toRead.get(name);
        if (!spec) continue;
        const w = await uploadWeight(gpu, source, spec, scratch, options);
        byName.set(name, w);
        gpuBytes += gpuBytesOf(w);
        options.onTensor?.(name, byName.size, toRead.size);
      }
      release();
    }
  } catch (error) {
    for (const w of byName.values()) destroyWeight(w);
    throw error;
  }
  return new LoadedWeights(byName, gpuBytes);
}
