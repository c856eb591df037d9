import assert from "node:assert/strict";
import { DataError } from "../../src/data/collect.ts";
import {
  CsvParser,
  type DelimitedRecord,
  HeaderKeyed,
  tsvRecord,
} from "../../src/data/delimited.ts";
import type { TextLine } from "../../src/data/lines.ts";

/** Lines as readTextLines gives them: split on "\n", a final "\n" ends the last line. */
function linesOf(text: string): TextLine[] {
  const lines = text.split("\n");
  if (lines.at(-1) === "") lines.pop();
  return lines.map((line, k) => ({ line: k + 1, text: line }));
}

function csv(text: string, file = "x.csv"): DelimitedRecord[] {
  const parser = new CsvParser(file);
  const records = linesOf(text).map((line) => parser.push(line)).filter((r) => r !== undefined);
  parser.end();
  return records;
}

Deno.test("csv: RFC 4180 quoting, doubled quotes, embedded commas and line breaks", () => {
  const text = 'caption,n\r\n"a, b",1\r\n"say ""hi""",2\r\n"two\r\nlines\nhere",3\r\nplain,4';
  assert.deepEqual(csv(text), [
    { line: 1, fields: ["caption", "n"] },
    { line: 2, fields: ["a, b", "1"] },
    { line: 3, fields: ['say "hi"', "2"] },
    { line: 4, fields: ["two\r\nlines\nhere", "3"] },
    { line: 7, fields: ["plain", "4"] },
  ]);
});

Deno.test("csv: empty fields, trailing comma, blank lines, quote inside an unquoted field", () => {
  assert.deepEqual(csv('a,,b,\n\n\n5" tall,""\n'), [
    { line: 1, fields: ["a", "", "b", ""] },
    { line: 4, fields: ['5" tall', ""] },
  ]);
  assert.deepEqual(csv(""), []);
  assert.deepEqual(csv('"a",\n"",b\r\n"\n\n",c'), [
    { line: 1, fields: ["a", ""] },
    { line: 2, fields: ["", "b"] },
    { line: 3, fields: ["\n\n", "c"] },
  ]);
});

Deno.test("csv: an unclosed quote names the line where it opened", () => {
  assert.throws(
    () => csv('caption\nok\n"never closed,\nstill open\n'),
    (error: Error) =>
      error instanceof DataError &&
      error.message.startsWith("x.csv:3: a quoted field opened on this line never closes") &&
      error.message.includes(
        'Fix: close it with a quote, and write each quote inside it twice ("")',
      ),
  );
});

Deno.test("csv: text after a closing quote is an error naming the line", () => {
  assert.throws(
    () => csv('caption\n"multi\nline" tail\n'),
    /^DataError: x\.csv:3: text follows the closing quote of a quoted field\. Fix: write each quote/,
  );
});

Deno.test("tsv: no quoting, CRLF stripped, blank lines skipped", () => {
  const text = 'Prompt\tNote\r\n"G I G G L E" painted\t\r\n\r\nx\t"q"\n';
  assert.deepEqual(linesOf(text).map(tsvRecord), [
    { line: 1, fields: ["Prompt", "Note"] },
    { line: 2, fields: ['"G I G G L E" painted', ""] },
    undefined,
    { line: 4, fields: ["x", '"q"'] },
  ]);
});

Deno.test("header-keyed records: a field-count mismatch names the line and the fix", () => {
  const keyed = new HeaderKeyed("f.csv", "comma");
  assert.equal(keyed.push({ line: 1, fields: ["a", "b"] }), undefined);
  assert.deepEqual(keyed.push({ line: 2, fields: ["1", "2"] }), { a: "1", b: "2" });
  assert.throws(
    () => keyed.push({ line: 3, fields: ["x", " y", " z"] }),
    (error: Error) =>
      error.message.startsWith("f.csv:3: 3 fields, but the header (line 1) has 2.") &&
      error.message.includes("fields holding commas or line breaks are quoted"),
  );
});
