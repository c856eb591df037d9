/**
 * CLIP byte-level BPE tokenizer for SDXL's `tokenizer/` and `tokenizer_2/`
 * folders (docs/numerics.md §2).
 *
 * Normalisation and the pre-tokenizer regex are done here, because docs/numerics.md's
 * regex is case-insensitive (as in openai/CLIP) while a `tokenizer.json`
 * Split pattern is not, and because cutting the text after 76 pieces keeps a
 * 100k-character caption as cheap as a short one. Each piece is then
 * byte-encoded and merged by `@huggingface/tokenizers`' BPE model (with the
 * `</w>` end-of-word suffix), which was checked to give the same ids as
 * openai/CLIP's `simple_tokenizer.py` (NFC in place of ftfy) on ~20k prompts.
 */
import { Tokenizer } from "@huggingface/tokenizers";
import {
  type JsonObject,
  readOptionalJsonObject,
  readRequiredJsonObject,
  readRequiredText,
  specialTokenContent,
} from "./tokenizer_files.ts";

/** Every CLIP sequence is this long: BOS + up to 75 tokens + EOS + padding. */
/** The real CLIP BPE files shipped with distill (SDXL's tokenizer/; MIT, OpenAI CLIP: see its SOURCES.md). */
export const CLIP_TOKENIZER_DIR = new URL("../../data/clip-tokenizer/", import.meta.url);

export const CLIP_SEQUENCE_LENGTH = 77;
/** Content tokens kept between BOS and EOS. */
export const CLIP_MAX_CONTENT_TOKENS = CLIP_SEQUENCE_LENGTH - 2;

const DEFAULT_BOS_TOKEN = "<|startoftext|>";
const DEFAULT_EOS_TOKEN = "<|endoftext|>";
const END_OF_WORD = "</w>";

/**
 * docs/numerics.md §2's pre-tokenizer. `\s` is written as `\p{White_Space}` so that it is
 * the Unicode White_Space set of Python's `regex` module (JS `\s` also
 * matches U+FEFF and misses U+0085).
 */
const CLIP_PIECE_PATTERN =
  /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\p{White_Space}\p{L}\p{N}]+/giu;
const WHITESPACE_RUN = /\p{White_Space}+/gu;

const CLIP_FOLDER_HINT =
  "expected an SDXL tokenizer/ or tokenizer_2/ folder with vocab.json and merges.txt";

/** One caption as CLIP ids. */
export interface ClipEncoding {
  /** `[BOS] + ids[:75] + [EOS]`, padded to 77 with the pad id. */
  ids: Int32Array;
  /** Number of real tokens, BOS and EOS included (2..77). */
  length: number;
  /** The caption had more than 75 tokens and was cut. */
  truncated: boolean;
}

/** A batch of captions as CLIP ids, row-major `[batchSize, 77]`. */
export interface ClipBatchEncoding {
  /** Ids of every caption, each row as `ClipEncoding.ids`. */
  ids: Int32Array;
  /** Real tokens per caption, BOS and EOS included. */
  lengths: number[];
  /** Per caption: it had more than 75 tokens and was cut. */
  truncated: boolean[];
  /** Number of captions (rows). */
  batchSize: number;
  /** Ids per row: always 77. */
  sequenceLength: number;
}

export interface ClipTokenizerOptions {
  /**
   * Pad token text, overriding the folder's config (e.g. `"!"` to build
   * SDXL's `tokenizer_2` from a `tokenizer/` folder).
   */
  padToken?: string;
}

/** The contents of a CLIP tokenizer folder. */
export interface ClipTokenizerFiles {
  /** `vocab.json`: token text -> id. */
  vocab: JsonObject;
  /** `merges.txt` text (a `#version` header line is skipped). */
  merges: string;
  specialTokensMap?: JsonObject;
  tokenizerConfig?: JsonObject;
  /** Folder or label used in error messages. */
  source: string;
}

/** NFC, whitespace runs collapsed to one space, stripped, lower-cased (docs/numerics.md §2). */
export function normalizeClipText(text: string): string {
  return text.normalize("NFC").replace(WHITESPACE_RUN, " ").trim().toLowerCase();
}

/**
 * The pre-tokenizer pieces of normalised text, stopping after `limit`
 * pieces: each piece yields at least one token, so `limit` pieces are enough
 * to fill and detect overflow of `limit - 1` tokens.
 */
function clipPieces(normalized: string, limit: number): string[] {
  const pieces: string[] = [];
  const pattern = new RegExp(CLIP_PIECE_PATTERN);
  for (let match = pattern.exec(normalized); match !== null; match = pattern.exec(normalized)) {
    pieces.push(match[0]);
    if (pieces.length === limit) break;
  }
  return pieces;
}

function parseMerges(text: string, source: string): string[] {
  const merges: string[] = [];
  for (const [index, raw] of text.split("\n").entries()) {
    const line = raw.replace(/\r$/, "");
    if (line.length === 0 || (index === 0 && line.startsWith("#version"))) continue;
    if (line.split(" ").length !== 2) {
      throw new Error(
        `${source}/merges.txt line ${index + 1} is not a merge ("left right"): ${
          JSON.stringify(line)
        }`,
      );
    }
    merges.push(line);
  }
  return merges;
}

function vocabId(vocab: Map<string, number>, token: string, source: string, role: string): number {
  const id = vocab.get(token);
  if (id === undefined) {
    throw new Error(`${source}/vocab.json has no ${role} token ${JSON.stringify(token)}`);
  }
  return id;
}

/**
 * A special token's text: `special_tokens_map.json` wins over
 * `tokenizer_config.json`, as in transformers' `from_pretrained`.
 */
function configuredToken(files: ClipTokenizerFiles, key: string): string | undefined {
  return specialTokenContent(
    files.specialTokensMap?.[key],
    `${files.source}/special_tokens_map.json "${key}"`,
  ) ??
    specialTokenContent(
      files.tokenizerConfig?.[key],
      `${files.source}/tokenizer_config.json "${key}"`,
    );
}

/**
 * CLIP's byte-level BPE tokenizer as SDXL uses it: lower-cased, 77 ids per caption with
 * BOS and EOS, padded with the folder's pad token.
 */
export class ClipTokenizer {
  /** Id of `<|startoftext|>`, first in every row. */
  readonly bosId: number;
  /** Id of `<|endoftext|>`, after the last real token. */
  readonly eosId: number;
  /** Id that fills each row after EOS. */
  readonly padId: number;
  /** Text of the pad token (`<|endoftext|>` for tokenizer/, `!` for SDXL's tokenizer_2/). */
  readonly padToken: string;
  readonly #bpe: Tokenizer;
  readonly #idToToken: string[];

  private constructor(
    bpe: Tokenizer,
    idToToken: string[],
    ids: { bos: number; eos: number; pad: number },
    padToken: string,
  ) {
    this.#bpe = bpe;
    this.#idToToken = idToToken;
    this.bosId = ids.bos;
    this.eosId = ids.eos;
    this.padId = ids.pad;
    this.padToken = padToken;
  }

  /** Builds the tokenizer from a folder's parsed files. */
  static fromFiles(files: ClipTokenizerFiles, options: ClipTokenizerOptions = {}): ClipTokenizer {
    const { source } = files;
    const vocab = new Map<string, number>();
    const idToToken: string[] = [];
    for (const [token, id] of Object.entries(files.vocab)) {
      if (!Number.isInteger(id) || (id as number) < 0) {
        throw new Error(`${source}/vocab.json maps ${JSON.stringify(token)} to ${id}, not an id`);
      }
      vocab.set(token, id as number);
      idToToken[id as number] = token;
    }
    const merges = parseMerges(files.merges, source);
    for (const merge of merges) {
      if (!vocab.has(merge.replace(" ", ""))) {
        throw new Error(
          `${source}/merges.txt merge ${
            JSON.stringify(merge)
          } makes a token that is not in vocab.json (vocab.json and merges.txt do not belong together)`,
        );
      }
    }
    const bosToken = configuredToken(files, "bos_token") ?? DEFAULT_BOS_TOKEN;
    const eosToken = configuredToken(files, "eos_token") ?? DEFAULT_EOS_TOKEN;
    const padToken = options.padToken ?? configuredToken(files, "pad_token") ?? eosToken;
    const ids = {
      bos: vocabId(vocab, bosToken, source, "bos"),
      eos: vocabId(vocab, eosToken, source, "eos"),
      pad: vocabId(vocab, padToken, source, "pad"),
    };
    const special = (id: number, content: string) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: true,
      special: true,
    });
    // The tokenizer.json that Hugging Face's CLIPTokenizerFast uses, minus its
    // normaliser and Split step (done above) and post-processor (done in encode).
    const bpe = new Tokenizer({
      version: "1.0",
      truncation: null,
      padding: null,
      added_tokens: [special(ids.bos, bosToken), special(ids.eos, eosToken)],
      normalizer: null,
      pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, use_regex: false },
      post_processor: null,
      decoder: { type: "ByteLevel", add_prefix_space: false, use_regex: false },
      model: {
        type: "BPE",
        dropout: null,
        unk_token: eosToken,
        continuing_subword_prefix: "",
        end_of_word_suffix: END_OF_WORD,
        fuse_unk: false,
        byte_fallback: false,
        vocab: files.vocab,
        merges,
      },
    }, { clean_up_tokenization_spaces: false });
    return new ClipTokenizer(bpe, idToToken, ids, padToken);
  }

  /** Tokenizes one caption to 77 ids (docs/numerics.md §2). */
  encode(text: string): ClipEncoding {
    const ids = new Int32Array(CLIP_SEQUENCE_LENGTH);
    const { length, truncated } = this.#encodeInto(text, ids, "the caption");
    return { ids, length, truncated };
  }

  /** Tokenizes captions into one row-major `[B, 77]` id array. */
  encodeBatch(texts: readonly string[]): ClipBatchEncoding {
    if (!Array.isArray(texts)) {
      throw new TypeError(
        `ClipTokenizer.encodeBatch expects an array of strings, got ${typeof texts}`,
      );
    }
    const ids = new Int32Array(texts.length * CLIP_SEQUENCE_LENGTH);
    const lengths: number[] = [];
    const truncated: boolean[] = [];
    texts.forEach((text, b) => {
      const row = ids.subarray(b * CLIP_SEQUENCE_LENGTH, (b + 1) * CLIP_SEQUENCE_LENGTH);
      const result = this.#encodeInto(text, row, `caption ${b}`);
      lengths.push(result.length);
      truncated.push(result.truncated);
    });
    return {
      ids,
      lengths,
      truncated,
      batchSize: texts.length,
      sequenceLength: CLIP_SEQUENCE_LENGTH,
    };
  }

  /**
   * Text of a CLIP id sequence: a leading BOS is skipped and decoding stops at
   * the first EOS (what follows is padding). Word ends become spaces, so
   * punctuation and digits come back space-separated ("it's" -> "it 's").
   */
  decode(ids: ArrayLike<number>): string {
    const content: number[] = [];
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (i === 0 && id === this.bosId) continue;
      if (id === this.eosId) break;
      if (this.#idToToken[id] === undefined) {
        throw new Error(`ClipTokenizer.decode: id ${id} at position ${i} is not in the vocabulary`);
      }
      content.push(id);
    }
    if (content.length === 0) return "";
    return this.#bpe.decode(content, { clean_up_tokenization_spaces: false }).trim();
  }

  #encodeInto(text: string, row: Int32Array, what: string): { length: number; truncated: boolean } {
    if (typeof text !== "string") {
      throw new TypeError(`ClipTokenizer: ${what} must be a string, got ${describe(text)}`);
    }
    const pieces = clipPieces(normalizeClipText(text), CLIP_MAX_CONTENT_TOKENS + 1);
    row[0] = this.bosId;
    let n = 0;
    let truncated = false;
    for (const piece of pieces) {
      for (const id of this.#bpe.encode(piece, { add_special_tokens: false }).ids) {
        if (n === CLIP_MAX_CONTENT_TOKENS) {
          truncated = true;
          break;
        }
        row[1 + n++] = id;
      }
      if (truncated) break;
    }
    row[1 + n] = this.eosId;
    row.fill(this.padId, 2 + n);
    return { length: n + 2, truncated };
  }
}

function describe(value: unknown): string {
  return value === null ? "null" : Array.isArray(value) ? "an array" : typeof value;
}

/**
 * Loads an SDXL `tokenizer/` or `tokenizer_2/` folder: `vocab.json` and
 * `merges.txt` (required), `special_tokens_map.json` and
 * `tokenizer_config.json` (optional; they give the BOS/EOS/pad tokens).
 */
export async function loadClipTokenizer(
  folder: string,
  options: ClipTokenizerOptions = {},
): Promise<ClipTokenizer> {
  const [vocab, merges, specialTokensMap, tokenizerConfig] = await Promise.all([
    readRequiredJsonObject(folder, "vocab.json", CLIP_FOLDER_HINT),
    readRequiredText(folder, "merges.txt", CLIP_FOLDER_HINT),
    readOptionalJsonObject(folder, "special_tokens_map.json"),
    readOptionalJsonObject(folder, "tokenizer_config.json"),
  ]);
  return ClipTokenizer.fromFiles(
    { vocab, merges, specialTokensMap, tokenizerConfig, source: folder },
    options,
  );
}
