/**
 * Random SDXL text encoders in the diffusers layout, with the real CLIP tokenizer files: for
 * the demo, tests and scale checks, where real SDXL weights are not available. Nothing they
 * produce means anything; they only have the right shapes and sane activations.
 */
import { join } from "node:path";
import { writeFileAtomic } from "../io/atomic.ts";
import { f32ToF16Bits } from "../io/dtype.ts";
import { type TensorToWrite, writeSafetensors } from "../io/safetensors.ts";
import { CLIP_TOKENIZER_DIR } from "../text/clip_tokenizer.ts";
import { Rng } from "../util/rng.ts";
import { clipWeightSchema } from "./clip.ts";

const TOKENIZER_FILES = [
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "tokenizer_config.json",
];

/** The sizes of a CLIP text encoder config; `projectionDim` adds a `text_projection`. */
export interface ClipTextShape {
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  intermediateSize: number;
  vocabSize: number;
  hiddenAct: "quick_gelu" | "gelu";
  projectionDim?: number;
}

/** SDXL base 1.0's text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (OpenCLIP ViT-bigG/14). */
export const SDXL_TEXT_ENCODERS: Record<"text_encoder" | "text_encoder_2", ClipTextShape> = {
  text_encoder: {
    hiddenSize: 768,
    numLayers: 12,
    numHeads: 12,
    intermediateSize: 3072,
    vocabSize: 49408,
    hiddenAct: "quick_gelu",
  },
  text_encoder_2: {
    hiddenSize: 1280,
    numLayers: 32,
    numHeads: 20,
    intermediateSize: 5120,
    vocabSize: 49408,
    hiddenAct: "gelu",
    projectionDim: 1280,
  },
};

/** F16 bit patterns of uniform values with mean `mean` and standard deviation `std`. */
function randomF16(rng: Rng, n: number, std: number, mean = 0): Uint16Array {
  const out = new Uint16Array(n);
  const halfWidth = std * Math.sqrt(3);
  for (let i = 0; i < n; i++) out[i] = f32ToF16Bits(mean + halfWidth * (2 * rng.next() - 1));
  return out;
}

const MAX_POSITIONS = 77;
const LAYER_NORM_EPS = 1e-5;

/**
 * The mean and std of a tensor's random values, scaled like CLIP's initialisation so that
 * activations stay in range through every layer: LayerNorm weights near 1, small biases and
 * embeddings, weight matrices 1/sqrt(input features).
 */
function initialSpread(name: string, shape: number[]): { std: number; mean: number } {
  if (name.endsWith("position_embedding.weight")) return { std: 0.01, mean: 0 };
  if (name.endsWith("token_embedding.weight") || name.endsWith(".bias")) {
    return { std: 0.02, mean: 0 };
  }
  if (name.includes("layer_norm")) return { std: 0.05, mean: 1 };
  return { std: 1 / Math.sqrt(shape[1]), mean: 0 };
}

/**
 * Writes a random CLIP text encoder (config.json and an F16 model.safetensors with Hugging
 * Face's key names, those the CLIP weight schema declares) into `dir`.
 */
export async function writeRandomClipTextEncoder(
  dir: string,
  shape: ClipTextShape,
  seed: number,
): Promise<void> {
  const rng = new Rng(seed);
  const h = shape.hiddenSize;
  const schema = clipWeightSchema({
    hiddenSize: h,
    numLayers: shape.numLayers,
    numHeads: shape.numHeads,
    headDim: h / shape.numHeads,
    intermediateSize: shape.intermediateSize,
    vocabSize: shape.vocabSize,
    maxPositions: MAX_POSITIONS,
    layerNormEps: LAYER_NORM_EPS,
    hiddenAct: shape.hiddenAct,
  }, { pooled: true, projectionDim: shape.projectionDim, configPath: "config.json" });
  const tensors: TensorToWrite[] = schema.tensors.map(({ name, shape: dims }) => {
    const { std, mean } = initialSpread(name, dims);
    return {
      name,
      dtype: "F16",
      shape: dims,
      data: randomF16(rng, dims.reduce((a, b) => a * b, 1), std, mean),
    };
  });
  const config = {
    architectures: [shape.projectionDim ? "CLIPTextModelWithProjection" : "CLIPTextModel"],
    attention_dropout: 0,
    bos_token_id: 0,
    dropout: 0,
    // The legacy value SDXL's configs carry; the teacher must not pool there.
    eos_token_id: 2,
    hidden_act: shape.hiddenAct,
    hidden_size: h,
    initializer_factor: 1,
    initializer_range: 0.02,
    intermediate_size: shape.intermediateSize,
    layer_norm_eps: LAYER_NORM_EPS,
    max_position_embeddings: MAX_POSITIONS,
    model_type: "clip_text_model",
    num_attention_heads: shape.numHeads,
    num_hidden_layers: shape.numLayers,
    pad_token_id: 1,
    projection_dim: shape.projectionDim ?? h,
    torch_dtype: "float16",
    vocab_size: shape.vocabSize,
  };
  await Deno.mkdir(dir, { recursive: true });
  await writeFileAtomic(join(dir, "config.json"), JSON.stringify(config, null, 2) + "\n");
  await writeSafetensors(join(dir, "model.safetensors"), tensors);
}

/**
 * A CLIP tokenizer folder from the real tokenizer files; `padToken` "!" makes SDXL's
 * tokenizer_2 (same vocabulary, padded with id 0).
 */
export async function writeClipTokenizerFolder(dir: string, padToken?: string): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  for (const file of TOKENIZER_FILES) {
    let text = await Deno.readTextFile(new URL(file, CLIP_TOKENIZER_DIR));
    if (padToken && (file === "special_tokens_map.json" || file === "tokenizer_config.json")) {
      text = JSON.stringify({ ...JSON.parse(text), pad_token: padToken }, null, 2) + "\n";
    }
    await writeFileAtomic(join(dir, file), text);
  }
}

/** An SDXL folder (text encoders, tokenizers) with random encoders of the given shapes. */
export async function writeRandomSdxlTeacherFolder(
  dir: string,
  shapes: Record<"text_encoder" | "text_encoder_2", ClipTextShape> = SDXL_TEXT_ENCODERS,
  seed = 1,
): Promise<void> {
  await writeRandomClipTextEncoder(join(dir, "text_encoder"), shapes.text_encoder, seed);
  await writeRandomClipTextEncoder(join(dir, "text_encoder_2"), shapes.text_encoder_2, seed + 1);
  await writeClipTokenizerFolder(join(dir, "tokenizer"));
  await writeClipTokenizerFolder(join(dir, "tokenizer_2"), "!");
}
