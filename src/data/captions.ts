/**
 * Caption data sets: finds the format of a `--data` path, reads every caption in a
 * deterministic order (files sorted by path, then position in the file), and splits a held-out
 * set by a hash of the caption text. Only captions are read: images are never opened.
 * The formats, options and rules are documented in datasets.md.
 */

import { createHash } from "node:crypto";
import { basename, dirname, extname, join } from "node:path";
import {
  CaptionCollector,
  type CaptionRow,
  type CaptionSelection,
  DataError,
  type SkipCounts,
  SPRIGHT_CHOICES,
  type SprightChoice,
} from "./collect.ts";
import { isImagePath, isKohyaCaptionPath, readKohyaFolder } from "./kohya.ts";
import { readParquetFile } from "./parquet.ts";
import {
  readImageFolderMetadata,
  readLinesFile,
  readRecordFile,
  type SourceFile,
} from "./records.ts";
import { readWebDatasetShard } from "./webdataset.ts";

export { type CaptionRow, DataError, type SkipCounts, SPRIGHT_CHOICES, type SprightChoice };

/** The data set formats `readCaptions` understands (datasets.md describes each). */
export const CAPTION_FORMATS = [
  "kohya",
  "lines",
  "jsonl",
  "csv",
  "tsv",
  "imagefolder",
  "webdataset",
  "parquet",
] as const;
/** One of `CAPTION_FORMATS`. */
export type CaptionFormat = typeof CAPTION_FORMATS[number];

/** How to read a data set; every field is optional. */
export interface ReadCaptionsOptions {
  /** Skips detection; required when a folder's content fits more than one format. */
  format?: CaptionFormat;
  /** The record field/column holding the caption (jsonl, csv, tsv, imagefolder, webdataset, parquet). */
  captionField?: string;
  /** Which SPRIGHT caption(s) to take; `both` gives two rows per sample. */
  spright?: SprightChoice;
  /** Drops captions equal to an earlier one (after trimming), keeping the first. */
  dedupe?: boolean;
}

/** A data set's captions with what was read, skipped and noted on the way. */
export interface CaptionSet {
  /** The format given or detected. */
  format: CaptionFormat;
  /** The files read, in reading order. */
  files: string[];
  /** The captions in reading order. */
  rows: CaptionRow[];
  /** Captions left out, by reason. */
  skipped: SkipCounts;
  /** Human-readable notes: skip counts with example ids, defaults taken, files without captions. */
  warnings: string[];
}

const FORMATS_LOOKED_FOR = "kohya (images with same-name .txt captions), lines (.txt, one " +
  "caption per line), jsonl/csv/tsv (a caption field), imagefolder (metadata.jsonl or " +
  "metadata.csv with file_name), webdataset (.tar shards of {key}.json or {key}.txt), parquet " +
  "(a text column); all but kohya and parquet also gzip-compressed (.gz, .tgz)";

const files = (count: number) => `${count} file${count === 1 ? "" : "s"}`;

/**
 * A file's name as its data: `.gz` dropped and `.tgz` read as `.tar`. Ids start with it, so a
 * compressed copy of a data set keeps its ids (and a cache made from either serves both).
 */
function uncompressedName(rel: string): string {
  return rel.replace(/\.tgz$/i, ".tar").replace(/\.gz$/i, "");
}

/** The format a single file's name implies, if any; parquet has its own codecs, never gzip. */
function formatOfFile(rel: string): CaptionFormat | undefined {
  const plain = uncompressedName(rel);
  const name = basename(plain).toLowerCase();
  if (name === "metadata.jsonl" || name === "metadata.csv") return "imagefolder";
  const byExtension: Record<string, CaptionFormat> = {
    ".txt": "lines",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tar": "webdataset",
  };
  if (plain === rel && extname(name) === ".parquet") return "parquet";
  return byExtension[extname(name)];
}

/** Whether a file in a folder is read under an explicitly chosen format. */
function readsFile(format: CaptionFormat, rel: string): boolean {
  const implied = formatOfFile(rel);
  switch (format) {
    case "kohya":
      return isKohyaCaptionPath(rel);
    case "jsonl":
    case "csv":
      return implied === format ||
        basename(uncompressedName(rel)).toLowerCase() === `metadata.${format}`;
    default:
      return implied === format;
  }
}

/** All files under `root`, relative with `/`, sorted; hidden entries skipped, links followed. */
async function listFiles(root: string): Promise<string[]> {
  const files: string[] = [];
  const visited = new Set<string>();
  const walk = async (dir: string, rel: string) => {
    const real = await Deno.realPath(dir);
    if (visited.has(real)) return;
    visited.add(real);
    for await (const entry of Deno.readDir(dir)) {
      if (entry.name.startsWith(".")) continue;
      const path = join(dir, entry.name);
      const relPath = rel ? `${rel}/${entry.name}` : entry.name;
      const info = entry.isSymlink ? await Deno.stat(path).catch(() => undefined) : entry;
      if (info?.isDirectory) await walk(path, relPath);
      else if (info?.isFile) files.push(relPath);
    }
  };
  await walk(root, "");
  return files.sort();
}

interface Plan {
  format: CaptionFormat;
  root: string;
  /** Files to read, sorted by relative path. */
  sources: SourceFile[];
  /** Every file under `root`, relative (kohya pairs captions with images). */
  all: string[];
}

/** Picks the format of a folder from its files, or asks for `--format` when it is not clear. */
function detectFolderFormat(path: string, all: string[]): CaptionFormat {
  const hasImages = all.some(isImagePath);
  const byFormat = new Map<CaptionFormat, string[]>();
  for (const rel of all) {
    let format = formatOfFile(rel);
    if (format === "lines" && hasImages && isKohyaCaptionPath(rel)) format = "kohya";
    if (!format) continue;
    const rels = byFormat.get(format);
    if (rels) rels.push(rel);
    else byFormat.set(format, [rel]);
  }
  const found = [...byFormat.keys()];
  if (found.length === 1 && found[0] !== "lines") return found[0];
  if (found.length === 0) {
    throw new DataError(
      `${path}: no caption files found. Formats looked for: ${FORMATS_LOOKED_FOR}. ` +
        `Fix: point --data at a caption file or folder.`,
    );
  }
  if (found.length === 1) {
    throw new DataError(
      `${path}: holds .txt files but no images, so these are not kohya captions. Fix: set ` +
        `--format lines to read every line of every .txt file as a caption.`,
    );
  }
  const listing = found.map((format) => {
    const rels = byFormat.get(format)!;
    return `${format} (${files(rels.length)}, e.g. ${rels[0]})`;
  });
  throw new DataError(
    `${path}: the folder fits more than one format: ${listing.join("; ")}. ` +
      `Fix: set --format to one of ${found.join(", ")}.`,
  );
}

async function planSources(path: string, format: CaptionFormat | undefined): Promise<Plan> {
  const info = await Deno.stat(path).catch(() => undefined);
  if (!info) {
    throw new DataError(`${path}: no such file or folder. Fix: check the --data path.`);
  }
  if (info.isFile) {
    if (format === "kohya") {
      throw new DataError(`${path}: kohya reads a folder. Fix: point --data at the folder.`);
    }
    const chosen = format ?? formatOfFile(path);
    if (!chosen) {
      throw new DataError(
        `${path}: the extension does not tell the format. Fix: set --format to one of ` +
          `${CAPTION_FORMATS.filter((f) => f !== "kohya").join(", ")}.`,
      );
    }
    return {
      format: chosen,
      root: dirname(path),
      sources: [{ path, rel: uncompressedName(basename(path)) }],
      all: [],
    };
  }
  const all = await listFiles(path);
  const chosen = format ?? detectFolderFormat(path, all);
  const sources = all.filter((rel) => readsFile(chosen, rel))
    .map((rel) => ({ path: join(path, rel), rel: uncompressedName(rel) }));
  checkNoTwins(sources);
  return { format: chosen, root: path, sources, all };
}

/** A file and its compressed copy would give every caption twice, under the same ids. */
function checkNoTwins(sources: readonly SourceFile[]): void {
  const byRel = new Map<string, string>();
  for (const { path, rel } of sources) {
    const twin = byRel.get(rel);
    if (twin !== undefined) {
      throw new DataError(
        `${twin} and ${path} hold the same data set file (one compressed), so every caption ` +
          `would be read twice. Fix: keep one of them in --data.`,
      );
    }
    byRel.set(rel, path);
  }
}

function checkOptions(options: ReadCaptionsOptions): void {
  const { format, spright, captionField } = options;
  if (format !== undefined && !CAPTION_FORMATS.includes(format)) {
    throw new DataError(
      `unknown format ${JSON.stringify(format)}. Fix: set --format to one of ` +
        `${CAPTION_FORMATS.join(", ")}.`,
    );
  }
  if (spright !== undefined && !SPRIGHT_CHOICES.includes(spright)) {
    throw new DataError(
      `unknown SPRIGHT choice ${JSON.stringify(spright)}. Fix: set --spright to one of ` +
        `${SPRIGHT_CHOICES.join(", ")}.`,
    );
  }
  if (spright !== undefined && captionField !== undefined) {
    throw new DataError(
      `--spright and --caption-field both choose the caption field. Fix: give only one.`,
    );
  }
  if (captionField === "") {
    throw new DataError(`--caption-field is empty. Fix: name the field that holds the caption.`);
  }
}

function readSource(
  format: Exclude<CaptionFormat, "kohya">,
  file: SourceFile,
  selection: CaptionSelection,
  collector: CaptionCollector,
): Promise<void> {
  switch (format) {
    case "lines":
      return readLinesFile(file, collector);
    case "jsonl":
    case "csv":
    case "tsv":
      return readRecordFile(file, format, selection, collector);
    case "imagefolder":
      return readImageFolderMetadata(file, selection, collector);
    case "webdataset":
      return readWebDatasetShard(file, selection, collector);
    case "parquet":
      return readParquetFile(file, selection, collector);
  }
}

/**
 * Reads all captions under `path` (a file or folder) with counts of what was skipped.
 * Errors are `DataError`s naming the file, the line/key/row and the fix.
 */
export async function readCaptionSet(
  path: string,
  options: ReadCaptionsOptions = {},
): Promise<CaptionSet> {
  checkOptions(options);
  const plan = await planSources(path, options.format);
  const selection: CaptionSelection = {
    captionField: options.captionField,
    spright: options.spright,
  };
  if (
    (plan.format === "kohya" || plan.format === "lines") &&
    (selection.captionField || selection.spright)
  ) {
    throw new DataError(
      `${path}: read as ${plan.format}, where a caption is a whole line and has no fields. ` +
        `Fix: drop --caption-field/--spright, or set --format.`,
    );
  }
  const collector = new CaptionCollector();
  if (plan.format === "kohya") await readKohyaFolder(plan.root, plan.all, collector);
  else for (const file of plan.sources) await readSource(plan.format, file, selection, collector);
  const rows = options.dedupe ? dropDuplicates(collector) : collector.rows;
  const warnings = collector.warnings();
  if (rows.length === 0) {
    throw new DataError(
      `${path}: no captions found (read as ${plan.format}, ${files(plan.sources.length)})` +
        (warnings.length ? `; ${warnings.join("; ")}` : "") +
        `. Formats looked for: ${FORMATS_LOOKED_FOR}. Fix: point --data at the captions, or ` +
        `set --format / --caption-field.`,
    );
  }
  return {
    format: plan.format,
    files: plan.sources.map((file) => file.path),
    rows,
    skipped: collector.skipped,
    warnings,
  };
}

/** The rows of `readCaptionSet`; use that to report skipped captions and warnings. */
export async function readCaptions(
  path: string,
  options: ReadCaptionsOptions = {},
): Promise<CaptionRow[]> {
  return (await readCaptionSet(path, options)).rows;
}

function dropDuplicates(collector: CaptionCollector): CaptionRow[] {
  const seen = new Set<string>();
  return collector.rows.filter((row) => {
    if (!seen.has(row.caption)) {
      seen.add(row.caption);
      return true;
    }
    collector.countSkipped("duplicate", row.id);
    return false;
  });
}

/** SHA-256 of the caption's UTF-8 bytes, lowercase hex: identifies a caption across runs. */
export function captionHash(caption: string): string {
  return createHash("sha256").update(caption, "utf8").digest("hex");
}

/**
 * Where a caption falls in [0, 1): the first 6 bytes of SHA-256(salt, 0x00, caption) as a
 * big-endian integer over 2^48. Python: int.from_bytes(hashlib.sha256(salt.encode() + b"\0" +
 * caption.encode()).digest()[:6], "big") / 2**48.
 */
export function heldOutScore(caption: string, salt = ""): number {
  const digest = createHash("sha256").update(salt, "utf8").update("\0").update(caption, "utf8")
    .digest();
  return digest.readUIntBE(0, 6) / 2 ** 48;
}

/**
 * Splits rows by caption text: a row is held out when its score is below `fraction`, so the
 * same caption always lands on the same side (duplicates never straddle the split), on every
 * machine, whatever the row order. Order within each side is kept.
 */
export function splitHeldOut(
  rows: readonly CaptionRow[],
  { fraction, salt = "" }: { fraction: number; salt?: string },
): { train: CaptionRow[]; heldOut: CaptionRow[] } {
  if (!(fraction >= 0 && fraction <= 1)) {
    throw new DataError(`held-out fraction ${fraction} is not in [0, 1]. Fix: use e.g. 0.02.`);
  }
  const train: CaptionRow[] = [];
  const heldOut: CaptionRow[] = [];
  for (const row of rows) (heldOutScore(row.caption, salt) < fraction ? heldOut : train).push(row);
  return { train, heldOut };
}
