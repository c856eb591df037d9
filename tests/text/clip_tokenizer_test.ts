import assert from "node:assert/strict";
import { join } from "node:path";
import {
  CLIP_SEQUENCE_LENGTH,
  type ClipTokenizer,
  loadClipTokenizer,
  normalizeClipText,
} from "../../src/text/clip_tokenizer.ts";
import { readPromptSample } from "./prompt_sample.ts";

const FOLDER = new URL("../../data/clip-tokenizer/", import.meta.url).pathname;
const BOS = 49406;
const EOS = 49407;

const tokenizerPromise = loadClipTokenizer(FOLDER);
const vocabPromise = Deno.readTextFile(join(FOLDER, "vocab.json")).then(
  (text) => JSON.parse(text) as Record<string, number>,
);

/** The content ids of a caption (between BOS and EOS). */
function contentIds(tokenizer: ClipTokenizer, text: string): number[] {
  const { ids, length } = tokenizer.encode(text);
  return Array.from(ids.subarray(1, length - 1));
}

/** Ids of BPE tokens looked up in vocab.json, so expectations read as tokens. */
async function vocabIds(tokens: string[]): Promise<number[]> {
  const vocab = await vocabPromise;
  return tokens.map((token) => {
    assert.ok(token in vocab, `test expects ${token} in vocab.json`);
    return vocab[token];
  });
}

Deno.test("CLIP: 'a photo of a cat' gives BOS, 5 tokens, EOS, then EOS padding", async () => {
  const tokenizer = await tokenizerPromise;
  const { ids, length, truncated } = tokenizer.encode("a photo of a cat");
  assert.equal(ids.length, CLIP_SEQUENCE_LENGTH);
  assert.deepEqual(Array.from(ids.subarray(0, 7)), [BOS, 320, 1125, 539, 320, 2368, EOS]);
  assert.ok(ids.subarray(7).every((id) => id === EOS));
  assert.equal(length, 7);
  assert.equal(truncated, false);
  assert.equal(tokenizer.padId, EOS);
});

Deno.test("CLIP: hand-checked pieces (apostrophes, digits, punctuation, caps, accents)", async () => {
  const tokenizer = await tokenizerPromise;
  const cases: [string, string[]][] = [
    ["it's", ["it</w>", "'s</w>"]],
    ["2 dogs", ["2</w>", "dogs</w>"]],
    ["2024", ["2</w>", "0</w>", "2</w>", "4</w>"]],
    ["A PHOTO OF A CAT", ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]],
    ["cat, dog.", ["cat</w>", ",</w>", "dog</w>", ".</w>"]],
    ["wow!!", ["wow</w>", "!!</w>"]],
    // é is the bytes C3 A9, shown as Ã© by GPT-2's byte-to-unicode table.
    ["Café", ["cafÃ©</w>"]],
    ["we've", ["we</w>", "'ve</w>"]],
  ];
  for (const [text, tokens] of cases) {
    assert.deepEqual(contentIds(tokenizer, text), await vocabIds(tokens), text);
  }
});

Deno.test("CLIP: ids agree with openai/CLIP's simple_tokenizer algorithm", async () => {
  // Expected ids were produced once with a Python port of openai/CLIP's
  // simple_tokenizer.py (the `regex` module, NFC in place of ftfy, the same
  // vocab.json/merges.txt); the same script agreed with this tokenizer on
  // ~20k prompts from shared/data/prompts.
  const tokenizer = await tokenizerPromise;
  const cases: [string, number[]][] = [
    ["It's 2 dogs!!", [585, 568, 273, 3255, 748]],
    ["Café naïve résumé", [15304, 1097, 35689, 563, 29106, 7054, 4166]],
    ["日本語 テスト 😀", [39121, 44353, 34002, 508, 2429, 228, 32421, 486, 7334]],
    ["a red-haired woman, 35mm f/1.8 (bokeh) #art", [
      320,
      736,
      268,
      27202,
      2308,
      267,
      274,
      276,
      2848,
      325,
      270,
      272,
      269,
      279,
      263,
      647,
      36983,
      264,
      258,
      794,
    ]],
    ["don't you're we've I'M they'll he'd", [
      847,
      713,
      592,
      982,
      649,
      1200,
      328,
      880,
      889,
      1342,
      797,
      1896,
    ]],
    ["<|startoftext|>hi", [BOS, 1883]],
  ];
  for (const [text, expected] of cases) {
    assert.deepEqual(contentIds(tokenizer, text), expected, text);
  }
});

Deno.test("CLIP: normalisation is NFC, collapsed whitespace, stripped, lower case", async () => {
  const tokenizer = await tokenizerPromise;
  assert.equal(normalizeClipText("  A\u00a0Photo\t\n OF  cafe\u0301 "), "a photo of café");
  assert.deepEqual(
    tokenizer.encode("  A \t photo\n\nOF a CAT  ").ids,
    tokenizer.encode("a photo of a cat").ids,
  );
  assert.deepEqual(tokenizer.encode("cafe\u0301").ids, tokenizer.encode("café").ids);
  const empty = tokenizer.encode("   ");
  assert.equal(empty.length, 2);
  assert.deepEqual(Array.from(empty.ids.subarray(0, 3)), [BOS, EOS, EOS]);
});

Deno.test("CLIP: long captions keep 75 tokens, end with EOS and report truncation", async () => {
  const tokenizer = await tokenizerPromise;
  // "cat " is one token, so n copies are n tokens.
  const exact = tokenizer.encode("cat ".repeat(75));
  assert.equal(exact.length, 77);
  assert.equal(exact.truncated, false);
  assert.equal(exact.ids[76], EOS);

  const over = tokenizer.encode("cat ".repeat(76));
  assert.equal(over.length, 77);
  assert.equal(over.truncated, true);
  assert.deepEqual(over.ids, exact.ids);

  const long = tokenizer.encode("a photo of a cat, ".repeat(30));
  assert.equal(long.ids.length, 77);
  assert.equal(long.ids[76], EOS);
  assert.equal(long.truncated, true);
  const pattern = [320, 1125, 539, 320, 2368, 267];
  assert.deepEqual(
    Array.from(long.ids.subarray(1, 76)),
    Array.from({ length: 75 }, (_, i) => pattern[i % pattern.length]),
  );
});

Deno.test("CLIP: a 100k-character caption is cut early and gives 77 ids", async () => {
  const tokenizer = await tokenizerPromise;
  const caption = "A photo of a cat sitting on a red sofa, ".repeat(2500);
  assert.ok(caption.length >= 100_000);
  const start = performance.now();
  const { ids, length, truncated } = tokenizer.encode(caption);
  const elapsed = performance.now() - start;
  assert.equal(ids.length, 77);
  assert.equal(length, 77);
  assert.equal(truncated, true);
  assert.equal(ids[76], EOS);
  assert.ok(elapsed < 500, `100k-character caption took ${elapsed.toFixed(0)} ms`);
});

Deno.test("CLIP: tokenizer_2 pads with '!' (id 0) from its config or an option", async () => {
  const folder = await Deno.makeTempDir({ prefix: "clip-tokenizer_2-" });
  try {
    for (const file of ["vocab.json", "merges.txt", "tokenizer_config.json"]) {
      await Deno.copyFile(join(FOLDER, file), join(folder, file));
    }
    const specialTokens = JSON.parse(
      await Deno.readTextFile(join(FOLDER, "special_tokens_map.json")),
    );
    specialTokens.pad_token = "!";
    await Deno.writeTextFile(
      join(folder, "special_tokens_map.json"),
      JSON.stringify(specialTokens),
    );

    const fromConfig = await loadClipTokenizer(folder);
    const fromOption = await loadClipTokenizer(FOLDER, { padToken: "!" });
    for (const tokenizer of [fromConfig, fromOption]) {
      assert.equal(tokenizer.padId, 0);
      assert.equal(tokenizer.padToken, "!");
      const { ids, length } = tokenizer.encode("a photo of a cat");
      assert.equal(length, 7);
      assert.deepEqual(Array.from(ids.subarray(0, 7)), [BOS, 320, 1125, 539, 320, 2368, EOS]);
      assert.ok(ids.subarray(7).every((id) => id === 0));
      assert.equal(tokenizer.decode(ids), "a photo of a cat");
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("CLIP: encodeBatch stacks encode rows", async () => {
  const tokenizer = await tokenizerPromise;
  const captions = ["a photo of a cat", "", "dog ".repeat(100)];
  const batch = tokenizer.encodeBatch(captions);
  assert.equal(batch.batchSize, 3);
  assert.equal(batch.sequenceLength, 77);
  assert.equal(batch.ids.length, 3 * 77);
  captions.forEach((caption, b) => {
    const single = tokenizer.encode(caption);
    assert.deepEqual(batch.ids.slice(b * 77, (b + 1) * 77), single.ids);
    assert.equal(batch.lengths[b], single.length);
    assert.equal(batch.truncated[b], single.truncated);
  });
  assert.deepEqual(batch.lengths, [7, 2, 77]);
  assert.deepEqual(batch.truncated, [false, false, true]);
});

Deno.test("CLIP: decode(encode(p)) round-trips 300 PartiPrompts up to CLIP's spacing", async () => {
  const tokenizer = await tokenizerPromise;
  const prompts = await readPromptSample();
  assert.equal(prompts.length, 300);
  const noSpace = (text: string) => text.replace(/\s+/g, "");
  let checked = 0;
  for (const prompt of prompts) {
    const encoded = tokenizer.encode(prompt);
    if (encoded.truncated) continue;
    checked++;
    const decoded = tokenizer.decode(encoded.ids);
    // CLIP decodes every piece as a word ("it's" -> "it 's"), so compare
    // without spaces, and check that the decoded text tokenizes the same.
    assert.equal(noSpace(decoded), noSpace(normalizeClipText(prompt)), prompt);
    assert.equal(decoded, normalizeClipText(decoded), prompt);
    assert.deepEqual(tokenizer.encode(decoded).ids, encoded.ids, prompt);
  }
  assert.ok(checked >= 290, `only ${checked} prompts were short enough`);
});

Deno.test("CLIP: clear errors for missing files and bad input", async () => {
  const tokenizer = await tokenizerPromise;
  const folder = await Deno.makeTempDir({ prefix: "clip-tokenizer-missing-" });
  try {
    await assert.rejects(loadClipTokenizer(folder), (err: Error) => {
      assert.match(err.message, /vocab\.json/);
      assert.ok(err.message.includes(folder), err.message);
      return true;
    });
    await Deno.copyFile(join(FOLDER, "vocab.json"), join(folder, "vocab.json"));
    await assert.rejects(loadClipTokenizer(folder), (err: Error) => {
      assert.match(err.message, /merges\.txt/);
      assert.ok(err.message.includes(folder), err.message);
      return true;
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
  await assert.rejects(loadClipTokenizer(FOLDER, { padToken: "<pad>" }), /pad token "<pad>"/);
  assert.throws(() => tokenizer.encode(42 as unknown as string), /must be a string, got number/);
  assert.throws(
    () => tokenizer.encodeBatch(["ok", null as unknown as string]),
    /caption 1 must be a string, got null/,
  );
  assert.throws(() => tokenizer.decode([BOS, 60000]), /id 60000 .* not in the vocabulary/);
});
