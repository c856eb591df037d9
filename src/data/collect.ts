/**
 * What every caption reader shares: the row type, the error type, strict UTF-8 decoding with a
 * line number, the choice of caption field(s) in a record, and the collector that keeps rows and
 * counts what was skipped.
 */

import { closestNames } from "../io/closest.ts";

/** One caption. `id` is stable: the file path relative to the data root plus a line/key/row. */
export interface CaptionRow {
  /** Stable id: the file path relative to the data root plus a line, key or row number. */
  id: string;
  /** The caption text, trimmed and never empty. */
  caption: string;
  /** Path of the file the caption was read from. */
  source: string;
}

/** Thrown for bad data or options; the message names the file, the place in it and the fix. */
export class DataError extends Error {
  override name = "DataError";
}

/** Which SPRIGHT caption(s) to take from a sample; `both` gives two rows per sample. */
export type SprightChoice = "spatial" | "original" | "both" | "coca";
export const SPRIGHT_CHOICES: readonly SprightChoice[] = ["spatial", "original", "both", "coca"];

/** Tried in this order when no caption field is given; each matches case-insensitively. */
export const DEFAULT_CAPTION_FIELDS: readonly string[] = ["caption", "text", "prompt", "prompts"];

export interface CaptionSelection {
  captionField?: string;
  spright?: SprightChoice;
}

/** The resolved rule for taking captions out of one record. */
export type CaptionPick =
  | { kind: "field"; field: string }
  | { kind: "spright"; choice: SprightChoice };

/**
 * SPRIGHT's fields, in fallback order. `original` falls back to `coca_caption` when
 * `original_caption` is absent, as SPRIGHT's train.py does for Segment-Anything images, which
 * have no source caption.
 */
const SPRIGHT_FIELDS = {
  spatial: ["spatial_caption"],
  original: ["original_caption", "coca_caption"],
  coca: ["coca_caption"],
} as const;

const SPRIGHT_PARTS: Record<SprightChoice, (keyof typeof SPRIGHT_FIELDS)[]> = {
  spatial: ["spatial"],
  original: ["original"],
  coca: ["coca"],
  both: ["spatial", "original"],
};

/** Every field name a pick may read, for readers that load columns selectively. */
export function pickFields(pick: CaptionPick): string[] {
  if (pick.kind === "field") return [pick.field];
  return SPRIGHT_PARTS[pick.choice].flatMap((part) => [...SPRIGHT_FIELDS[part]]);
}

function listFields(fields: readonly string[]): string {
  return fields.length === 0 ? "(none)" : fields.map((f) => JSON.stringify(f)).join(", ");
}

/**
 * Decides from the field names of a file's first record (or its header/schema) where the
 * caption is. Without options the default fields are tried; a record that has none of them but
 * has SPRIGHT's `spatial_caption` is read as SPRIGHT `spatial`, with a warning.
 */
export function resolvePick(
  fields: readonly string[],
  selection: CaptionSelection,
  where: string,
  collector: CaptionCollector,
): CaptionPick {
  if (selection.spright) return { kind: "spright", choice: selection.spright };
  const wanted = selection.captionField;
  if (wanted !== undefined) {
    if (fields.includes(wanted)) return { kind: "field", field: wanted };
    throw new DataError(
      `${where}: caption field ${JSON.stringify(wanted)} is missing. Fields present: ` +
        `${listFields(fields)}. Fix: set --caption-field (captionField) to one of them` +
        (fields.length
          ? ` (closest: ${JSON.stringify(closestNames(wanted, fields, 1)[0])}).`
          : "."),
    );
  }
  for (const candidate of DEFAULT_CAPTION_FIELDS) {
    const field = fields.find((f) => f === candidate) ??
      fields.find((f) => f.toLowerCase() === candidate);
    if (field !== undefined) return { kind: "field", field };
  }
  if (fields.includes("spatial_caption")) {
    collector.warnOnce(
      "records have SPRIGHT fields and no --spright choice: using spatial_caption " +
        "(set --spright spatial|original|both|coca to choose)",
    );
    return { kind: "spright", choice: "spatial" };
  }
  throw new DataError(
    `${where}: no caption field: none of the default fields ` +
      `${listFields(DEFAULT_CAPTION_FIELDS)} is present. Fields present: ${listFields(fields)}. ` +
      `Fix: set --caption-field (captionField) to the field that holds the caption.`,
  );
}

/** A caption found in a record: its value (not yet checked) and the id suffix it gets. */
export interface PickedValue {
  field: string;
  suffix: string;
  value: unknown;
}

/**
 * Takes the caption value(s) out of one record. A missing field is an error that names the
 * record; a null value is returned as is and counted as an empty caption later.
 */
export function pickValues(
  record: Record<string, unknown>,
  pick: CaptionPick,
  where: string,
): PickedValue[] {
  if (pick.kind === "field") {
    if (!Object.hasOwn(record, pick.field)) {
      throw new DataError(
        `${where}: caption field ${JSON.stringify(pick.field)} is missing from this record, ` +
          `which has ${listFields(Object.keys(record))}. Fix: give every record the field, or ` +
          `set --caption-field (captionField) to a field every record has.`,
      );
    }
    return [{ field: pick.field, suffix: "", value: record[pick.field] }];
  }
  return SPRIGHT_PARTS[pick.choice].map((part) => {
    const candidates = SPRIGHT_FIELDS[part];
    const field = candidates.find((f) => Object.hasOwn(record, f));
    if (field === undefined) {
      throw new DataError(
        `${where}: SPRIGHT choice ${JSON.stringify(pick.choice)} needs ` +
          `${candidates.map((f) => JSON.stringify(f)).join(" or ")}, which this record lacks; ` +
          `it has ${listFields(Object.keys(record))}. Fix: choose another --spright value ` +
          `(spatial, original, both, coca) or set --caption-field (captionField).`,
      );
    }
    return { field, suffix: `#${field}`, value: record[field] };
  });
}

/** A caption value must be text; null/undefined count as empty, anything else is an error. */
export function captionText(value: unknown, field: string, where: string): string | null {
  if (typeof value === "string") return value;
  if (value === null || value === undefined) return null;
  const kind = Array.isArray(value) ? "a list" : `a ${typeof value}`;
  throw new DataError(
    `${where}: caption field ${JSON.stringify(field)} holds ${kind}, not text. ` +
      `Fix: set --caption-field (captionField) to a text field.`,
  );
}

// A BOM is kept: a caption's trim() drops it, and text read in batches strips it at file start.
const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/**
 * Decodes strict UTF-8. On bad bytes the error names the 1-based line through `at(line)`;
 * 0x0A never occurs inside a multi-byte sequence, so lines decode alone to find it.
 */
export function decodeUtf8(bytes: Uint8Array, at: (line: number) => string): string {
  try {
    return utf8.decode(bytes);
  } catch {
    let line = 1;
    for (let start = 0, end = bytes.indexOf(0x0a); end >= 0; end = bytes.indexOf(0x0a, start)) {
      if (!decodes(bytes.subarray(start, end))) break;
      start = end + 1;
      line++;
    }
    throw new DataError(
      `${at(line)}: not valid UTF-8. Fix: re-save the text as UTF-8, ` +
        `e.g. iconv -f WINDOWS-1252 -t UTF-8 IN > OUT.`,
    );
  }
}

function decodes(bytes: Uint8Array): boolean {
  try {
    utf8.decode(bytes);
    return true;
  } catch {
    return false;
  }
}

/** Skipped captions by reason. */
export interface SkipCounts {
  /** Empty, whitespace-only or null captions (blank lines of a `lines` file included). */
  empty: number;
  /** Captions equal to an earlier one, dropped by `dedupe`. */
  duplicate: number;
  /** Kohya `.txt` files without a same-name image beside them. */
  noImage: number;
}

const EXAMPLES = 5;

/** Collects rows in read order and counts what was skipped, with a few example ids each. */
export class CaptionCollector {
  readonly rows: CaptionRow[] = [];
  readonly skipped: SkipCounts = { empty: 0, duplicate: 0, noImage: 0 };
  readonly #warnings = new Set<string>();
  readonly #examples: Record<keyof SkipCounts, string[]> = {
    empty: [],
    duplicate: [],
    noImage: [],
  };

  /** Adds a caption, trimmed; an empty one is counted instead. */
  add(source: string, id: string, caption: string | null): void {
    const text = caption?.trim() ?? "";
    if (text === "") this.countSkipped("empty", id);
    else this.rows.push({ id, caption: text, source });
  }

  countSkipped(reason: keyof SkipCounts, id: string): void {
    this.skipped[reason]++;
    if (this.#examples[reason].length < EXAMPLES) this.#examples[reason].push(id);
  }

  warnOnce(message: string): void {
    this.#warnings.add(message);
  }

  /** The warnings, then one line per skip reason with its count and first ids. */
  warnings(): string[] {
    const what: Record<keyof SkipCounts, string> = {
      empty: "empty captions",
      duplicate: "duplicate captions (dedupe)",
      noImage: ".txt files with no same-name image (kohya reads only image captions)",
    };
    const counts = (Object.keys(what) as (keyof SkipCounts)[])
      .filter((reason) => this.skipped[reason] > 0)
      .map((reason) =>
        `skipped ${this.skipped[reason]} ${what[reason]}, first: ` +
        this.#examples[reason].join(", ")
      );
    return [...this.#warnings, ...counts];
  }
}
