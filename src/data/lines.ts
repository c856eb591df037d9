/**
 * Streams a text file as batches of lines of strict UTF-8, so caption files of any size (past
 * V8's ~512 MiB string limit) read in bounded memory and a bad byte is reported with its line.
 */

import { decodeUtf8 } from "./collect.ts";
import { fileChunks } from "./input.ts";

export interface TextLine {
  /** 1-based line number. */
  line: number;
  /** The line without its "\n"; a "\r" before it is kept (CSV keeps it inside quoted fields). */
  text: string;
}

function concat(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0];
  const all = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let at = 0;
  for (const part of parts) {
    all.set(part, at);
    at += part.length;
  }
  return all;
}

/**
 * The lines of `path` (plain or gzip, by its magic bytes) in batches, about one per chunk read.
 * A final "\n" ends the last line rather than starting an empty one.
 */
export async function* readTextLines(path: string): AsyncGenerator<TextLine[]> {
  let line = 1;
  const decode = (bytes: Uint8Array): TextLine[] => {
    let text = decodeUtf8(bytes, (k) => `${path}:${line + k - 1}`);
    if (line === 1 && text.startsWith("\uFEFF")) text = text.slice(1);
    const batch = text.split("\n").map((t, k) => ({ line: line + k, text: t }));
    line += batch.length;
    return batch;
  };
  // Bytes after the last line break read so far: the start of an unfinished line.
  const pending: Uint8Array[] = [];
  for await (const chunk of fileChunks(path)) {
    const end = chunk.lastIndexOf(0x0a);
    if (end < 0) {
      pending.push(chunk);
      continue;
    }
    yield decode(concat([...pending.splice(0), chunk.subarray(0, end)]));
    if (end + 1 < chunk.length) pending.push(chunk.subarray(end + 1));
  }
  if (pending.length) yield decode(concat(pending));
}
