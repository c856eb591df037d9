/** JSON object files (model configs, shard indexes, tokenizer files) with errors naming the file. */

/** A JSON object as parsed from a file. */
export type JsonObject = Record<string, unknown>;

/**
 * Parses `text`, read from `path`, as a JSON object; `what` says what the file is (e.g. "the
 * model config"), for the error.
 */
export function parseJsonObject(text: string, path: string, what: string): JsonObject {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new Error(`${path}: ${what} is not valid JSON (${(error as Error).message})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Error(`${path}: ${what} must be a JSON object`);
  }
  return value as JsonObject;
}

/** Reads the JSON object file `path` (see `parseJsonObject`). */
export async function readJsonObject(path: string, what: string): Promise<JsonObject> {
  return parseJsonObject(await Deno.readTextFile(path), path, what);
}
