/**
 * Readers for the text formats: one caption per line (`lines`), JSON Lines, CSV, TSV, and
 * Hugging Face ImageFolder metadata (`metadata.jsonl` / `metadata.csv` beside the images).
 * Files are streamed in batches of lines, never read whole, and inflated on the fly when gzip.
 */

import { posix } from "node:path";
import {
  type CaptionCollector,
  type CaptionPick,
  type CaptionSelection,
  captionText,
  DataError,
  pickValues,
  resolvePick,
} from "./collect.ts";
import { CsvParser, HeaderKeyed, tsvRecord } from "./delimited.ts";
import { readTextLines, type TextLine } from "./lines.ts";

/**
 * A file to read: `path` to open; `rel`, the id prefix, its path relative to the data root as
 * uncompressed (`a.jsonl` for `a.jsonl.gz`).
 */
export interface SourceFile {
  path: string;
  rel: string;
}

export type RecordSyntax = "jsonl" | "csv" | "tsv";

interface LineRecord {
  line: number;
  record: Record<string, unknown>;
}

function kindOf(value: unknown): string {
  if (value === null) return "null";
  return Array.isArray(value) ? "a list" : `a ${typeof value}`;
}

/** JSON Lines: one JSON object per line; blank lines are not records. */
function jsonlRecord({ line, text }: TextLine, path: string): LineRecord | undefined {
  const source = text.trim();
  if (source === "") return undefined;
  let value: unknown;
  try {
    value = JSON.parse(source);
  } catch (error) {
    throw new DataError(
      `${path}:${line}: not valid JSON (${(error as Error).message}). ` +
        `Fix: a .jsonl file holds one complete JSON object per line.`,
    );
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new DataError(
      `${path}:${line}: expected a JSON object, found ${kindOf(value)}. ` +
        `Fix: write each line as {"caption": "..."}.`,
    );
  }
  return { line, record: value as Record<string, unknown> };
}

/** The records of a file, in batches. */
async function* recordBatches(path: string, syntax: RecordSyntax): AsyncGenerator<LineRecord[]> {
  const csv = syntax === "csv" ? new CsvParser(path) : undefined;
  const keyed = new HeaderKeyed(path, syntax === "csv" ? "comma" : "tab");
  for await (const lines of readTextLines(path)) {
    const batch: LineRecord[] = [];
    for (const line of lines) {
      if (syntax === "jsonl") {
        const parsed = jsonlRecord(line, path);
        if (parsed) batch.push(parsed);
        continue;
      }
      const fields = csv ? csv.push(line) : tsvRecord(line);
      const record = fields && keyed.push(fields);
      if (record) batch.push({ line: fields.line, record });
    }
    yield batch;
  }
  csv?.end();
}

/**
 * Adds the captions of every record. The caption field is resolved on the first record, so a
 * later record without it is an error that names its line.
 */
async function collectRecords(
  file: SourceFile,
  syntax: RecordSyntax,
  selection: CaptionSelection,
  collector: CaptionCollector,
  idOf: (line: number, record: Record<string, unknown>, where: string) => string,
): Promise<void> {
  let pick: CaptionPick | undefined;
  for await (const batch of recordBatches(file.path, syntax)) {
    for (const { line, record } of batch) {
      const where = `${file.path}:${line}`;
      pick ??= resolvePick(Object.keys(record), selection, where, collector);
      const id = idOf(line, record, where);
      for (const { field, suffix, value } of pickValues(record, pick, where)) {
        collector.add(file.path, id + suffix, captionText(value, field, where));
      }
    }
  }
}

/** Every line is a caption; blank lines count as skipped empty captions. Ids: `rel:line`. */
export async function readLinesFile(file: SourceFile, collector: CaptionCollector): Promise<void> {
  for await (const lines of readTextLines(file.path)) {
    for (const { line, text } of lines) collector.add(file.path, `${file.rel}:${line}`, text);
  }
}

/** JSONL, CSV or TSV with a caption field. Ids: `rel:line` (the line the record starts on). */
export function readRecordFile(
  file: SourceFile,
  syntax: RecordSyntax,
  selection: CaptionSelection,
  collector: CaptionCollector,
): Promise<void> {
  return collectRecords(file, syntax, selection, collector, (line) => `${file.rel}:${line}`);
}

/**
 * Hugging Face ImageFolder metadata: each record names its image in `file_name`, relative to
 * the metadata file's folder. Ids: the image path relative to the data root. Images are not
 * opened, nor checked to exist.
 */
export function readImageFolderMetadata(
  file: SourceFile,
  selection: CaptionSelection,
  collector: CaptionCollector,
): Promise<void> {
  const syntax = file.rel.toLowerCase().endsWith(".csv") ? "csv" : "jsonl";
  const folder = posix.dirname(file.rel);
  return collectRecords(file, syntax, selection, collector, (_line, record, where) => {
    const name = record["file_name"];
    if (typeof name !== "string" || name === "") {
      throw new DataError(
        `${where}: ImageFolder metadata needs a "file_name" naming the image, found ` +
          `${name === undefined ? "no such field" : kindOf(name)}. Fix: add "file_name", or ` +
          `read the file as plain ${syntax} with --format ${syntax}.`,
      );
    }
    return posix.join(folder, name);
  });
}
