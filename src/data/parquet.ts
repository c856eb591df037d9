/**
 * Parquet with a text column (Hugging Face's converted datasets, LAION-style metadata), read
 * with hyparquet: only the caption column(s) are fetched from the file.
 */

import {
  asyncBufferFromFile,
  type FileMetaData,
  parquetMetadataAsync,
  parquetReadObjects,
  parquetSchema,
} from "hyparquet";
import {
  type CaptionCollector,
  type CaptionSelection,
  captionText,
  DataError,
  decodeUtf8,
  pickFields,
  pickValues,
  resolvePick,
} from "./collect.ts";
import type { SourceFile } from "./records.ts";

/** Ids: `rel:row` with `row` the 0-based row index in the file, as pandas and hyparquet count. */
export async function readParquetFile(
  file: SourceFile,
  selection: CaptionSelection,
  collector: CaptionCollector,
): Promise<void> {
  const buffer = await asyncBufferFromFile(file.path);
  const unreadable = (error: unknown) =>
    new DataError(
      `${file.path}: not a readable parquet file (${(error as Error).message}). ` +
        `Fix: check the file is complete (download it again), or pick the right --format.`,
    );
  let metadata: FileMetaData;
  try {
    metadata = await parquetMetadataAsync(buffer);
  } catch (error) {
    throw unreadable(error);
  }
  const fields = parquetSchema(metadata).children.map((child) => child.element.name);
  const pick = resolvePick(fields, selection, `${file.path} (columns)`, collector);
  const rows = await parquetReadObjects({
    file: buffer,
    metadata,
    columns: pickFields(pick).filter((field) => fields.includes(field)),
    // Text stays as bytes so that bad UTF-8 is an error naming the row, not U+FFFD.
    parsers: { stringFromBytes: (bytes: Uint8Array) => bytes },
  }).catch((error) => {
    throw unreadable(error);
  });
  rows.forEach((row, index) => {
    const where = `${file.path}: row ${index}`;
    for (const { field, suffix, value } of pickValues(row, pick, where)) {
      const text = value instanceof Uint8Array
        ? decodeUtf8(value, (line) => `${where}, column "${field}", line ${line}`)
        : value;
      collector.add(file.path, `${file.rel}:${index}${suffix}`, captionText(text, field, where));
    }
  });
}
