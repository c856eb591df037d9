import assert from "node:assert/strict";
import { join } from "node:path";
import { ModelFolder } from "../../src/io/hf.ts";
import { SafetensorsFile, writeSafetensors } from "../../src/io/safetensors.ts";

const FIXTURES = new URL("../fixtures/", import.meta.url).pathname;
const QWEN3 = join(FIXTURES, "qwen3");
const CLIP = join(FIXTURES, "clip");

/** Asserts that `promise` rejects with a message containing every one of `parts`. */
async function assertRejectsNaming(promise: Promise<unknown>, ...parts: Array<string | RegExp>) {
  await assert.rejects(promise, (error: Error) => {
    for (const part of parts) {
      if (typeof part === "string") {
        assert.ok(error.message.includes(part), `"${part}" not in: ${error.message}`);
      } else assert.match(error.message, part);
    }
    return true;
  });
}

/** A temp copy of the Qwen3 fixture folder, minus `omit`, for breaking it in tests. */
async function copyQwen3(omit: string[] = []): Promise<string> {
  const dir = await Deno.makeTempDir();
  for await (const entry of Deno.readDir(QWEN3)) {
    if (entry.isFile && !omit.includes(entry.name)) {
      await Deno.copyFile(join(QWEN3, entry.name), join(dir, entry.name));
    }
  }
  return dir;
}

Deno.test("opens the sharded BF16 Qwen3 folder through its index", async () => {
  const folder = await ModelFolder.open(QWEN3);
  try {
    const index = JSON.parse(await Deno.readTextFile(join(QWEN3, "model.safetensors.index.json")));
    assert.equal(folder.weightsPath, join(QWEN3, "model.safetensors.index.json"));
    assert.deepEqual(folder.shards(), [
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
    ]);
    assert.deepEqual(folder.names().toSorted(), Object.keys(index.weight_map).toSorted());
    for (const name of folder.names()) assert.equal(folder.shardOf(name), index.weight_map[name]);
    assert.equal(folder.has("lm_head.weight"), false);

    const info = folder.info("model.norm.weight");
    assert.deepEqual(
      { shard: info.shard, dtype: info.dtype, shape: info.shape },
      { shard: "model-00002-of-00002.safetensors", dtype: "BF16", shape: [64] },
    );
    // Same bytes and values as reading the shard directly.
    const shard = await SafetensorsFile.open(join(QWEN3, info.shard));
    assert.deepEqual(
      await folder.readBytes("model.norm.weight"),
      await shard.readBytes("model.norm.weight"),
    );
    assert.deepEqual(
      await folder.readF32("model.norm.weight"),
      await shard.readF32("model.norm.weight"),
    );
    assert.deepEqual(
      await folder.readRange("model.norm.weight", 6, 10),
      (await shard.readBytes("model.norm.weight")).subarray(6, 16),
    );
    assert.deepEqual(
      await folder.readF32("model.norm.weight", new Float32Array(100)),
      await shard.readF32("model.norm.weight"),
    );
    await assertRejectsNaming(
      folder.readRange("model.norm.weight", 100, 100),
      join(QWEN3, info.shard),
      'tensor "model.norm.weight" holds 128 bytes',
    );
    shard.close();

    assert.equal(folder.configInteger("hidden_size"), 64);
    assert.equal(folder.configNumber("rms_norm_eps"), 1e-6);
    assert.equal(folder.configNumber("rope_theta"), 1e6);
    assert.equal(folder.configString("model_type"), "qwen3");
    assert.equal(folder.configNumber("sliding_window", 0), 0, "null counts as absent");
    assert.equal(
      folder.configString("hidden_act", "gelu"),
      "silu",
      "a present key wins over the fallback",
    );
    assert.equal(folder.config.tie_word_embeddings, true);
  } finally {
    folder.close();
  }
});

Deno.test("streams one shard at a time: namesInShard, closeShard, reopen on read", async () => {
  const folder = await ModelFolder.open(QWEN3);
  let total = 0;
  const seen: string[] = [];
  for (const shard of folder.shards()) {
    for (const name of folder.namesInShard(shard)) {
      total += (await folder.readBytes(name)).byteLength;
      seen.push(name);
    }
    folder.closeShard(shard);
  }
  assert.deepEqual(seen, folder.names());
  assert.equal(total, 238400, "the index's total_size");
  // A closed shard reopens on the next read.
  assert.equal((await folder.readF32("model.embed_tokens.weight")).length, 512 * 64);
  assert.throws(
    () => folder.closeShard("model-00003-of-00002.safetensors"),
    /no shard model-00003/,
  );
  folder.close();
});

Deno.test("opens the F16 SDXL text encoders as subfolders of a diffusers layout", async () => {
  for (const [sub, hidden] of [["text_encoder", 32], ["text_encoder_2", 48]] as const) {
    const folder = await ModelFolder.open(join(CLIP, sub));
    try {
      assert.deepEqual(folder.shards(), ["model.safetensors"]);
      assert.equal(folder.configInteger("hidden_size"), hidden);
      const name = "text_model.embeddings.token_embedding.weight";
      assert.deepEqual(folder.info(name).shape, [512, hidden]);
      assert.equal(folder.info(name).dtype, "F16");
      assert.equal(folder.info(name).shard, "model.safetensors");
      assert.equal((await folder.readF32(name)).length, 512 * hidden);
      assert.equal(
        folder.configString("hidden_act"),
        sub === "text_encoder" ? "quick_gelu" : "gelu",
      );
    } finally {
      folder.close();
    }
  }
  const g = await ModelFolder.open(join(CLIP, "text_encoder_2"));
  assert.deepEqual(g.info("text_projection.weight").shape, [40, 48]);
  g.close();
});

Deno.test("missing config.json names the folder and what a HF folder holds", async () => {
  await assertRejectsNaming(
    ModelFolder.open(CLIP),
    join(CLIP, "config.json"),
    "not found: a Hugging Face model folder holds config.json and model.safetensors",
  );
  const dir = await Deno.makeTempDir();
  await Deno.writeTextFile(join(dir, "model_index.json"), "{}");
  await assertRejectsNaming(
    ModelFolder.open(dir),
    "is a diffusers pipeline: open a component subfolder",
  );
  await Deno.writeTextFile(join(dir, "config.json"), "{ nope");
  await assertRejectsNaming(
    ModelFolder.open(dir),
    join(dir, "config.json"),
    "the model config is not valid JSON",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("missing or mistyped config keys name config.json and the key", async () => {
  const folder = await ModelFolder.open(QWEN3);
  const config = join(QWEN3, "config.json");
  assert.throws(() => folder.configNumber("hidden_sise"), (error: Error) => {
    assert.ok(error.message.includes(config));
    assert.match(
      error.message,
      /has no "hidden_sise" \(a number is required\)\. Closest keys: "hidden_size"/,
    );
    return true;
  });
  assert.throws(
    () => folder.configString("hidden_size"),
    /config\.json: "hidden_size" is 64, expected a string/,
  );
  assert.throws(
    () => folder.configNumber("model_type", 1),
    /"model_type" is "qwen3", expected a number/,
  );
  assert.throws(
    () => folder.configInteger("rms_norm_eps"),
    /"rms_norm_eps" is 0\.000001, expected an integer/,
  );
  assert.throws(() => folder.configNumber("rope_scaling"), /has no "rope_scaling"/);
  folder.close();
});

Deno.test("missing tensor names the index, the key and the closest keys", async () => {
  const folder = await ModelFolder.open(QWEN3);
  assert.throws(() => folder.info("model.layers.0.self_attn.q_proj.weights"), (error: Error) => {
    assert.ok(error.message.includes(join(QWEN3, "model.safetensors.index.json")));
    assert.match(
      error.message,
      /no tensor "model\.layers\.0\.self_attn\.q_proj\.weights"\. Closest keys: "model\.layers\.0\.self_attn\.q_proj\.weight"/,
    );
    return true;
  });
  await assertRejectsNaming(folder.readF32("lm_head.weight"), 'no tensor "lm_head.weight"');
  folder.close();
});

Deno.test("missing shard names the index and the shard", async () => {
  const dir = await copyQwen3(["model-00002-of-00002.safetensors"]);
  await assertRejectsNaming(
    ModelFolder.open(dir),
    join(dir, "model.safetensors.index.json"),
    "names shard model-00002-of-00002.safetensors",
    'for tensor "model.layers.1.',
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("an index entry absent from its shard, or a broken index, is an error", async () => {
  const dir = await copyQwen3();
  const indexPath = join(dir, "model.safetensors.index.json");
  const index = JSON.parse(await Deno.readTextFile(indexPath));
  index.weight_map["model.layers.0.mlp.extra_proj.weight"] = "model-00001-of-00002.safetensors";
  await Deno.writeTextFile(indexPath, JSON.stringify(index));
  await assertRejectsNaming(
    ModelFolder.open(dir),
    indexPath,
    'puts tensor "model.layers.0.mlp.extra_proj.weight" in shard model-00001-of-00002.safetensors, but that shard has no such tensor',
  );
  await Deno.writeTextFile(indexPath, JSON.stringify({ metadata: {} }));
  await assertRejectsNaming(ModelFolder.open(dir), indexPath, '"weight_map" is missing');
  // A broken shard surfaces at open, naming the shard file.
  await Deno.writeTextFile(
    indexPath,
    JSON.stringify({ weight_map: { x: "model-00001-of-00002.safetensors" } }),
  );
  await Deno.writeFile(join(dir, "model-00001-of-00002.safetensors"), new Uint8Array(4));
  await assertRejectsNaming(
    ModelFolder.open(dir),
    join(dir, "model-00001-of-00002.safetensors"),
    "only 4 bytes long",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("weightsName picks another stem; a folder without weights lists what it has", async () => {
  const dir = await Deno.makeTempDir();
  await Deno.copyFile(join(CLIP, "text_encoder/config.json"), join(dir, "config.json"));
  await assertRejectsNaming(
    ModelFolder.open(dir),
    `${dir}: neither model.safetensors nor model.safetensors.index.json found`,
  );
  await writeSafetensors(join(dir, "model.fp16.safetensors"), [
    { name: "w", dtype: "F16", shape: [1], data: new Uint16Array([0x3c00]) },
  ]);
  await assertRejectsNaming(
    ModelFolder.open(dir),
    'It has model.fp16.safetensors: pass the stem (e.g. "model.fp16") as weightsName',
  );
  const folder = await ModelFolder.open(dir, { weightsName: "model.fp16" });
  assert.deepEqual([...await folder.readF32("w")], [1]);
  assert.equal(folder.info("w").shard, "model.fp16.safetensors");
  folder.close();
  await Deno.remove(dir, { recursive: true });
});
