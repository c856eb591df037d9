import assert from "node:assert/strict";
import { join } from "node:path";
import { DataError } from "../../src/data/collect.ts";
import { readTextLines } from "../../src/data/lines.ts";

const MIB = 1 << 20;

Deno.test("text lines: BOM, a character split across chunks, a line longer than a chunk", async () => {
  // Lines number on across batches, and a line's bytes join across 1 MiB reads before decoding.
  const dir = await Deno.makeTempDir({ prefix: "distill-lines-" });
  try {
    const path = join(dir, "long.txt");
    const first = "\uFEFF" + "a".repeat(MIB - 4) + "é"; // BOM (3 bytes) + é straddles 1 MiB
    const long = "b".repeat(3 * MIB + 7);
    await Deno.writeTextFile(path, `${first}\r\n${long}\n\nlast`);
    const lines = (await Array.fromAsync(readTextLines(path))).flat();
    assert.deepEqual(lines.map((l) => l.line), [1, 2, 3, 4]);
    assert.equal(lines[0].text, "a".repeat(MIB - 4) + "é\r");
    assert.equal(lines[1].text, long);
    assert.equal(lines[2].text, "");
    assert.equal(lines[3].text, "last");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("text lines: bad UTF-8 past the first chunk names its line", async () => {
  const dir = await Deno.makeTempDir({ prefix: "distill-lines-" });
  try {
    const path = join(dir, "bad.txt");
    const text = new TextEncoder().encode("ok\n".repeat(400_000)); // 1.2 MB
    const bytes = new Uint8Array(text.length + 4);
    bytes.set(text);
    bytes.set([0x63, 0xe9, 0x0a, 0x78], text.length); // "c\xe9" is Latin-1, not UTF-8
    await Deno.writeFile(path, bytes);
    await assert.rejects(Array.fromAsync(readTextLines(path)), (error: Error) => {
      assert.ok(error instanceof DataError);
      assert.equal(
        error.message,
        `${path}:400001: not valid UTF-8. Fix: re-save the text as UTF-8, ` +
          `e.g. iconv -f WINDOWS-1252 -t UTF-8 IN > OUT.`,
      );
      return true;
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("text lines: numbering runs on across batches", async () => {
  const dir = await Deno.makeTempDir({ prefix: "distill-lines-" });
  try {
    const path = join(dir, "many.txt");
    const count = 300_000; // ~2.4 MB: three or more batches
    await Deno.writeTextFile(
      path,
      Array.from({ length: count }, (_, k) => `p${k}`).join("\n") + "\n",
    );
    const lines = (await Array.fromAsync(readTextLines(path))).flat();
    assert.equal(lines.length, count);
    assert.ok(lines.every((l, k) => l.line === k + 1 && l.text === `p${k}`));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
