/**
 * The SDXL teacher (docs/numerics.md §2): both CLIP text encoders and tokenizers of a diffusers SDXL
 * folder, as the target cache's `Teacher`. Per caption it gives
 * `prompt_embeds` = concat(penultimate of text_encoder/, penultimate of text_encoder_2/) on
 * the feature axis ([77, 768 + 1280]) and `pooled` = text_encoder_2/'s projected pooled
 * vector ([1280]).
 */
import { join, relative } from "node:path";
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { ModelFolder } from "../io/hf.ts";
import { concatLastAxis } from "../ops/layout.ts";
import { sha256File } from "../util/hash.ts";
import type { Teacher } from "./teacher.ts";
import {
  CLIP_SEQUENCE_LENGTH,
  type ClipTokenizer,
  loadClipTokenizer,
} from "../text/clip_tokenizer.ts";
import {
  clipTextConfig,
  clipTextForward,
  type ClipTextModel,
  destroyClipTextModel,
  loadClipTextModel,
} from "./clip.ts";

/** The four parts of a diffusers SDXL folder the teacher reads, and what each holds. */
export const SDXL_TEACHER_PARTS = {
  text_encoder: "CLIP ViT-L/14 text encoder (config.json, model.safetensors)",
  text_encoder_2:
    "OpenCLIP ViT-bigG/14 text encoder with projection (config.json, model.safetensors)",
  tokenizer: "CLIP tokenizer of text_encoder (vocab.json, merges.txt)",
  tokenizer_2: "CLIP tokenizer of text_encoder_2 (vocab.json, merges.txt)",
} as const;

/** Tokenizer files that change the ids when present. */
const TOKENIZER_FILES = [
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "tokenizer_config.json",
];

/** Recorded in the identity: a teacher computing in another precision is another teacher. */
const COMPUTE_PRECISION = "f32 activations and accumulation; weights as stored in the files";

/** SDXL's two CLIP text encoders on the GPU as a `Teacher`, plus what the tests and CLI use. */
export interface SdxlTeacher extends Teacher {
  /** Bytes of GPU memory both encoders' weights take. */
  gpuBytes: number;
  /** The tokenizers of text_encoder/ (`l`, CLIP ViT-L) and text_encoder_2/ (`g`, OpenCLIP bigG). */
  readonly tokenizers: { l: ClipTokenizer; g: ClipTokenizer };
  /**
   * The targets of already tokenized rows: `idsL` for text_encoder/ and `idsG` for
   * text_encoder_2/, each [batch, 77] row-major.
   */
  encodeIds(
    idsL: ArrayLike<number>,
    idsG: ArrayLike<number>,
    batch: number,
  ): Promise<{ seq: Float32Array; pooled: Float32Array }>;
  /** Frees the weights (the Gpu stays usable). */
  destroy(): void;
}

/** Optional callbacks for `loadSdxlTeacher`. */
export interface LoadSdxlTeacherOptions {
  /** Called after each tensor is on the GPU, with its component folder name. */
  onTensor?: (part: string, name: string, done: number, total: number) => void;
}

async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

function sdxlLayoutHelp(): string {
  const parts = Object.entries(SDXL_TEACHER_PARTS).map(([name, what]) => `${name}/ (${what})`);
  return `A diffusers SDXL folder (e.g. stabilityai/stable-diffusion-xl-base-1.0) holds ` +
    `${parts.join(", ")}, besides unet/, vae/ and scheduler/ which distill does not read`;
}

/** Fails naming every part the folder lacks and what an SDXL folder holds. */
async function checkSdxlFolder(dir: string): Promise<void> {
  if (!(await isDirectory(dir))) {
    throw new Error(`SDXL folder ${dir} not found (or not a folder). ${sdxlLayoutHelp()}.`);
  }
  const missing: string[] = [];
  for (const part of Object.keys(SDXL_TEACHER_PARTS)) {
    if (!(await isDirectory(join(dir, part)))) missing.push(`${part}/`);
  }
  if (missing.length === 0) return;
  const componentHint = (await isFile(join(dir, "config.json")))
    ? ` ${dir} looks like a single model folder: pass the pipeline folder above it (the one ` +
      `with model_index.json).`
    : "";
  throw new Error(
    `${dir} has no ${missing.join(", ")}: not a complete SDXL pipeline folder. ` +
      `${sdxlLayoutHelp()}.${componentHint} Fix: download the missing folders (the *.safetensors ` +
      `weights, config.json and tokenizer files are enough).`,
  );
}

/** "model", or diffusers' "model.fp16" variant when that is the only weights file there. */
async function weightsStem(dir: string): Promise<string> {
  for (const stem of ["model", "model.fp16"]) {
    for (const file of [`${stem}.safetensors`, `${stem}.safetensors.index.json`]) {
      if (await isFile(join(dir, file))) return stem;
    }
  }
  return "model";
}

async function openEncoderFolder(dir: string): Promise<ModelFolder> {
  return await ModelFolder.open(dir, { weightsName: await weightsStem(dir) });
}

/**
 * "<sha256>:<bytes>" of every file the targets depend on, keyed by its path relative to the
 * SDXL folder. Whole files are hashed (not only safetensors headers): a fine-tuned encoder has
 * the same header as the base one.
 */
async function teacherIdentity(
  dir: string,
  encoders: Record<string, ModelFolder>,
): Promise<Record<string, string>> {
  const files: string[] = [];
  for (const [part, folder] of Object.entries(encoders)) {
    files.push(join(part, "config.json"));
    const weights = relative(folder.dir, folder.weightsPath);
    files.push(join(part, weights));
    if (weights.endsWith(".index.json")) {
      for (const shard of folder.shards()) files.push(join(part, shard));
    }
  }
  for (const part of ["tokenizer", "tokenizer_2"]) {
    for (const name of TOKENIZER_FILES) {
      if (await isFile(join(dir, part, name))) files.push(join(part, name));
    }
  }
  const identity: Record<string, string> = { compute: COMPUTE_PRECISION };
  for (const file of files) {
    const path = join(dir, file);
    const { size } = await Deno.stat(path);
    identity[file.replaceAll("\\", "/")] = `${await sha256File(path)}:${size}`;
  }
  return identity;
}

/**
 * Loads the teacher of the SDXL diffusers folder `sdxlDir`: checks that every part is there,
 * reads both tokenizers, streams both encoders onto `gpu` (text_encoder/ without its last
 * layer, which SDXL never uses) and hashes every file it read for the cache's identity.
 */
export async function loadSdxlTeacher(
  gpu: Gpu,
  sdxlDir: string,
  options: LoadSdxlTeacherOptions = {},
): Promise<SdxlTeacher> {
  await checkSdxlFolder(sdxlDir);
  const [tokL, tokG] = await Promise.all([
    loadClipTokenizer(join(sdxlDir, "tokenizer")),
    loadClipTokenizer(join(sdxlDir, "tokenizer_2")),
  ]);
  const folderL = await openEncoderFolder(join(sdxlDir, "text_encoder"));
  const folderG = await openEncoderFolder(join(sdxlDir, "text_encoder_2"));
  const onTensor = (part: string) => (name: string, done: number, total: number) =>
    options.onTensor?.(part, name, done, total);
  let modelL: ClipTextModel | undefined;
  let modelG: ClipTextModel | undefined;
  let identity: Record<string, string>;
  try {
    for (const folder of [folderL, folderG]) {
      const { maxPositions } = clipTextConfig(folder);
      if (maxPositions < CLIP_SEQUENCE_LENGTH) {
        throw new Error(
          `${folder.dir}/config.json: max_position_embeddings ${maxPositions} is below the ` +
            `${CLIP_SEQUENCE_LENGTH} tokens SDXL's tokenizers produce`,
        );
      }
    }
    modelL = await loadClipTextModel(gpu, folderL, { onTensor: onTensor("text_encoder") });
    modelG = await loadClipTextModel(gpu, folderG, {
      pooled: true,
      onTensor: onTensor("text_encoder_2"),
    });
    // After loading, so a broken folder fails before gigabytes are hashed.
    identity = await teacherIdentity(sdxlDir, { text_encoder: folderL, text_encoder_2: folderG });
  } catch (error) {
    if (modelL) destroyClipTextModel(modelL);
    if (modelG) destroyClipTextModel(modelG);
    throw error;
  } finally {
    folderL.close();
    folderG.close();
  }
  const l = modelL;
  const g = modelG;
  const seqLen = CLIP_SEQUENCE_LENGTH;
  const seqDim = l.config.hiddenSize + g.config.hiddenSize;
  const pooledDim = g.pooledDim!;

  const encodeIds = async (idsL: ArrayLike<number>, idsG: ArrayLike<number>, batch: number) => {
    if (batch === 0) return { seq: new Float32Array(0), pooled: new Float32Array(0) };
    const outL = clipTextForward(gpu, l, idsL, batch, seqLen);
    const outG = clipTextForward(gpu, g, idsG, batch, seqLen);
    const seq = concatLastAxis(gpu, outL.penultimate, outG.penultimate);
    outL.penultimate.destroy();
    outG.penultimate.destroy();
    const pooled = outG.pooled as Tensor;
    try {
      const [seqHost, pooledHost] = await gpu.readAll([seq, pooled]);
      return { seq: seqHost as Float32Array, pooled: pooledHost as Float32Array };
    } finally {
      seq.destroy();
      pooled.destroy();
    }
  };

  return {
    identity,
    tokenizer: {
      sequenceLength: seqLen,
      normalization: "NFC, whitespace runs to one space, strip, lower-case",
      "tokenizer.bos": tokL.bosId,
      "tokenizer.eos": tokL.eosId,
      "tokenizer.pad": tokL.padId,
      "tokenizer_2.bos": tokG.bosId,
      "tokenizer_2.eos": tokG.eosId,
      "tokenizer_2.pad": tokG.padId,
    },
    seqLen,
    seqDim,
    pooledDim,
    gpuBytes: l.gpuBytes + g.gpuBytes,
    tokenizers: { l: tokL, g: tokG },
    encodeIds,
    encode(captions: string[]) {
      const idsL = tokL.encodeBatch(captions).ids;
      const idsG = tokG.encodeBatch(captions).ids;
      return encodeIds(idsL, idsG, captions.length);
    },
    destroy() {
      destroyClipTextModel(l);
      destroyClipTextModel(g);
    },
  };
}
