import { UsageError } from "../util/usage_error.ts";
import { decodeUtf8 } from "./collect.ts";

/** Reads a prompts file: one prompt per line, strict UTF-8, no blank lines. */
export async function readPromptsFile(path: string): Promise<string[]> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (err) {
    throw new UsageError(`--prompts ${path}: cannot read it (${(err as Error).message})`);
  }
  const text = decodeUtf8(bytes, (line) => `${path}:${line}`);
  const lines = text.replace(/^\uFEFF/, "").split(/\r?\n/);
  if (lines.at(-1) === "") lines.pop();
  const blank = lines.flatMap((l, i) => (l.trim() === "" ? [i + 1] : []));
  if (blank.length) {
    throw new UsageError(
      `${path}: line${blank.length > 1 ? "s" : ""} ${blank.slice(0, 10).join(", ")} ` +
        `${blank.length > 1 ? "are" : "is"} blank; remove ${blank.length > 1 ? "them" : "it"} ` +
        `(to encode an empty prompt, pass "" as an argument)`,
    );
  }
  if (lines.length === 0) throw new UsageError(`${path}: no prompts in the file`);
  return lines;
}
