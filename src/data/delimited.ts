/**
 * CSV (RFC 4180) and TSV (IANA text/tab-separated-values) records, fed one line at a time.
 * Each record carries the 1-based line it starts on, so errors and row ids point into the file.
 */

import { DataError } from "./collect.ts";
import type { TextLine } from "./lines.ts";

export interface DelimitedRecord {
  line: number;
  fields: string[];
}

/**
 * RFC 4180: fields separated by commas, records by CRLF or LF; a field that starts with a quote
 * runs to the closing quote and may hold commas, line breaks and doubled quotes (""). A quote
 * inside an unquoted field is kept as text (as Python's csv module does). Empty lines between
 * records are not records.
 */
export class CsvParser {
  #fields: string[] = [];
  #field = "";
  #quoted = false;
  #start = 0;
  #opened = 0;

  constructor(readonly file: string) {}

  /** Feeds the next line; returns the record it completes, if any. */
  push({ line, text }: TextLine): DelimitedRecord | undefined {
    const n = text.length;
    let i = 0;
    if (this.#quoted) {
      this.#field += "\n";
    } else {
      if (text === "" || text === "\r") return undefined;
      this.#start = line;
      this.#fields = [];
    }
    const fields = this.#fields;
    for (;;) {
      if (this.#quoted) {
        const q = text.indexOf('"', i);
        if (q < 0) {
          this.#field += text.slice(i);
          return undefined; // the quoted field goes on in the next line
        }
        this.#field += text.slice(i, q);
        if (text.charCodeAt(q + 1) === 0x22) {
          this.#field += '"';
          i = q + 2;
          continue;
        }
        this.#quoted = false;
        fields.push(this.#field);
        i = q + 1;
        if (i === n || (i === n - 1 && text[i] === "\r")) return { line: this.#start, fields };
        if (text[i] !== ",") {
          throw new DataError(
            `${this.file}:${line}: text follows the closing quote of a quoted field. Fix: ` +
              `write each quote inside a quoted field twice (""), or quote the whole field.`,
          );
        }
        i++;
      } else if (text.charCodeAt(i) === 0x22) {
        this.#quoted = true;
        this.#field = "";
        this.#opened = line;
        i++;
      } else {
        const comma = text.indexOf(",", i);
        if (comma < 0) {
          const last = text.slice(i);
          fields.push(last.endsWith("\r") ? last.slice(0, -1) : last);
          return { line: this.#start, fields };
        }
        fields.push(text.slice(i, comma));
        i = comma + 1;
      }
    }
  }

  /** Call at the end of the file: a quoted field still open is an error. */
  end(): void {
    if (this.#quoted) {
      throw new DataError(
        `${this.file}:${this.#opened}: a quoted field opened on this line never closes. ` +
          `Fix: close it with a quote, and write each quote inside it twice ("").`,
      );
    }
  }
}

/**
 * TSV as IANA defines it: tab-separated fields, one record per line, no quoting (a field
 * cannot hold a tab or line break). Quotes are plain text, so PartiPrompts' `"G I G G L E"
 * painted ...` reads as written. Empty lines are not records.
 */
export function tsvRecord({ line, text }: TextLine): DelimitedRecord | undefined {
  const row = text.endsWith("\r") ? text.slice(0, -1) : text;
  return row === "" ? undefined : { line, fields: row.split("\t") };
}

/**
 * Turns records into objects keyed by the header (the first record). A record whose field count
 * differs from the header's is an error: it almost always means a wrong delimiter or broken
 * quoting.
 */
export class HeaderKeyed {
  #header: DelimitedRecord | undefined;

  constructor(readonly file: string, readonly delimiter: "comma" | "tab") {}

  /** The record as an object, or undefined for the header itself. */
  push({ line, fields }: DelimitedRecord): Record<string, string> | undefined {
    const header = this.#header;
    if (header === undefined) {
      this.#header = { line, fields };
      return undefined;
    }
    if (fields.length !== header.fields.length) {
      throw new DataError(
        `${this.file}:${line}: ${fields.length} fields, but the header (line ${header.line}) ` +
          `has ${header.fields.length}. Fix: check that the file is ${this.delimiter}-separated` +
          (this.delimiter === "comma"
            ? " and that fields holding commas or line breaks are quoted."
            : " and that no field holds a tab."),
      );
    }
    // fromEntries defines own properties, so a column named "__proto__" stays a column.
    return Object.fromEntries(header.fields.map((name, k) => [name, fields[k]]));
  }
}
