import assert from "node:assert/strict";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { type CacheOptions, runCache } from "../../src/data/cache_job.ts";
import {
  type CaptionRow,
  DataError,
  readCaptionSet,
  type ReadCaptionsOptions,
} from "../../src/data/captions.ts";
import type { CacheManifest } from "../../src/data/cache_format.ts";
import { withTempDir } from "../helpers.ts";
import { fakeTeacher, readTree } from "./fake_teacher.ts";
import { sprightSample, tarBytes } from "./tar_fixture.ts";

const encoder = new TextEncoder();
const quiet = () => {};

const rowsOf = (rows: CaptionRow[]) => rows.map(({ id, caption }) => ({ id, caption }));

/** Asserts `readCaptionSet` fails with a DataError whose message matches every pattern. */
async function rejectsWith(path: string, ...patterns: RegExp[]): Promise<string> {
  let message = "";
  await assert.rejects(readCaptionSet(path), (error: Error) => {
    assert.ok(error instanceof DataError, `expected a DataError, got ${error.stack}`);
    for (const pattern of patterns) assert.match(error.message, pattern);
    message = error.message;
    return true;
  });
  return message;
}

function cache(data: string, out: string, options: Partial<CacheOptions> = {}) {
  return runCache({ data, out, batchSize: 2, rowsPerShard: 3, ...options }, fakeTeacher(), quiet);
}

/** What makes two caches hold the same targets of the same rows (the data path aside). */
function sameRows(manifest: CacheManifest) {
  return {
    rows: manifest.rows,
    rowsSha256: manifest.rowsSha256,
    shards: manifest.shards.map(({ rows, rowsSha256, sha256 }) => ({ rows, rowsSha256, sha256 })),
  };
}

const JSONL = [1, 2, 3, 4, 5, 6, 7].map((k) => JSON.stringify({ caption: `caption ${k}` }))
  .join("\n");
const TWINS: { name: string; bytes: Uint8Array; options?: Partial<ReadCaptionsOptions> }[] = [
  { name: "captions.jsonl", bytes: encoder.encode(JSONL) },
  { name: "captions.csv", bytes: encoder.encode('text,n\n"a, b",1\n"two\nlines",2\nc,3\n') },
  { name: "prompts.tsv", bytes: encoder.encode('Prompt\tx\n"quoted" cat\t1\nowl\t2\n') },
  { name: "prompts.txt", bytes: encoder.encode("one\r\n\r\ntwo\nthree\n") },
  { name: "metadata.jsonl", bytes: encoder.encode('{"file_name":"a.png","text":"a cat"}\n') },
  {
    name: "00000.tar",
    bytes: tarBytes([
      ...sprightSample("0", { spatial_caption: "s0", original_caption: "o0" }),
      ...sprightSample("1", { spatial_caption: "s1", coca_caption: "c1" }),
    ]),
    options: { spright: "both" },
  },
];

Deno.test("gzip twins: each format reads the same rows and caches the same targets", async () => {
  await withTempDir(async (dir) => {
    for (const { name, bytes, options } of TWINS) {
      const compressedName = name.endsWith(".tar") ? name.replace(/\.tar$/, ".tgz") : `${name}.gz`;
      const plain = join(dir, "plain", name);
      const compressed = join(dir, "gz", compressedName);
      await Deno.mkdir(join(plain, ".."), { recursive: true });
      await Deno.mkdir(join(compressed, ".."), { recursive: true });
      await Deno.writeFile(plain, bytes);
      await Deno.writeFile(compressed, gzipSync(bytes));
      const [a, b] = [
        await readCaptionSet(plain, options),
        await readCaptionSet(compressed, options),
      ];
      assert.equal(b.format, a.format, name);
      assert.ok(a.rows.length > 0, name);
      assert.deepEqual(rowsOf(b.rows), rowsOf(a.rows), name);
      // The same rows under the folder too, where the format is detected from the names.
      const folderFormat = name.endsWith(".txt") ? "lines" : undefined; // never guessed
      const inFolder = await readCaptionSet(join(compressed, ".."), {
        format: folderFormat,
        ...options,
      });
      assert.deepEqual(rowsOf(inFolder.rows), rowsOf(a.rows), `${name} in a folder`);
      const fromPlain = await cache(plain, join(dir, "cache", name), options);
      const fromGzip = await cache(compressed, join(dir, "cache", compressedName), options);
      assert.deepEqual(sameRows(fromGzip), sameRows(fromPlain), name);
      await Deno.remove(join(plain, ".."), { recursive: true });
      await Deno.remove(join(compressed, ".."), { recursive: true });
    }
  });
});

Deno.test("gzip: found by magic bytes, not by name; concatenated members read as one", async () => {
  await withTempDir(async (dir) => {
    const plainPath = await write(dir, "a/captions.jsonl", encoder.encode(JSONL));
    const plain = (await readCaptionSet(plainPath)).rows;
    const misnamed = await write(dir, "b/captions.jsonl", gzipSync(JSONL));
    assert.deepEqual(rowsOf((await readCaptionSet(misnamed)).rows), rowsOf(plain));
    const notGzip = await write(dir, "c/captions.jsonl.gz", encoder.encode(JSONL));
    assert.deepEqual(rowsOf((await readCaptionSet(notGzip)).rows), rowsOf(plain));
    const [head, tail] = [JSONL.slice(0, 40), JSONL.slice(40)];
    const members = await write(dir, "d/captions.jsonl.gz", concat(gzipSync(head), gzipSync(tail)));
    assert.deepEqual(rowsOf((await readCaptionSet(members)).rows), rowsOf(plain));
  });
});

Deno.test("gzip: a file beside its compressed copy is an error naming both", async () => {
  await withTempDir(async (dir) => {
    await write(dir, "a.jsonl", encoder.encode(JSONL));
    await write(dir, "a.jsonl.gz", gzipSync(JSONL));
    await rejectsWith(
      dir,
      /a\.jsonl and .*a\.jsonl\.gz hold the same data set file \(one compressed\)/,
      /Fix: keep one of them/,
    );
  });
});

Deno.test("gzip: truncated, corrupt and bad-checksum files name the file and byte offset", async () => {
  const text = Array.from({ length: 4000 }, (_, k) => JSON.stringify({ caption: `row ${k}` }))
    .join("\n");
  const good = new Uint8Array(gzipSync(text)); // a Uint8Array: Buffer's slice() is a view
  await withTempDir(async (dir) => {
    const truncated = await write(dir, "t.jsonl.gz", good.subarray(0, 2000));
    await rejectsWith(
      truncated,
      new RegExp(`^${truncated}: the gzip data ends at byte 2000 before the stream is complete`),
      /\(truncated; \d+ bytes inflated\)\. Fix: download or copy the file again/,
    );
    // Random hex barely compresses, so the damage lies a few input chunks into the file, and
    // zlib reports it there or, when the damaged bytes still decode, at the checksum.
    const hex = Array.from({ length: 100_000 }, () => crypto.randomUUID()).join("\n");
    const corrupt = new Uint8Array(gzipSync(hex));
    const damage = 1_500_000;
    corrupt.fill(0xff, damage, damage + 16);
    const corruptPath = await write(dir, "c.txt.gz", corrupt);
    const message = await rejectsWith(
      corruptPath,
      new RegExp(`^${corruptPath}: corrupt gzip data \\([^)]+\\), detected past compressed byte `),
      new RegExp(`offset \\d+ of ${corrupt.length} \\(\\d+ bytes inflated\\)\\. Fix: download`),
    );
    const offset = Number(message.match(/offset (\d+)/)![1]);
    assert.ok(offset >= 1 << 20 && offset < corrupt.length, `${offset}: past the first chunk`);
    const badCrc = good.slice();
    badCrc[good.length - 6] ^= 0xff;
    await rejectsWith(
      await write(dir, "crc.jsonl.gz", badCrc),
      /corrupt gzip data \(incorrect data check\), detected past compressed byte offset \d+/,
    );
    const shard = gzipSync(tarBytes(sprightSample("0", { caption: "x" })));
    const cutShard = await write(dir, "s.tar.gz", shard.subarray(0, shard.length - 10));
    await rejectsWith(cutShard, new RegExp(`^${cutShard}: the gzip data ends at byte`));
  });
});

Deno.test("gzip: a truncated file fails before the cache is touched; fixed, the run resumes", async () => {
  const text = Array.from({ length: 30 }, (_, k) => JSON.stringify({ caption: `row ${k}` }))
    .join("\n");
  await withTempDir(async (dir) => {
    const data = await write(dir, "captions.jsonl.gz", gzipSync(text));
    const out = join(dir, "cache");
    const options = { data, out, batchSize: 2, rowsPerShard: 4 };
    await assert.rejects(runCache(options, fakeTeacher({ failAfterBatches: 5 }), quiet));
    const partial = await readTree(out);
    assert.ok(partial.size > 1, "some shards were finished before the crash");
    await Deno.writeFile(data, gzipSync(text).subarray(0, 40));
    await assert.rejects(runCache(options, fakeTeacher(), quiet), /gzip data ends at byte 40/);
    assert.deepEqual(await readTree(out), partial, "the cache is as the crash left it");
    await Deno.writeFile(data, gzipSync(text));
    const resumed = await runCache(options, fakeTeacher(), quiet);
    const fresh = await cache(data, join(dir, "fresh"), { rowsPerShard: 4 });
    assert.equal(resumed.complete, true);
    assert.deepEqual(sameRows(resumed), sameRows(fresh));
  });
});

Deno.test("webdataset: {key}.txt captions, alone or beside a {key}.json", async () => {
  await withTempDir(async (dir) => {
    const image = { data: new Uint8Array(700) };
    // img2dataset's layout: the caption in .txt, download metadata (maybe a caption) in .json.
    const shard = await write(
      dir,
      "00000.tar.gz",
      gzipSync(tarBytes([
        { name: "a.jpg", ...image },
        { name: "a.json", data: '{"url":"http://x/a.jpg","caption":"json a"}' },
        { name: "a.txt", data: "txt a\nsecond line\n" },
        { name: "b.jpg", ...image },
        { name: "b.txt", data: "txt b" },
        { name: "c.json", data: '{"caption":"json c"}' },
        { name: "c.jpg", ...image },
      ])),
    );
    const byDefault = await readCaptionSet(shard);
    assert.deepEqual(rowsOf(byDefault.rows), [
      { id: "00000.tar:a", caption: "txt a\nsecond line" },
      { id: "00000.tar:b", caption: "txt b" },
      { id: "00000.tar:c", caption: "json c" },
    ]);
    const byField = await readCaptionSet(shard, { captionField: "caption" });
    assert.deepEqual(rowsOf(byField.rows), [
      { id: "00000.tar:a", caption: "json a" },
      { id: "00000.tar:b", caption: "txt b" },
      { id: "00000.tar:c", caption: "json c" },
    ]);
  });
});

async function write(dir: string, rel: string, bytes: Uint8Array): Promise<string> {
  const path = join(dir, rel);
  await Deno.mkdir(join(path, ".."), { recursive: true });
  await Deno.writeFile(path, bytes);
  return path;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}
