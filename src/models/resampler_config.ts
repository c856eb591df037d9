/**
 * The sizes of a Perceiver Resampler (docs/numerics.md §4) and their file form,
 * `resampler_config.json` in snake case: defaults, parsing with errors that name the key, checks.
 */
import { ATTENTION_MAX_HEAD_DIM } from "../ops/attention.ts";

export const RESAMPLER_CONFIG_FILE = "resampler_config.json";
export const RESAMPLER_WEIGHTS_FILE = "resampler.safetensors";

/** Sizes of a Perceiver Resampler (docs/numerics.md §4); `resampler_config.json` in snake_case. */
export interface ResamplerConfig {
  /** The student's hidden size. */
  dimIn: number;
  /** Width of the latents and of the projected input. */
  dim: number;
  /** Number of attention + feed-forward blocks. */
  depth: number;
  /** Attention heads per block. */
  heads: number;
  /** Features per attention head (a multiple of 4). */
  dimHead: number;
  /** Feed-forward hidden width as a multiple of `dim`. */
  ffMult: number;
  /** Learned latent queries: the tokens of the output sequence (77 for SDXL). */
  numQueries: number;
  /** Features per output token, `prompt_embeds` (2048 for SDXL). */
  dimSeq: number;
  /** Features of the pooled output, `pooled_prompt_embeds` (1280 for SDXL). */
  dimPooled: number;
  /**
   * Learned absolute positions added to the projected student states (`pos_emb`
   * [num_positions, dim]); 0: none. The student's hidden states carry no absolute position
   * (RoPE is relative), so without them a latent query cannot ask for "the i-th token", which
   * is what most of the teacher's sequence depends on. Prompts may have at most this many tokens.
   */
  numPositions: number;
  /**
   * A learned offset per output token (`seq_bias` [num_queries, dim_seq]) added to `seq`, so
   * training can start from the per-position mean of the targets (`initOutputsAtMean`).
   */
  seqBias: boolean;
}

export const RESAMPLER_DEFAULTS: Readonly<Omit<ResamplerConfig, "dimIn">> = {
  dim: 2048,
  depth: 4,
  heads: 16,
  dimHead: 128,
  ffMult: 4,
  numQueries: 77,
  dimSeq: 2048,
  dimPooled: 1280,
  numPositions: 0,
  seqBias: false,
};

type SizeField = Exclude<keyof ResamplerConfig, "numPositions" | "seqBias">;

/** JSON key of each size field, in the order they are written. */
const JSON_KEYS: ReadonlyArray<readonly [SizeField, string]> = [
  ["dimIn", "dim_in"],
  ["dim", "dim"],
  ["depth", "depth"],
  ["heads", "heads"],
  ["dimHead", "dim_head"],
  ["ffMult", "ff_mult"],
  ["numQueries", "num_queries"],
  ["dimSeq", "dim_seq"],
  ["dimPooled", "dim_pooled"],
];

/** Checks sizes the kernels can run; `where` names the file or flag the config came from. */
export function checkResamplerConfig(config: ResamplerConfig, where: string): void {
  for (const [field, key] of JSON_KEYS) {
    const value = config[field];
    if (!Number.isInteger(value) || value < 1) {
      throw new Error(`${where}: '${key}' must be a positive integer (got ${value})`);
    }
  }
  if (!Number.isInteger(config.numPositions) || config.numPositions < 0) {
    throw new Error(
      `${where}: 'num_positions' must be an integer >= 0 (got ${config.numPositions})`,
    );
  }
  if (typeof config.seqBias !== "boolean") {
    throw new Error(`${where}: 'seq_bias' must be true or false (got ${config.seqBias})`);
  }
  if (config.dimHead % 4 !== 0 || config.dimHead > ATTENTION_MAX_HEAD_DIM) {
    throw new Error(
      `${where}: 'dim_head' ${config.dimHead} must be a multiple of 4 up to ` +
        `${ATTENTION_MAX_HEAD_DIM} (what the attention kernel supports)`,
    );
  }
}

/** A config from its JSON form: missing keys take the defaults, except the required dim_in. */
export function parseResamplerConfig(json: unknown, where: string): ResamplerConfig {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new Error(`${where}: expected a JSON object with the resampler's sizes`);
  }
  const fields = json as Record<string, unknown>;
  const known = new Set([...JSON_KEYS.map(([, key]) => key), "num_positions", "seq_bias"]);
  for (const key of Object.keys(fields)) {
    if (!known.has(key)) {
      throw new Error(
        `${where}: unknown key '${key}'; a resampler config has ${[...known].join(", ")}`,
      );
    }
  }
  if (fields.dim_in === undefined) {
    throw new Error(`${where}: 'dim_in' (the student's hidden size) is required`);
  }
  const config = { ...RESAMPLER_DEFAULTS } as ResamplerConfig;
  for (const [field, key] of JSON_KEYS) {
    const value = fields[key];
    if (value === undefined) continue;
    if (typeof value !== "number") {
      throw new Error(`${where}: '${key}' must be a number (got ${JSON.stringify(value)})`);
    }
    config[field] = value;
  }
  if (fields.num_positions !== undefined) {
    if (typeof fields.num_positions !== "number") {
      throw new Error(
        `${where}: 'num_positions' must be a number (got ${JSON.stringify(fields.num_positions)})`,
      );
    }
    config.numPositions = fields.num_positions;
  }
  if (fields.seq_bias !== undefined) {
    if (typeof fields.seq_bias !== "boolean") {
      throw new Error(
        `${where}: 'seq_bias' must be true or false (got ${JSON.stringify(fields.seq_bias)})`,
      );
    }
    config.seqBias = fields.seq_bias;
  }
  checkResamplerConfig(config, where);
  return config;
}

/**
 * The config in its JSON form. The optional parts are written only when used, so a resampler
 * without them has the seed's file format.
 */
export function resamplerConfigJson(config: ResamplerConfig): Record<string, number | boolean> {
  const json: Record<string, number | boolean> = Object.fromEntries(
    JSON_KEYS.map(([field, key]) => [key, config[field]]),
  );
  if (config.numPositions > 0) json.num_positions = config.numPositions;
  if (config.seqBias) json.seq_bias = true;
  return json;
}

export async function readResamplerConfig(path: string): Promise<ResamplerConfig> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new Error(
        `${path} not found: a resampler folder holds ${RESAMPLER_CONFIG_FILE} and ${RESAMPLER_WEIGHTS_FILE}`,
      );
    }
    throw err;
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new Error(`${path}: invalid JSON (${(err as Error).message})`);
  }
  return parseResamplerConfig(json, path);
}

/** Throws unless the resampler reads hidden states of the student's size. */
export function checkResamplerFitsStudent(
  config: ResamplerConfig,
  studentHiddenSize: number,
  where: string,
): void {
  if (config.dimIn !== studentHiddenSize) {
    throw new Error(
      `${where}: this resampler expects dim_in ${config.dimIn} but the student has hidden ` +
        `size ${studentHiddenSize}; use a resampler trained for this student, or start a new one`,
    );
  }
}
