import assert from "node:assert/strict";
import { join } from "node:path";
import { encodeCommand } from "../../src/cli/encode.ts";
import { readPromptsFile } from "../../src/data/prompts_file.ts";
import { type EncodeOptions, runEncode } from "../../src/train/encode_file.ts";
import { SafetensorsFile } from "../../src/io/safetensors.ts";
import { destroyStudent, encodePrompts, loadStudent } from "../../src/train/student.ts";
import { rejectsWith, testGpu } from "../helpers.ts";
import { tinyStudent } from "./tiny_student.ts";

const root = await Deno.makeTempDir({ prefix: "distill-encode-" });
const student = await tinyStudent(root);

/** runEncode on the tiny student with one prompt, quietly; `options` overrides. */
function encodeWith(options: Partial<EncodeOptions>, log: (line: string) => void = () => {}) {
  return runEncode({
    qwen: student.qwen,
    adapter: student.adapter,
    prompts: ["a cat"],
    out: join(root, "out.safetensors"),
    format: "safetensors",
    dtype: "f16",
    batchSize: 1,
    ...options,
  }, log);
}

Deno.test("encode writes the four diffusers tensors at SDXL shapes, F16, with metadata", async () => {
  const out = join(root, "cond.safetensors");
  const lines: string[] = [];
  await encodeWith({
    prompts: ["a red cube on top of a blue sphere", "", "x ".repeat(100)],
    out,
    batchSize: 2,
  }, (l) => lines.push(l));
  const file = await SafetensorsFile.open(out);
  assert.deepEqual(file.info("prompt_embeds").shape, [3, 77, 2048]);
  assert.deepEqual(file.info("pooled_prompt_embeds").shape, [3, 1280]);
  assert.deepEqual(file.info("negative_prompt_embeds").shape, [3, 77, 2048]);
  assert.deepEqual(file.info("negative_pooled_prompt_embeds").shape, [3, 1280]);
  assert.equal(file.info("prompt_embeds").dtype, "F16");
  const negative = await file.readF32("negative_prompt_embeds");
  assert.ok(negative.every((v) => v === 0), "no negative prompt gives zeros");
  const embeds = await file.readF32("prompt_embeds");
  assert.ok(embeds.every(Number.isFinite) && embeds.some((v) => v !== 0));
  const meta = file.metadata;
  assert.equal(meta.prompt_mode, "chat");
  assert.deepEqual(JSON.parse(meta.truncated), [false, false, true]);
  const counts = JSON.parse(meta.token_counts);
  assert.ok(counts[2] <= 24 && counts[2] >= 20, `truncated prompt has ${counts[2]} tokens`);
  assert.match(meta.adapter_id, /^[0-9a-f]{16}$/);
  assert.ok(lines.some((l) => /prompt 3 is longer than 24 tokens/.test(l)));
  file.close();
});

Deno.test("encode: batching does not change results; a negative prompt is encoded; json output", async () => {
  const one = await encodeWith({
    prompts: ["a cat", "two dogs left of a tree"],
    negative: "blurry",
    out: join(root, "b1.json"),
    format: "json",
    dtype: "f32",
  });
  const two = await encodeWith({
    prompts: ["a cat", "two dogs left of a tree"],
    out: join(root, "b2.safetensors"),
    dtype: "f32",
    batchSize: 2,
  });
  let worst = 0;
  one.positive.promptEmbeds.forEach((v, i) => {
    worst = Math.max(worst, Math.abs(v - two.positive.promptEmbeds[i]));
  });
  assert.ok(worst < 1e-4, `padding changed the result by ${worst}`);
  assert.ok(one.negative!.promptEmbeds.some((v) => v !== 0));
  const json = JSON.parse(await Deno.readTextFile(join(root, "b1.json")));
  assert.deepEqual(json.tensors.negative_pooled_prompt_embeds.shape, [2, 1280]);
  assert.equal(json.metadata.negative_prompt, "blurry");
});

Deno.test("encodePrompts: passes of alike token length give each prompt its own rows, in the input order", async () => {
  // Token lengths differ and are out of order, so the passes regroup the prompts.
  const prompts = [
    "two dogs to the left of a tall tree under a bright blue sky",
    "a cat",
    "",
    "a red cube on top of a blue sphere",
    "x ".repeat(100),
    "a cat",
    "a glass of water",
  ];
  const gpu = await testGpu();
  const loaded = await loadStudent(gpu, student.qwen, student.adapter);
  try {
    // Each prompt encoded on its own: no padding, no reordering.
    const alone = await Promise.all(prompts.map((p) => encodePrompts(gpu, loaded, [p], 1)));
    const counts = alone.map((c) => c.tokenCounts[0]);
    assert.equal(new Set(counts).size, 5, `token counts ${counts}`);
    for (const batchSize of [3, 8]) {
      const bucketed = await encodePrompts(gpu, loaded, prompts, batchSize);
      assert.deepEqual(bucketed.tokenCounts, counts);
      assert.deepEqual(bucketed.truncated, alone.map((c) => c.truncated[0]));
      for (const key of ["promptEmbeds", "pooled"] as const) {
        const row = alone[0][key].length;
        let worst = 0;
        let scale = 0;
        alone.forEach((c, i) => {
          c[key].forEach((v, j) => {
            worst = Math.max(worst, Math.abs(v - bucketed[key][i * row + j]));
            scale = Math.max(scale, Math.abs(v));
          });
        });
        assert.equal(bucketed[key].length, prompts.length * row);
        assert.ok(worst < 1e-4 * scale, `batch ${batchSize}: ${key} off by ${worst} of ${scale}`);
      }
    }
  } finally {
    destroyStudent(loaded);
  }
});

Deno.test("encode refuses an adapter made for another base model, naming both sizes", async () => {
  const other = await tinyStudent(root, 48);
  await assert.rejects(
    encodeWith({ adapter: other.adapter, out: join(root, "x.safetensors") }),
    /trained on another base model.*hiddenSize 48 \(adapter\) vs 32 \(student\)/,
  );
});

Deno.test("encode: missing adapter files are named", async () => {
  const empty = await Deno.makeTempDir({ dir: root });
  await assert.rejects(
    encodeWith({ adapter: empty, out: join(root, "y.safetensors") }),
    /distill_config\.json not found: an adapter folder/,
  );
  await Deno.copyFile(
    join(student.adapter, "distill_config.json"),
    join(empty, "distill_config.json"),
  );
  await assert.rejects(
    encodeWith({ adapter: empty, out: join(root, "y.safetensors") }),
    /adapter_config\.json not found/,
  );
});

Deno.test("encode: missing output folders are made; a bad --out fails before any model is read", async () => {
  // The README's example: --out in a folder that does not exist yet.
  const nested = join(root, "made", "out", "cond.safetensors");
  const models = ["--qwen", student.qwen, "--adapter", student.adapter];
  await encodeCommand.run([...models, "--out", nested, "a cat"]);
  const written = await SafetensorsFile.open(nested);
  assert.equal(written.info("prompt_embeds").dtype, "F16");
  written.close();
  // Nonexistent model folders: an output error must come first, before anything is loaded.
  const missing = ["--qwen", join(root, "no-qwen"), "--adapter", join(root, "no-adapter")];
  await Deno.writeTextFile(join(root, "a-file"), "x");
  await rejectsWith(
    () => encodeCommand.run([...missing, "--out", join(root, "a-file", "c.safetensors"), "a cat"]),
    `${join(root, "a-file")} is a file, not a folder`,
  );
  await rejectsWith(
    () => encodeCommand.run([...missing, "--out", nested, "a cat"]),
    `--out ${nested}: the file exists. Fix: pass --force`,
  );
  await encodeCommand.run([...models, "--out", nested, "--force", "a dog"]);
  const replaced = await SafetensorsFile.open(nested);
  assert.equal(replaced.metadata.prompts, JSON.stringify(["a dog"]));
  replaced.close();
});

Deno.test("prompts files: blank lines and invalid UTF-8 are refused with the line", async () => {
  const good = join(root, "good.txt");
  await Deno.writeTextFile(good, "a cat\r\ntwo dogs\n");
  assert.deepEqual(await readPromptsFile(good), ["a cat", "two dogs"]);
  const blank = join(root, "blank.txt");
  await Deno.writeTextFile(blank, "a cat\n\ntwo dogs\n  \n");
  await assert.rejects(readPromptsFile(blank), /blank\.txt: lines 2, 4 are blank; remove them/);
  const bad = join(root, "bad.txt");
  await Deno.writeFile(bad, new Uint8Array([0x61, 0x0a, 0x62, 0xff, 0x0a]));
  await assert.rejects(readPromptsFile(bad), /bad\.txt:2: not valid UTF-8/);
});

Deno.test("encode command: usage errors", async () => {
  await assert.rejects(encodeCommand.run(["a cat"]), /--qwen <folder> is required/);
  await assert.rejects(
    encodeCommand.run(["--qwen", student.qwen, "--adapter", student.adapter]),
    /give a prompt/,
  );
  await assert.rejects(
    encodeCommand.run(["--qwen", "q", "--adapter", "a", "--format", "npz", "x"]),
    /--format must be safetensors or json/,
  );
});
