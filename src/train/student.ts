/**
 * A trained student ready to encode prompts: the NF4 Qwen3, its tokenizer, and the adapter
 * (LoRA + resampler + prompt settings) that training wrote.
 */
import type { Gpu } from "../gpu/device.ts";
import { ModelFolder } from "../io/hf.ts";
import { loadQwenTokenizer, type QwenTokenizer } from "../text/qwen_tokenizer.ts";
import { destroyAdapter, loadAdapter, readDistillConfig, type TrainedAdapter } from "./adapter.ts";
import { lengthSortedBatches } from "./batching.ts";
import { studentForward } from "./step.ts";
import {
  destroyQwen3Weights,
  loadQwen3Weights,
  qwen3Config,
  type Qwen3Weights,
} from "../models/qwen3_weights.ts";

/** A loaded student: everything `encodePrompts` needs; free it with `destroyStudent`. */
export interface Student {
  /** The frozen base model, NF4-quantized on the GPU. */
  qwen: Qwen3Weights;
  /** The trained LoRA, resampler and prompt settings. */
  adapter: TrainedAdapter;
  /** The base model's tokenizer, used with the adapter's prompt settings. */
  tokenizer: QwenTokenizer;
}

/** Optional callbacks for `loadStudent`. */
export interface LoadStudentOptions {
  /** Called as each base-model tensor reaches the GPU. */
  onTensor?: (name: string, done: number, total: number) => void;
}

/** Loads a Qwen3 folder (quantized to NF4 as it streams in) and a trained adapter folder. */
export async function loadStudent(
  gpu: Gpu,
  qwenDir: string,
  adapterDir: string,
  options: LoadStudentOptions = {},
): Promise<Student> {
  const folder = await ModelFolder.open(qwenDir);
  try {
    const tokenizer = await loadQwenTokenizer(qwenDir);
    // Checking the adapter against the config first fails fast, before gigabytes are read.
    await readDistillConfig(adapterDir, qwen3Config(folder));
    const qwen = await loadQwen3Weights(gpu, folder, { onTensor: options.onTensor });
    const adapter = await loadAdapter(gpu, adapterDir, qwen.config);
    return { qwen, adapter, tokenizer };
  } finally {
    folder.close();
  }
}

/** Frees the student's GPU memory (base weights and adapter); the `Gpu` stays usable. */
export function destroyStudent(student: Student): void {
  destroyQwen3Weights(student.qwen);
  destroyAdapter(student.adapter);
}

/** SDXL conditioning for a batch of prompts, as diffusers' pipeline takes it. */
export interface Conditioning {
  /** [batch, 77, 2048] */
  promptEmbeds: Float32Array;
  /** [batch, 1280] */
  pooled: Float32Array;
  /** Number of prompts. */
  batch: number;
  /** Tokens per prompt embedding (the resampler's queries; 77 for SDXL). */
  seqLen: number;
  /** Features per token of `promptEmbeds` (2048 for SDXL). */
  seqDim: number;
  /** Features of `pooled` (1280 for SDXL). */
  pooledDim: number;
  /** Student tokens per prompt (after the template) and whether it was cut to the limit. */
  tokenCounts: number[];
  /** Per prompt: it had more tokens than the adapter's limit and was cut. */
  truncated: boolean[];
}

/**
 * Encodes prompts with the student: tokens (in the adapter's prompt mode and limit) ->
 * NF4 Qwen3 + LoRA -> resampler. Processes `batchSize` prompts per GPU pass, each pass made of
 * prompts of similar token length (padded only to that pass's longest), and returns the rows in
 * the order of `prompts`. Padding does not change a row (attention masks it), only the work.
 */
export async function encodePrompts(
  gpu: Gpu,
  student: Student,
  prompts: readonly string[],
  batchSize = 8,
): Promise<Conditioning> {
  const { resampler, lora, config } = student.adapter;
  const c = resampler.config;
  const seqRow = c.numQueries * c.dimSeq;
  // Tokenized once: the lengths choose the passes, and each pass's ids are cut from these rows.
  const all = student.tokenizer.encodeBatch(prompts, {
    mode: config.prompt.mode,
    maxTokens: config.prompt.maxTokens,
  });
  const out: Conditioning = {
    promptEmbeds: new Float32Array(prompts.length * seqRow),
    pooled: new Float32Array(prompts.length * c.dimPooled),
    batch: prompts.length,
    seqLen: c.numQueries,
    seqDim: c.dimSeq,
    pooledDim: c.dimPooled,
    tokenCounts: all.lengths,
    truncated: all.truncated,
  };
  for (const rows of lengthSortedBatches(all.lengths, batchSize)) {
    const lengths = rows.map((row) => all.lengths[row]);
    const seqLen = Math.max(...lengths);
    const ids = new Int32Array(rows.length * seqLen).fill(student.tokenizer.padId);
    rows.forEach((row, b) => {
      ids.set(all.ids.subarray(row * all.T, row * all.T + lengths[b]), b * seqLen);
    });
    const tokens = { ids, lengths, batch: rows.length, seqLen };
    const { seq, pooled } = studentForward(gpu, { qwen: student.qwen, lora, resampler }, tokens);
    const [s, p] = (await gpu.readAll([seq, pooled])) as Float32Array[];
    seq.destroy();
    pooled.destroy();
    rows.forEach((row, b) => {
      out.promptEmbeds.set(s.subarray(b * seqRow, (b + 1) * seqRow), row * seqRow);
      out.pooled.set(p.subarray(b * c.dimPooled, (b + 1) * c.dimPooled), row * c.dimPooled);
    });
  }
  return out;
}
