import assert from "node:assert/strict";
import { join } from "node:path";
import {
  loadQwenTokenizer,
  loadQwenTokenizerFromPackage,
  QWEN_DEFAULT_MAX_TOKENS,
  type QwenPromptMode,
  readQwenPackageFiles,
} from "../../src/text/qwen_tokenizer.ts";
import { readPromptSample } from "./prompt_sample.ts";

const IM_START = 151644;
const IM_END = 151645;
const ENDOFTEXT = 151643;
/** "user", "\n" */
const USER_HEADER = [IM_START, 872, 198];
/** "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "<think>", "\n\n", "</think>", "\n\n" */
const ASSISTANT_SUFFIX = [IM_END, 198, IM_START, 77091, 198, 151667, 271, 151668, 271];

const tokenizerPromise = loadQwenTokenizerFromPackage();

Deno.test("Qwen: special tokens and pad id", async () => {
  const tokenizer = await tokenizerPromise;
  assert.equal(tokenizer.tokenToId("<|im_start|>"), IM_START);
  assert.equal(tokenizer.tokenToId("<|im_end|>"), IM_END);
  assert.equal(tokenizer.tokenToId("<think>"), 151667);
  assert.equal(tokenizer.tokenToId("</think>"), 151668);
  assert.equal(tokenizer.padToken, "<|endoftext|>");
  assert.equal(tokenizer.padId, ENDOFTEXT);
});

Deno.test("Qwen: chat template with thinking disabled", async () => {
  const tokenizer = await tokenizerPromise;
  assert.equal(
    tokenizer.renderPrompt("a cat"),
    "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
  );
  assert.equal(tokenizer.renderPrompt("a cat", "raw"), "a cat");
});

Deno.test("Qwen: known ids for short strings, from tokenizer.json's vocabulary", async () => {
  const tokenizer = await tokenizerPromise;
  // Byte-level BPE: a leading space is "Ġ", a newline "Ċ".
  const vocab: [string, number][] = [
    ["Hello", 9707],
    ["Ġworld", 1879],
    ["a", 64],
    ["Ġcat", 8251],
    ["user", 872],
    ["assistant", 77091],
    ["Ċ", 198],
    ["ĊĊ", 271],
  ];
  for (const [token, id] of vocab) assert.equal(tokenizer.tokenToId(token), id, token);
  assert.deepEqual(Array.from(tokenizer.encode("Hello", { mode: "raw" }).ids), [9707]);
  assert.deepEqual(Array.from(tokenizer.encode("Hello world", { mode: "raw" }).ids), [9707, 1879]);
  assert.deepEqual(Array.from(tokenizer.encode("a cat", { mode: "raw" }).ids), [64, 8251]);
  assert.equal(tokenizer.decode([9707, 1879]), "Hello world");
  assert.deepEqual(
    Array.from(tokenizer.encode("a cat").ids),
    [...USER_HEADER, 64, 8251, ...ASSISTANT_SUFFIX],
  );
});

Deno.test("Qwen: raw vs chat mode around the same caption", async () => {
  const tokenizer = await tokenizerPromise;
  for (const caption of ["A red cube on top of a blue sphere.", "two dogs, 3 cats"]) {
    const raw = Array.from(tokenizer.encode(caption, { mode: "raw" }).ids);
    const chat = Array.from(tokenizer.encode(caption, { mode: "chat" }).ids);
    assert.deepEqual(chat, [...USER_HEADER, ...raw, ...ASSISTANT_SUFFIX], caption);
    assert.deepEqual(Array.from(tokenizer.encode(caption).ids), chat, "chat is the default");
  }
});

Deno.test("Qwen: encode/decode round-trips 300 PartiPrompts", async () => {
  const tokenizer = await tokenizerPromise;
  const prompts = await readPromptSample();
  for (const prompt of prompts) {
    const { ids, truncated } = tokenizer.encode(prompt, { mode: "raw" });
    assert.equal(truncated, false);
    assert.equal(tokenizer.decode(ids), prompt.normalize("NFC"), prompt);
  }
  const chat = tokenizer.encode(prompts[7]).ids;
  assert.equal(tokenizer.decode(chat), tokenizer.renderPrompt(prompts[7]));
  assert.equal(tokenizer.decode(chat, { skipSpecialTokens: true }).includes("<|im_start|>"), false);
});

Deno.test("Qwen: truncation to maxTokens is reported, not printed", async () => {
  const tokenizer = await tokenizerPromise;
  const caption = "a photo of a cat on a red sofa, ".repeat(3000);
  const start = performance.now();
  const chat = tokenizer.encode(caption);
  const elapsed = performance.now() - start;
  assert.ok(elapsed < 2000, `100k-character caption took ${elapsed.toFixed(0)} ms`);
  assert.equal(QWEN_DEFAULT_MAX_TOKENS, 256);
  assert.ok(chat.ids.length <= 256 && chat.ids.length >= 250, `${chat.ids.length} tokens`);
  assert.equal(chat.truncated, true);
  assert.deepEqual(Array.from(chat.ids.subarray(0, 3)), USER_HEADER);
  // The caption is cut, not the template: the assistant turn still closes the prompt.
  const ending = tokenizer.encode("a cat").ids.slice(-9);
  assert.deepEqual(Array.from(chat.ids.slice(-9)), Array.from(ending));
  assert.throws(
    () => tokenizer.encode(caption, { maxTokens: 10 }),
    /maxTokens 10 leaves no room for the caption: the chat template alone is 12 tokens/,
  );

  const raw = tokenizer.encode(caption, { mode: "raw", maxTokens: 10 });
  assert.equal(raw.ids.length, 10);
  assert.equal(raw.truncated, true);
  const full = tokenizer.encode("a cat", { mode: "raw", maxTokens: 2 });
  assert.equal(full.truncated, false);
  assert.equal(full.ids.length, 2);
  for (const maxTokens of [0, -1, 2.5, Number.NaN]) {
    assert.throws(() => tokenizer.encode("a cat", { maxTokens }), /maxTokens must be a positive/);
  }
});

Deno.test("Qwen: encodeBatch right-pads with <|endoftext|> and masks padding", async () => {
  const tokenizer = await tokenizerPromise;
  const captions = ["a cat", "Hello world, this is a longer caption", "x ".repeat(500)];
  const options = { mode: "raw" as QwenPromptMode, maxTokens: 12 };
  const batch = tokenizer.encodeBatch(captions, options);
  assert.deepEqual(batch.lengths, [2, 8, 12]);
  assert.equal(batch.T, 12);
  assert.deepEqual(batch.truncated, [false, false, true]);
  assert.equal(batch.ids.length, 3 * 12);
  assert.equal(batch.attentionMask.length, 3 * 12);
  captions.forEach((caption, b) => {
    const { ids } = tokenizer.encode(caption, options);
    const row = batch.ids.subarray(b * 12, (b + 1) * 12);
    const mask = batch.attentionMask.subarray(b * 12, (b + 1) * 12);
    assert.deepEqual(row.subarray(0, ids.length), ids);
    assert.ok(row.subarray(ids.length).every((id) => id === ENDOFTEXT));
    assert.ok(mask.subarray(0, ids.length).every((m) => m === 1));
    assert.ok(mask.subarray(ids.length).every((m) => m === 0));
  });

  const chat = tokenizer.encodeBatch(["a cat", "a dog and a cat"]);
  assert.equal(chat.T, 17);
  assert.deepEqual(chat.lengths, [14, 17]);
});

Deno.test("Qwen: clear errors for bad input", async () => {
  const tokenizer = await tokenizerPromise;
  assert.throws(
    () => tokenizer.encode("a cat", { mode: "plain" as QwenPromptMode }),
    /unknown prompt mode "plain"; use one of chat, raw/,
  );
  assert.throws(() => tokenizer.encode(7 as unknown as string), /must be a string, got number/);
  assert.throws(
    () => tokenizer.encodeBatch(["ok", undefined as unknown as string]),
    /caption 1 must be a string/,
  );
});

Deno.test("Qwen: an empty caption is the pad token in raw mode and the bare template in chat mode", async () => {
  const tokenizer = await loadQwenTokenizerFromPackage();
  const raw = tokenizer.encodeBatch(["", "a cat"], { mode: "raw" });
  assert.deepEqual(raw.lengths, [1, 2]);
  assert.equal(raw.ids[0], tokenizer.padId);
  const chat = tokenizer.encodeBatch([""], { mode: "chat" });
  assert.equal(
    tokenizer.decode(chat.ids),
    "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
  );
});

Deno.test("Qwen: folder loading, missing files and missing chat_template", async () => {
  const { tokenizerJson, tokenizerConfig } = await readQwenPackageFiles();
  const folder = await Deno.makeTempDir({ prefix: "qwen-tokenizer-" });
  try {
    await assert.rejects(loadQwenTokenizer(folder), (err: Error) => {
      assert.ok(err.message.includes(folder) && err.message.includes("tokenizer.json"));
      return true;
    });
    await Deno.writeTextFile(join(folder, "tokenizer.json"), JSON.stringify(tokenizerJson));
    await assert.rejects(loadQwenTokenizer(folder), (err: Error) => {
      assert.ok(err.message.includes(folder) && err.message.includes("tokenizer_config.json"));
      return true;
    });

    await Deno.writeTextFile(
      join(folder, "tokenizer_config.json"),
      JSON.stringify(tokenizerConfig),
    );
    const full = await loadQwenTokenizer(folder);
    assert.deepEqual(full.encode("a cat").ids, (await tokenizerPromise).encode("a cat").ids);

    const { chat_template: _, ...withoutTemplate } = tokenizerConfig;
    await Deno.writeTextFile(
      join(folder, "tokenizer_config.json"),
      JSON.stringify(withoutTemplate),
    );
    const noTemplate = await loadQwenTokenizer(folder);
    assert.throws(() => noTemplate.encode("a cat"), (err: Error) => {
      assert.match(err.message, /has no "chat_template"; use prompt mode "raw"/);
      assert.ok(err.message.includes(folder));
      return true;
    });
    assert.deepEqual(Array.from(noTemplate.encode("a cat", { mode: "raw" }).ids), [64, 8251]);

    // transformers saves the template as chat_template.jinja; it wins over the config.
    await Deno.writeTextFile(
      join(folder, "chat_template.jinja"),
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}",
    );
    const fromJinja = await loadQwenTokenizer(folder);
    assert.equal(fromJinja.renderPrompt("a cat"), "<|im_start|>user\na cat<|im_end|>");
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
