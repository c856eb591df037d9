/**
 * Batch encoding to a file: a trained student's conditioning for a list of prompts, written as
 * diffusers' SDXL pipeline takes it (safetensors or JSON), with the metadata that says which
 * adapter and prompt settings made it. `encode` and `serve` both write this format.
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import { Gpu } from "../gpu/device.ts";
import { writeFileAtomic } from "../io/atomic.ts";
import { prepareOutputFile } from "../io/output_path.ts";
import { f32ArrayToF16 } from "../io/dtype.ts";
import { safetensorsBytes } from "../io/safetensors.ts";
import { RESAMPLER_WEIGHTS_FILE } from "../models/resampler_config.ts";
import {
  type Conditioning,
  destroyStudent,
  encodePrompts,
  loadStudent,
  type Student,
} from "./student.ts";
import { DISTILL_CONFIG_FILE } from "./adapter.ts";

/** What `runEncode` encodes and where it writes it; mirrors the `encode` command's flags. */
export interface EncodeOptions {
  /** The Qwen3 model folder the adapter was trained on (Hugging Face layout). */
  qwen: string;
  /** The adapter folder training wrote (`<out>/adapter`). */
  adapter: string;
  /** Prompts to encode, one output row each, in order. */
  prompts: string[];
  /**
   * Negative prompt, encoded once and repeated for every row; absent: zero tensors, as
   * diffusers' SDXL pipeline uses by default.
   */
  negative?: string;
  /** Output file path; missing folders are made. */
  out: string;
  /** Replace `out` if it exists (default: refuse, before anything is loaded). */
  force?: boolean;
  /** Output file format. */
  format: "safetensors" | "json";
  /** Element type of the safetensors tensors (JSON always holds the f32 values). */
  dtype: "f16" | "f32";
  /** Prompts per GPU pass: larger is faster and takes more GPU memory. */
  batchSize: number;
}

/** A short id of an adapter: its config and the headers and sizes of its weight files. */
export async function adapterId(dir: string): Promise<string> {
  const hash = createHash("sha256");
  hash.update(await Deno.readFile(join(dir, DISTILL_CONFIG_FILE)));
  for (const file of ["adapter_model.safetensors", RESAMPLER_WEIGHTS_FILE]) {
    const path = join(dir, file);
    const f = await Deno.open(path);
    try {
      const head = new Uint8Array(8);
      await f.read(head);
      const headerLength = Number(new DataView(head.buffer).getBigUint64(0, true));
      const header = new Uint8Array(Math.min(headerLength, 1 << 24));
      await f.read(header);
      hash.update(header);
      hash.update(String((await f.stat()).size));
    } finally {
      f.close();
    }
  }
  return hash.digest("hex").slice(0, 16);
}

/** What `runEncode` wrote: the conditioning and the file's metadata. */
export interface EncodedFile {
  /** The prompts' conditioning. */
  positive: Conditioning;
  /** The negative prompt's conditioning (one row), or null when the negative tensors are zeros. */
  negative: Conditioning | null;
  /** String metadata stored with the tensors: adapter id, prompt mode, token counts, truncation. */
  metadata: Record<string, string>;
}

function tensorsOf(e: EncodedFile) {
  const p = e.positive;
  const repeat = (src: Float32Array | undefined, rowSize: number) => {
    const out = new Float32Array(p.batch * rowSize);
    if (src) { for (let b = 0; b < p.batch; b++) out.set(src.subarray(0, rowSize), b * rowSize); }
    return out;
  };
  const seqRow = p.seqLen * p.seqDim;
  return [
    { name: "prompt_embeds", shape: [p.batch, p.seqLen, p.seqDim], data: p.promptEmbeds },
    { name: "pooled_prompt_embeds", shape: [p.batch, p.pooledDim], data: p.pooled },
    {
      name: "negative_prompt_embeds",
      shape: [p.batch, p.seqLen, p.seqDim],
      data: repeat(e.negative?.promptEmbeds, seqRow),
    },
    {
      name: "negative_pooled_prompt_embeds",
      shape: [p.batch, p.pooledDim],
      data: repeat(e.negative?.pooled, p.pooledDim),
    },
  ];
}

/** The file's bytes: safetensors (F16 or F32 tensors) or JSON; `where` names it in errors. */
export function conditioningBytes(
  where: string,
  encoded: EncodedFile,
  format: "safetensors" | "json",
  dtype: "f16" | "f32",
): Uint8Array<ArrayBuffer> {
  const tensors = tensorsOf(encoded);
  if (format === "json") {
    const json = {
      format: "distill-conditioning",
      metadata: encoded.metadata,
      tensors: Object.fromEntries(
        tensors.map((t) => [t.name, { shape: t.shape, data: Array.from(t.data) }]),
      ),
    };
    return new TextEncoder().encode(JSON.stringify(json));
  }
  return safetensorsBytes(
    where,
    tensors.map((t) => ({
      name: t.name,
      shape: t.shape,
      dtype: dtype === "f16" ? "F16" : "F32",
      data: dtype === "f16" ? f32ArrayToF16(t.data) : t.data,
    })),
    encoded.metadata,
  );
}

/** Writes the conditioning as safetensors (F16 or F32) or as JSON, atomically. */
export async function writeConditioning(
  path: string,
  encoded: EncodedFile,
  format: "safetensors" | "json",
  dtype: "f16" | "f32",
): Promise<void> {
  await writeFileAtomic(path, conditioningBytes(path, encoded, format, dtype));
}

/**
 * The conditioning with the metadata an output file carries: adapter id, prompt settings,
 * the prompts with their token counts and truncation, and how the negative tensors were made.
 */
export function encodedFile(
  student: Student,
  id: string,
  prompts: readonly string[],
  negativePrompt: string | undefined,
  positive: Conditioning,
  negative: Conditioning | null,
): EncodedFile {
  const metadata: Record<string, string> = {
    format: "distill-conditioning",
    adapter_id: id,
    base_model: student.adapter.config.baseModel.name,
    prompt_mode: student.adapter.config.prompt.mode,
    max_tokens: String(student.adapter.config.prompt.maxTokens),
    prompts: JSON.stringify(prompts),
    token_counts: JSON.stringify(positive.tokenCounts),
    truncated: JSON.stringify(positive.truncated),
    negative_prompt: negativePrompt === undefined ? "" : negativePrompt,
    negative: negativePrompt === undefined ? "zeros" : "encoded",
  };
  return { positive, negative, metadata };
}

/** Encodes `options.prompts` (and the negative prompt) and writes the output file. */
export async function runEncode(
  options: EncodeOptions,
  log: (line: string) => void = (line) => console.error(line),
): Promise<EncodedFile> {
  await prepareOutputFile(options.out, { force: options.force });
  const gpu = await Gpu.create();
  let student: Student | undefined;
  try {
    student = await loadStudent(gpu, options.qwen, options.adapter);
    const positive = await encodePrompts(gpu, student, options.prompts, options.batchSize);
    const negative = options.negative === undefined
      ? null
      : await encodePrompts(gpu, student, [options.negative], 1);
    const limit = student.adapter.config.prompt.maxTokens;
    positive.truncated.forEach((cut, i) => {
      if (cut) {
        log(`encode: warning: prompt ${i + 1} is longer than ${limit} tokens; cut to ${limit}`);
      }
    });
    if (negative?.truncated[0]) {
      log(`encode: warning: the negative prompt was cut to ${limit} tokens`);
    }
    const id = await adapterId(options.adapter);
    const encoded = encodedFile(student, id, options.prompts, options.negative, positive, negative);
    await writeConditioning(options.out, encoded, options.format, options.dtype);
    log(`encode: wrote ${options.prompts.length} prompt(s) to ${options.out}`);
    return encoded;
  } finally {
    if (student) destroyStudent(student);
    gpu.destroy();
  }
}
