import assert from "node:assert/strict";
import { join } from "node:path";
import {
  captionHash,
  type CaptionRow,
  DataError,
  heldOutScore,
  readCaptions,
  readCaptionSet,
  type ReadCaptionsOptions,
  splitHeldOut,
} from "../../src/data/captions.ts";
import { withTempDir } from "../helpers.ts";
import { sprightSample, tarBytes, type TarEntry } from "./tar_fixture.ts";

const PROMPTS = new URL("../fixtures/prompts/", import.meta.url).pathname;
const PARQUET = new URL("./fixtures/captions.parquet", import.meta.url).pathname;

/** Writes `files` (relative path → text or bytes) under `dir`, making folders as needed. */
async function writeTree(dir: string, files: Record<string, string | Uint8Array>): Promise<void> {
  for (const [rel, content] of Object.entries(files)) {
    const path = join(dir, rel);
    await Deno.mkdir(join(path, ".."), { recursive: true });
    if (typeof content === "string") await Deno.writeTextFile(path, content);
    else await Deno.writeFile(path, content);
  }
}

/** Asserts `readCaptionSet` fails with a DataError whose message contains every part. */
async function rejectsWith(
  path: string,
  options: ReadCaptionsOptions,
  ...parts: (string | RegExp)[]
): Promise<void> {
  await assert.rejects(readCaptionSet(path, options), (error: Error) => {
    assert.ok(error instanceof DataError, `expected a DataError, got ${error.stack}`);
    for (const part of parts) {
      if (typeof part === "string") assert.ok(error.message.includes(part), error.message);
      else assert.match(error.message, part);
    }
    return true;
  });
}

const ids = (rows: CaptionRow[]) => rows.map((row) => row.id);
const captions = (rows: CaptionRow[]) => rows.map((row) => row.caption);

// ---------------------------------------------------------------- real prompt files (slices)

Deno.test("tsv: PartiPrompts slice, Prompt column, quotes kept as text", async () => {
  const set = await readCaptionSet(join(PROMPTS, "PartiPrompts.slice.tsv"));
  assert.equal(set.format, "tsv");
  assert.equal(set.rows.length, 38);
  assert.deepEqual(set.rows[0], {
    id: "PartiPrompts.slice.tsv:2",
    caption: "bond",
    source: join(PROMPTS, "PartiPrompts.slice.tsv"),
  });
  assert.equal(set.rows[10].caption, "Salvador Dalí");
  const giggle = set.rows.find((row) => row.caption.startsWith('"G I G G L E"'));
  assert.equal(
    giggle?.caption,
    '"G I G G L E" painted in thick colorful lettering as graffiti on a faded red brick wall ' +
      "with a splotch of exploding white paint.",
  );
  assert.deepEqual(set.warnings, []);
});

Deno.test("csv: DrawBench slice, Prompts column, quoted commas, no final newline", async () => {
  const rows = await readCaptions(join(PROMPTS, "DrawBench.slice.csv"));
  assert.equal(rows.length, 25);
  assert.equal(
    rows[8].caption,
    "A stack of 3 plates. A blue plate is on the top, sitting on a blue plate. The blue plate " +
      "is in the middle, sitting on a green plate. The green plate is on the bottom.",
  );
  assert.ok(rows[21].caption.includes("Bismarck-Schönhausen, Duke of Lauenburg"));
  assert.equal(rows[21].id, "DrawBench.slice.csv:23");
  assert.equal(
    rows.at(-1)?.caption,
    "New York Skyline with 'Google Research Pizza Cafe' written with fireworks on the sky.",
  );
  const category = await readCaptions(join(PROMPTS, "DrawBench.slice.csv"), {
    captionField: "Category",
  });
  assert.equal(category[0].caption, "DALL-E");
});

Deno.test("jsonl: GenEval metadata slice, prompt field", async () => {
  const rows = await readCaptions(join(PROMPTS, "geneval_evaluation_metadata.slice.jsonl"));
  assert.equal(rows.length, 20);
  assert.deepEqual(rows[0], {
    id: "geneval_evaluation_metadata.slice.jsonl:1",
    caption: "a photo of a bench",
    source: join(PROMPTS, "geneval_evaluation_metadata.slice.jsonl"),
  });
});

Deno.test("lines: T2I-CompBench CRLF file; dedupe drops its 5 repeated lines", async () => {
  const path = join(PROMPTS, "t2i-compbench_color_val_unseen.txt");
  const all = await readCaptionSet(path);
  assert.equal(all.format, "lines");
  assert.equal(all.rows.length, 100);
  assert.ok(all.rows.every((row) => !row.caption.includes("\r")));
  const unique = await readCaptionSet(path, { dedupe: true });
  assert.equal(unique.rows.length, 95);
  assert.equal(unique.skipped.duplicate, 5);
  assert.equal(new Set(captions(unique.rows)).size, 95);
  assert.match(unique.warnings.join("\n"), /skipped 5 duplicate captions \(dedupe\), first: /);
  // The first occurrence stays, in file order.
  const firstIds = new Map<string, string>();
  for (const row of all.rows) if (!firstIds.has(row.caption)) firstIds.set(row.caption, row.id);
  assert.deepEqual(ids(unique.rows), [...firstIds.values()]);
});

// ---------------------------------------------------------------- kohya folders

Deno.test("kohya: image + same-name .txt in subfolders; orphans, extra lines, empties", async () => {
  await withTempDir(async (dir) => {
    // Written out of order: reading order must come from sorted paths, not from the disk.
    await writeTree(dir, {
      "20_style/b.webp": new Uint8Array([1]),
      "20_style/b.txt": "watercolour of a lighthouse\n",
      "10_concept/img002.JPG": new Uint8Array([1]),
      "10_concept/img002.txt": "first line is the caption\nsecond line ignored\n",
      "10_concept/img001.png": new Uint8Array([1]),
      "10_concept/img001.txt": "\uFEFF  a red cube on a blue sphere \r\n", // BOM, as Notepad saves
      "10_concept/img003.png": new Uint8Array([1]),
      "10_concept/img003.txt": "   \n",
      "10_concept/no_caption.png": new Uint8Array([1]),
      "sample_prompts.txt": "a prompt for sample images, not a caption",
      ".hidden/x.png": new Uint8Array([1]),
      ".hidden/x.txt": "hidden folders are skipped",
    });
    const set = await readCaptionSet(dir);
    assert.equal(set.format, "kohya");
    assert.deepEqual(set.rows, [
      {
        id: "10_concept/img001",
        caption: "a red cube on a blue sphere",
        source: join(dir, "10_concept/img001.txt"),
      },
      {
        id: "10_concept/img002",
        caption: "first line is the caption",
        source: join(dir, "10_concept/img002.txt"),
      },
      {
        id: "20_style/b",
        caption: "watercolour of a lighthouse",
        source: join(dir, "20_style/b.txt"),
      },
    ]);
    assert.deepEqual(set.skipped, { empty: 1, duplicate: 0, noImage: 1 });
    const warnings = set.warnings.join("\n");
    assert.match(warnings, /1 caption files have more than one line: only the first line/);
    assert.match(warnings, /1 images have no \.txt caption/);
    assert.match(warnings, /skipped 1 empty captions, first: 10_concept\/img003/);
    assert.match(
      warnings,
      /skipped 1 \.txt files with no same-name image.*first: sample_prompts\.txt/,
    );
    // Deterministic: a second read is identical.
    assert.deepEqual(await readCaptions(dir), set.rows);
  });
});

Deno.test("kohya: a folder of .txt files without images asks for --format lines", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, { "a.txt": "one\ntwo\n", "sub/b.txt": "three\n" });
    await rejectsWith(dir, {}, dir, "no images", "Fix: set --format lines");
    const rows = await readCaptions(dir, { format: "lines" });
    assert.deepEqual(ids(rows), ["a.txt:1", "a.txt:2", "sub/b.txt:1"]);
    assert.deepEqual(captions(rows), ["one", "two", "three"]);
  });
});

// ---------------------------------------------------------------- Hugging Face ImageFolder

Deno.test("imagefolder: metadata.jsonl and metadata.csv, ids are image paths", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, {
      "train/metadata.jsonl": '{"file_name": "0001.png", "text": "a photo of a cow"}\n' +
        '{"file_name": "sub/0002.png", "text": "a photo of a bench", "extra": 1}\n',
      "train/0001.png": new Uint8Array([1]),
      "test/metadata.csv": 'file_name,text\n0003.png,"a red car, parked"\n',
    });
    const set = await readCaptionSet(dir);
    assert.equal(set.format, "imagefolder");
    assert.deepEqual(ids(set.rows), ["test/0003.png", "train/0001.png", "train/sub/0002.png"]);
    assert.deepEqual(captions(set.rows), [
      "a red car, parked",
      "a photo of a cow",
      "a photo of a bench",
    ]);
    await writeTree(dir, { "test/metadata.csv": "name,text\n0003.png,x\n" });
    await rejectsWith(
      dir,
      {},
      `${join(dir, "test/metadata.csv")}:2: ImageFolder metadata needs a "file_name"`,
      'Fix: add "file_name"',
    );
  });
});

// ---------------------------------------------------------------- WebDataset (SPRIGHT)

/** The 24 real SPRIGHT-COCO samples of the fixture, plus one synthetic Segment-Anything sample. */
async function writeSprightShards(dir: string): Promise<void> {
  const lines = (await Deno.readTextFile(join(PROMPTS, "spright_coco_sample24.jsonl")))
    .trim().split("\n").map((line) => JSON.parse(line));
  const samples = lines.map((sample): TarEntry[] => {
    const key = sample.image.split("/").at(-1).replace(".jpg", "");
    const { spatial_caption, original_caption } = sample;
    return sprightSample(key, { spatial_caption, original_caption });
  });
  const sa = sprightSample("sa_223750", {
    spatial_caption: "A woman stands to the left of a bicycle.",
    coca_caption: "a woman with a bicycle",
  });
  await writeTree(dir, {
    "data/00000.tar": tarBytes(samples.slice(0, 12).flat()),
    "data/00001.tar": tarBytes([...samples.slice(12).flat(), ...sa]),
    "metadata.json": '[{"file": "00000.tar", "size": 12, "split": "train"}]',
  });
}

Deno.test("webdataset: SPRIGHT shards with spatial, original (coca fallback), both, coca", async () => {
  await withTempDir(async (dir) => {
    await writeSprightShards(dir);
    const jsonl = (await Deno.readTextFile(join(PROMPTS, "spright_coco_sample24.jsonl")))
      .trim().split("\n").map((line) => JSON.parse(line));

    const spatial = await readCaptionSet(dir, { spright: "spatial" });
    assert.equal(spatial.format, "webdataset");
    assert.deepEqual(spatial.files, [join(dir, "data/00000.tar"), join(dir, "data/00001.tar")]);
    assert.equal(spatial.rows.length, 25);
    assert.deepEqual(spatial.rows[0], {
      id: "data/00000.tar:0#spatial_caption",
      caption: jsonl[0].spatial_caption,
      source: join(dir, "data/00000.tar"),
    });
    assert.deepEqual(captions(spatial.rows.slice(0, 24)), jsonl.map((s) => s.spatial_caption));

    const original = await readCaptions(dir, { spright: "original" });
    assert.deepEqual(
      captions(original),
      [...jsonl.map((s) => s.original_caption.trim()), "a woman with a bicycle"],
    );
    assert.equal(original.at(-1)?.id, "data/00001.tar:sa_223750#coca_caption");

    const both = await readCaptions(dir, { spright: "both" });
    assert.equal(both.length, 50);
    assert.deepEqual(ids(both.slice(0, 2)), [
      "data/00000.tar:0#spatial_caption",
      "data/00000.tar:0#original_caption",
    ]);
    // A caption's id does not depend on the choice that read it.
    assert.deepEqual(ids(both.filter((_, k) => k % 2 === 0)), ids(spatial.rows));

    await rejectsWith(
      dir,
      { spright: "coca" },
      `${join(dir, "data/00000.tar")}: member "0.json" (byte offset 3584)`,
      'needs "coca_caption", which this record lacks; it has "spatial_caption", "original_caption"',
      "Fix: choose another --spright value",
    );

    const byDefault = await readCaptionSet(dir);
    assert.deepEqual(byDefault.rows, spatial.rows);
    assert.match(byDefault.warnings[0], /using spatial_caption \(set --spright/);
  });
});

Deno.test("webdataset: bad JSON member, non-UTF-8 member and corrupt shard name the place", async () => {
  await withTempDir(async (dir) => {
    const shard = join(dir, "00000.tar");
    await Deno.writeFile(shard, tarBytes([{ name: "7.json", data: "{not json" }]));
    await rejectsWith(shard, {}, `${shard}: member "7.json" (byte offset 0): not valid JSON`);
    const latin1 = new Uint8Array([
      ...new TextEncoder().encode('{"caption":"caf'),
      0xe9,
      0x22,
      0x7d,
    ]);
    await Deno.writeFile(shard, tarBytes([{ name: "8.json", data: latin1 }]));
    await rejectsWith(
      shard,
      {},
      `${shard}: member "8.json" (byte offset 0), line 1: not valid UTF-8`,
    );
    const good = tarBytes(sprightSample("9", { spatial_caption: "x", original_caption: "y" }));
    good[3584 + 3] ^= 0x55; // the header of 9.json, after the image's header and 6 data blocks
    await Deno.writeFile(shard, good);
    await rejectsWith(shard, {}, `${shard}: byte offset 3584: not a tar header`, "Fix:");
  });
});

Deno.test("webdataset: shards with no {key}.json or {key}.txt say what they hold", async () => {
  await withTempDir(async (dir) => {
    const shard = join(dir, "only-images.tar");
    await Deno.writeFile(
      shard,
      tarBytes([{ name: "0.jpg", data: "x" }, { name: "0.cls", data: "7" }]),
    );
    await rejectsWith(
      shard,
      {},
      `${shard}: no captions found (read as webdataset, 1 file)`,
      "no {key}.json or {key}.txt caption members (member extensions: .cls, .jpg)",
    );
  });
});

// ---------------------------------------------------------------- parquet

Deno.test("parquet: text column by default; nulls and blanks skipped; row ids across groups", async () => {
  const set = await readCaptionSet(PARQUET);
  assert.equal(set.format, "parquet");
  assert.deepEqual(ids(set.rows), [
    "captions.parquet:0",
    "captions.parquet:3",
    "captions.parquet:4",
    "captions.parquet:5",
  ]);
  assert.deepEqual(captions(set.rows), [
    "a photo of a bench",
    "a corgi’s head depicted as an explosion of a nebula",
    "Salvador Dalí with a robotic half face",
    "a photo of a bench",
  ]);
  assert.equal(set.skipped.empty, 2);
  assert.equal((await readCaptions(PARQUET, { dedupe: true })).length, 3);
});

Deno.test("parquet: missing column, non-text column and non-UTF-8 bytes are errors", async () => {
  await rejectsWith(
    PARQUET,
    { captionField: "caption" },
    `${PARQUET} (columns): caption field "caption" is missing. Fields present: "text", "score", "raw"`,
  );
  await rejectsWith(
    PARQUET,
    { captionField: "score" },
    `${PARQUET}: row 0: caption field "score" holds a number, not text`,
  );
  await rejectsWith(
    PARQUET,
    { captionField: "raw" },
    `${PARQUET}: row 2, column "raw", line 1: not valid UTF-8`,
    "Fix: re-save the text as UTF-8",
  );
  await withTempDir(async (dir) => {
    const cut = join(dir, "cut.parquet");
    await Deno.writeFile(cut, (await Deno.readFile(PARQUET)).subarray(0, 500));
    await rejectsWith(cut, {}, `${cut}: not a readable parquet file (`, "Fix: check the file");
  });
});

// ---------------------------------------------------------------- errors and edge cases

Deno.test("empty data set: names the path and the formats looked for", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, { "README.md": "no captions here", "img.png": new Uint8Array([1]) });
    await rejectsWith(
      dir,
      {},
      `${dir}: no caption files found. Formats looked for: kohya (images with same-name .txt`,
      "webdataset (.tar shards of {key}.json or {key}.txt), parquet (a text column); all but " +
        "kohya and parquet also gzip-compressed (.gz, .tgz)",
    );
    const path = join(dir, "blank.jsonl");
    await Deno.writeTextFile(path, '{"caption": ""}\n\n{"caption": null}\n');
    await rejectsWith(
      path,
      {},
      `${path}: no captions found (read as jsonl, 1 file); skipped 2 empty captions, first: ` +
        "blank.jsonl:1, blank.jsonl:3. Formats looked for:",
    );
  });
});

Deno.test("caption field missing: names the file, line, field and the fields present", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "a.jsonl");
    await Deno.writeTextFile(path, '{"Prompt": "x", "tag": 1}\n');
    await rejectsWith(
      path,
      { captionField: "prompt" },
      `${path}:1: caption field "prompt" is missing. Fields present: "Prompt", "tag". ` +
        'Fix: set --caption-field (captionField) to one of them (closest: "Prompt").',
    );
    await Deno.writeTextFile(path, '{"url": "x", "tag": 1}\n');
    await rejectsWith(
      path,
      {},
      `${path}:1: no caption field: none of the default fields "caption", "text", "prompt", ` +
        '"prompts" is present. Fields present: "url", "tag".',
    );
    await Deno.writeTextFile(path, '{"caption": "x"}\n{"text": "y"}\n');
    await rejectsWith(
      path,
      {},
      `${path}:2: caption field "caption" is missing from this record, which has "text".`,
    );
    await Deno.writeTextFile(path, '{"caption": ["x", "y"]}\n');
    await rejectsWith(path, {}, `${path}:1: caption field "caption" holds a list, not text.`);
  });
});

Deno.test("non-UTF-8 captions: the error names the file and line", async () => {
  await withTempDir(async (dir) => {
    const bytes = new Uint8Array([
      ...new TextEncoder().encode("fine\nalso fine\n"),
      ...[0x63, 0x61, 0x66, 0xe9, 0x0a], // "café" in Latin-1
    ]);
    const lines = join(dir, "prompts.txt");
    await Deno.writeFile(lines, bytes);
    await rejectsWith(lines, {}, `${lines}:3: not valid UTF-8. Fix: re-save the text as UTF-8`);
    const csv = join(dir, "c.csv");
    await Deno.writeFile(csv, new Uint8Array([...new TextEncoder().encode("caption\n"), ...bytes]));
    await rejectsWith(csv, {}, `${csv}:4: not valid UTF-8`);
    await writeTree(dir, { "k/a.png": new Uint8Array([1]), "k/a.txt": bytes.subarray(15) });
    await rejectsWith(join(dir, "k"), {}, `${join(dir, "k/a.txt")}:1: not valid UTF-8`);
  });
});

Deno.test("a 100,000-character caption passes through unchanged", async () => {
  await withTempDir(async (dir) => {
    const long = "a very long caption ".repeat(5000).trim() + " end";
    assert.ok(long.length >= 100_000);
    await Deno.writeTextFile(join(dir, "l.jsonl"), JSON.stringify({ caption: long }) + "\n");
    await Deno.writeTextFile(join(dir, "l.txt"), `short\n${long}\n`);
    await Deno.writeFile(
      join(dir, "l.tar"),
      tarBytes([{ name: "0.json", data: JSON.stringify({ caption: long }) }]),
    );
    assert.equal((await readCaptions(join(dir, "l.jsonl")))[0].caption, long);
    assert.equal((await readCaptions(join(dir, "l.txt")))[1].caption, long);
    assert.equal((await readCaptions(join(dir, "l.tar")))[0].caption, long);
  });
});

Deno.test("empty lines are skipped and counted with their ids", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "p.txt");
    await Deno.writeTextFile(path, "one\n\n   \ntwo\r\n\n");
    const set = await readCaptionSet(path);
    assert.deepEqual(ids(set.rows), ["p.txt:1", "p.txt:4"]);
    assert.equal(set.skipped.empty, 3);
    assert.deepEqual(set.warnings, ["skipped 3 empty captions, first: p.txt:2, p.txt:3, p.txt:5"]);
  });
});

Deno.test("format detection: ambiguous folders, unknown extensions, bad options", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, { "a.jsonl": '{"caption":"x"}\n', "b.csv": "caption\ny\n" });
    await rejectsWith(
      dir,
      {},
      `${dir}: the folder fits more than one format: jsonl (1 file, e.g. a.jsonl); csv (1 file, ` +
        "e.g. b.csv). Fix: set --format to one of jsonl, csv.",
    );
    assert.deepEqual(captions(await readCaptions(dir, { format: "csv" })), ["y"]);
    const odd = join(dir, "captions.dat");
    await Deno.writeTextFile(odd, "x");
    await rejectsWith(odd, {}, `${odd}: the extension does not tell the format. Fix: set --format`);
    assert.deepEqual(captions(await readCaptions(odd, { format: "lines" })), ["x"]);
    await rejectsWith(join(dir, "missing"), {}, "missing: no such file or folder");
    await rejectsWith(dir, { format: "xml" as never }, 'unknown format "xml"');
    await rejectsWith(dir, { spright: "all" as never }, 'unknown SPRIGHT choice "all"');
    await rejectsWith(dir, { spright: "both", captionField: "x" }, "give only one");
    await rejectsWith(odd, { format: "lines", captionField: "x" }, "drop --caption-field");
  });
});

// ---------------------------------------------------------------- hashing and the split

Deno.test("captionHash is SHA-256 hex of the UTF-8 caption (matches Python hashlib)", () => {
  assert.equal(
    captionHash("a photo of a bench"),
    "7f90b3761dc9d5d4d4cf4dee4ae5d951534da89ce9380264c48084e413ada49e",
  );
  assert.equal(
    captionHash("Salvador Dalí with a robotic half face"),
    "60cce76c3f1da136db9c4b132d174714146bf46f0646bdeef4746bbcf684b022",
  );
});

Deno.test("heldOutScore matches the Python rule in datasets.md", () => {
  // int.from_bytes(hashlib.sha256(salt.encode() + b"\0" + caption.encode()).digest()[:6], "big") / 2**48
  assert.equal(heldOutScore("a photo of a bench"), 0.062396978292699856);
  assert.equal(heldOutScore("Salvador Dalí with a robotic half face"), 0.6453756808676374);
  assert.equal(heldOutScore("a photo of a bench", "v1"), 0.501265188671951);
  assert.equal(heldOutScore("Salvador Dalí with a robotic half face", "v1"), 0.34994396375325465);
});

Deno.test("splitHeldOut: stable by caption, order-independent, about the fraction", async () => {
  const rows = await readCaptions(join(PROMPTS, "t2i-compbench_color_val_unseen.txt"));
  const many: CaptionRow[] = Array.from({ length: 4000 }, (_, k) => ({
    id: `x:${k}`,
    caption: `caption number ${k}`,
    source: "x",
  }));
  const { train, heldOut } = splitHeldOut(many, { fraction: 0.1 });
  assert.equal(train.length + heldOut.length, many.length);
  assert.ok(heldOut.length > 320 && heldOut.length < 480, `held out ${heldOut.length} of 4000`);
  assert.deepEqual(ids(train), ids(many.filter((row) => !heldOut.includes(row))));

  const reversed = splitHeldOut([...many].reverse(), { fraction: 0.1 });
  assert.deepEqual(new Set(ids(reversed.heldOut)), new Set(ids(heldOut)));

  const real = splitHeldOut(rows, { fraction: 0.3 });
  const side = new Map<string, boolean>();
  for (const row of real.heldOut) side.set(row.caption, true);
  for (const row of real.train) assert.ok(!side.has(row.caption), "a caption straddles the split");

  const salted = splitHeldOut(many, { fraction: 0.1, salt: "v1" });
  assert.notDeepEqual(ids(salted.heldOut), ids(heldOut));
  assert.equal(splitHeldOut(many, { fraction: 0 }).heldOut.length, 0);
  assert.equal(splitHeldOut(many, { fraction: 1 }).train.length, 0);
  assert.throws(() => splitHeldOut(many, { fraction: 1.5 }), /fraction 1\.5 is not in \[0, 1\]/);
  assert.throws(() => splitHeldOut(many, { fraction: NaN }), DataError);
});
