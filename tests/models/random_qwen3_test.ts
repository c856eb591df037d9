import assert from "node:assert/strict";
import { join } from "node:path";
import { ModelFolder } from "../../src/io/hf.ts";
import { qwen3Forward, type TokenBatch } from "../../src/models/qwen3.ts";
import { destroyQwen3Weights, loadQwen3Weights } from "../../src/models/qwen3_weights.ts";
import {
  type RandomQwen3Progress,
  type RandomQwen3Sizes,
  writeRandomQwen3,
} from "../../src/models/random_qwen3.ts";
import { testGpu, withTempDir } from "../helpers.ts";

const FIXTURE_CONFIG = new URL("../fixtures/qwen3/config.json", import.meta.url).pathname;

const TINY: RandomQwen3Sizes = {
  hiddenSize: 32,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 8,
  intermediateSize: 64,
  vocabSize: 1000,
};

function meanStd(values: Float32Array): { mean: number; std: number } {
  let sum = 0;
  for (const v of values) sum += v;
  const mean = sum / values.length;
  let sq = 0;
  for (const v of values) sq += (v - mean) ** 2;
  return { mean, std: Math.sqrt(sq / values.length) };
}

Deno.test("a random tiny Qwen3 loads (NF4 and f32) and gives finite hidden states", async () => {
  await withTempDir(async (dir) => {
    const progress: RandomQwen3Progress[] = [];
    const written = await writeRandomQwen3(dir, TINY, {
      seed: 7,
      shardCount: 2,
      onProgress: (p) => progress.push(p),
    });
    assert.deepEqual(written.shards, [
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
    ]);
    assert.equal(progress.at(-1)!.bytesDone, written.totalBytes);

    const folder = await ModelFolder.open(dir);
    assert.deepEqual(folder.shards(), written.shards);
    const index = JSON.parse(await Deno.readTextFile(join(dir, "model.safetensors.index.json")));
    assert.equal(index.metadata.total_size, written.totalBytes);
    assert.equal(index.weight_map["model.embed_tokens.weight"], written.shards[0]);
    assert.equal(index.weight_map["model.norm.weight"], written.shards[1]);
    const info = folder.info("model.layers.1.self_attn.q_proj.weight");
    assert.deepEqual([info.dtype, info.shape], ["BF16", [32, 32]]);
    assert.deepEqual(folder.info("model.layers.0.mlp.down_proj.weight").shape, [32, 64]);

    const linear = meanStd(await folder.readF32("model.layers.0.mlp.gate_proj.weight"));
    assert.ok(
      Math.abs(linear.mean) < 2e-3 && Math.abs(linear.std - 0.02) < 1e-3,
      JSON.stringify(linear),
    );
    const embed = meanStd(await folder.readF32("model.embed_tokens.weight"));
    assert.ok(
      Math.abs(embed.mean) < 5e-4 && Math.abs(embed.std - 0.02) < 5e-4,
      JSON.stringify(embed),
    );
    const norm = meanStd(await folder.readF32("model.layers.0.input_layernorm.weight"));
    assert.ok(
      Math.abs(norm.mean - 1) < 0.02 && norm.std > 0.01 && norm.std < 0.03,
      JSON.stringify(norm),
    );

    const gpu = await testGpu();
    const batch: TokenBatch = {
      ids: Int32Array.from([3, 999, 17, 0, 512, 5, 6, 7, 8, 9]),
      lengths: [3, 5],
      batch: 2,
      seqLen: 5,
    };
    for (const quantize of ["nf4", "none"] as const) {
      const w = await loadQwen3Weights(gpu, folder, { quantize });
      assert.equal(w.config.ropeTheta, 1e6);
      assert.equal(w.config.rmsNormEps, 1e-6);
      const out = qwen3Forward(gpu, w, batch);
      const hidden = (await gpu.read(out)) as Float32Array;
      out.destroy();
      destroyQwen3Weights(w);
      assert.equal(hidden.length, 2 * 5 * 32);
      assert.ok(hidden.every(Number.isFinite), `${quantize}: non-finite hidden state`);
      // The final RMSNorm leaves every row with an RMS near the norm weights' (about 1).
      const rms = Math.sqrt(hidden.subarray(0, 32).reduce((s, v) => s + v * v, 0) / 32);
      assert.ok(rms > 0.5 && rms < 1.5, `${quantize}: row RMS ${rms}`);
    }
    folder.close();
  });
});

Deno.test("random Qwen3 weights are deterministic in the seed, whatever the sharding", async () => {
  await withTempDir(async (dir) => {
    const write = (name: string, seed: number, shardCount: number) =>
      writeRandomQwen3(join(dir, name), TINY, { seed, shardCount });
    await write("a", 3, 2);
    await write("b", 3, 2);
    await write("c", 4, 2);
    await write("single", 3, 1);
    for (const shard of ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]) {
      const a = await Deno.readFile(join(dir, "a", shard));
      assert.deepEqual(await Deno.readFile(join(dir, "b", shard)), a, shard);
      assert.notDeepEqual(await Deno.readFile(join(dir, "c", shard)), a, shard);
    }
    const sharded = await ModelFolder.open(join(dir, "a"));
    const single = await ModelFolder.open(join(dir, "single"));
    assert.deepEqual(single.shards(), ["model.safetensors"]);
    for (const name of sharded.names()) {
      assert.deepEqual(await single.readBytes(name), await sharded.readBytes(name), name);
    }
    sharded.close();
    single.close();
  });
});

Deno.test("random Qwen3 config.json has transformers' keys and spelling", async () => {
  await withTempDir(async (dir) => {
    const tokenizerJson = {
      model: { type: "BPE", vocab: { a: 0, b: 1 } },
      added_tokens: [{ id: 2, content: "<|endoftext|>" }, { id: 3, content: "<|im_end|>" }],
    };
    const tokenizerConfig = { pad_token: "<|endoftext|>" };
    await writeRandomQwen3(dir, { ...TINY, ropeTheta: 5e5 }, {
      seed: 1,
      dtype: "F16",
      tokenizer: { tokenizerJson, tokenizerConfig },
    });
    const text = await Deno.readTextFile(join(dir, "config.json"));
    const config = JSON.parse(text);
    // Same keys in the same (sorted) order as the config transformers wrote for the fixture.
    const fixture = JSON.parse(await Deno.readTextFile(FIXTURE_CONFIG));
    assert.deepEqual(Object.keys(config), Object.keys(fixture));
    assert.match(text, /^ {2}"rms_norm_eps": 1e-06,$/m);
    assert.match(text, /^ {2}"attention_dropout": 0\.0,$/m);
    assert.match(text, /^ {2}"rope_theta": 500000,$/m);
    assert.deepEqual(config.architectures, ["Qwen3ForCausalLM"]);
    assert.equal(config.model_type, "qwen3");
    assert.equal(config.torch_dtype, "float16");
    assert.equal(config.tie_word_embeddings, true);
    assert.equal(config.bos_token_id, 2);
    assert.equal(config.eos_token_id, 3);
    assert.deepEqual(
      JSON.parse(await Deno.readTextFile(join(dir, "tokenizer.json"))),
      tokenizerJson,
    );
    assert.deepEqual(
      JSON.parse(await Deno.readTextFile(join(dir, "tokenizer_config.json"))),
      tokenizerConfig,
    );
    const folder = await ModelFolder.open(dir);
    assert.equal(folder.info("model.norm.weight").dtype, "F16");
    folder.close();
  });
});

Deno.test("writeRandomQwen3 rejects bad sizes, shard counts and a tokenizer beyond the vocab", async () => {
  await withTempDir(async (dir) => {
    await assert.rejects(
      writeRandomQwen3(dir, { ...TINY, headDim: 0 }, { seed: 1 }),
      /sizes\.headDim is 0/,
    );
    await assert.rejects(
      writeRandomQwen3(dir, TINY, { seed: 1, shardCount: 4 }),
      /shardCount 4 leaves shard 2 empty/,
    );
    const tokenizerJson = {
      model: { vocab: { a: 0 } },
      added_tokens: [{ id: 1000, content: "x" }],
    };
    await assert.rejects(
      writeRandomQwen3(dir, TINY, { seed: 1, tokenizer: { tokenizerJson, tokenizerConfig: {} } }),
      /token id 1000, but vocabSize is 1000/,
    );
  });
});
