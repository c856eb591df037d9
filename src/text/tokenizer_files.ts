/**
 * Reading Hugging Face tokenizer folders (`vocab.json`, `merges.txt`,
 * `tokenizer.json`, `tokenizer_config.json`, ...) with errors that name the
 * folder, the file and what the folder should be.
 */
import { join } from "node:path";
import { type JsonObject, parseJsonObject } from "../io/json.ts";

export type { JsonObject };

/** Reads a required text file of a tokenizer folder; `hint` says what the folder should hold. */
export async function readRequiredText(
  folder: string,
  file: string,
  hint: string,
): Promise<string> {
  const text = await readOptionalText(folder, file);
  if (text === undefined) throw new Error(`tokenizer folder "${folder}" has no ${file} (${hint})`);
  return text;
}

/** Reads an optional text file; `undefined` when the file does not exist. */
export async function readOptionalText(folder: string, file: string): Promise<string | undefined> {
  const path = join(folder, file);
  try {
    return await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    if (err instanceof Deno.errors.IsADirectory) {
      throw new Error(`"${path}" is a directory, expected the file ${file}`);
    }
    throw err;
  }
}

const TOKENIZER_FILE = "the tokenizer file";

/** Reads a required JSON object file of a tokenizer folder. */
export async function readRequiredJsonObject(
  folder: string,
  file: string,
  hint: string,
): Promise<JsonObject> {
  return parseJsonObject(
    await readRequiredText(folder, file, hint),
    join(folder, file),
    TOKENIZER_FILE,
  );
}

/** Reads an optional JSON object file; `undefined` when the file does not exist. */
export async function readOptionalJsonObject(
  folder: string,
  file: string,
): Promise<JsonObject | undefined> {
  const text = await readOptionalText(folder, file);
  return text === undefined ? undefined : parseJsonObject(text, join(folder, file), TOKENIZER_FILE);
}

/**
 * The text of a special-token entry in `tokenizer_config.json` /
 * `special_tokens_map.json`: a plain string or an AddedToken object
 * (`{"content": ..., ...}`); `undefined` when absent or null. `where` names
 * the file and key for the error.
 */
export function specialTokenContent(value: unknown, where: string): string | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value === "string") return value;
  if (typeof value === "object" && typeof (value as { content?: unknown }).content === "string") {
    return (value as { content: string }).content;
  }
  throw new Error(`${where} must be a string or an object with a "content" string`);
}
