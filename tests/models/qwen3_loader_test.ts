import assert from "node:assert/strict";
import { join } from "node:path";
import { ModelFolder } from "../../src/io/hf.ts";
import { SafetensorsFile, writeSafetensors } from "../../src/io/safetensors.ts";
import { writeRandomQwen3 } from "../../src/models/random_qwen3.ts";
import { destroyQwen3Weights, loadQwen3Weights } from "../../src/models/qwen3_weights.ts";
import { nf4Quantize } from "../../src/ops/nf4.ts";
import { QWEN3_LINEARS } from "../../src/models/lora.ts";
import { loadQwenTokenizer } from "../../src/text/qwen_tokenizer.ts";
import { rejectsWith, testGpu, withTempDir } from "../helpers.ts";

const SIZES = {
  hiddenSize: 16,
  numLayers: 2,
  numHeads: 2,
  numKvHeads: 1,
  headDim: 8,
  intermediateSize: 24,
  vocabSize: 64,
};

async function load(dir: string) {
  return loadQwen3Weights(await testGpu(), await ModelFolder.open(dir));
}

/** Rewrites the single weights file through `edit` (which may drop, add or replace tensors). */
async function editWeights(
  dir: string,
  edit: (
    tensors: Array<{ name: string; dtype: "F32"; shape: number[]; data: Float32Array }>,
  ) => void,
) {
  const path = join(dir, "model.safetensors");
  const file = await SafetensorsFile.open(path);
  const tensors = [];
  for (const name of file.names()) {
    tensors.push({
      name,
      dtype: "F32" as const,
      shape: file.info(name).shape,
      data: await file.readF32(name),
    });
  }
  file.close();
  edit(tensors);
  await writeSafetensors(path, tensors);
}

Deno.test("Qwen3 loader: the streamed embedding and the scratch-quantized linears match the file", async () => {
  await withTempDir(async (dir) => {
    // An odd hidden size makes BF16 rows 30 bytes, so pieces must pair rows to stay 4-aligned;
    // 100-byte pieces cut the 64-row table into many.
    await writeRandomQwen3(dir, { ...SIZES, hiddenSize: 15 }, { seed: 3, dtype: "BF16" });
    const gpu = await testGpu();
    const folder = await ModelFolder.open(dir);
    const w = await loadQwen3Weights(gpu, folder, { embedChunkBytes: 100 });
    try {
      const embedBytes = await folder.readBytes("model.embed_tokens.weight");
      const [embed] = await gpu.readAll([w.embed]);
      assert.deepEqual(
        embed,
        new Uint16Array(embedBytes.buffer, embedBytes.byteOffset, embedBytes.byteLength / 2),
      );
      // The file interleaves linears of different sizes, so each one is quantized into scratch
      // arrays that still hold a larger or smaller predecessor.
      for (const [i, layer] of w.layers.entries()) {
        for (const [short, module] of Object.entries(QWEN3_LINEARS)) {
          const name = `model.layers.${i}.${module}.weight`;
          const linear = layer.linears[short as keyof typeof layer.linears];
          assert.equal(linear.kind, "nf4");
          if (linear.kind !== "nf4") continue;
          const want = nf4Quantize(await folder.readF32(name));
          const [packed, absmax] = await gpu.readAll([linear.weight.packed, linear.weight.absmax]);
          assert.deepEqual(packed, want.packed, `${name} packed`);
          assert.deepEqual(absmax, want.absmax, `${name} absmax`);
        }
        const [inputNorm] = await gpu.readAll([layer.inputNorm]);
        assert.deepEqual(
          inputNorm,
          await folder.readF32(`model.layers.${i}.input_layernorm.weight`),
        );
      }
      await rejectsWith(
        () => loadQwen3Weights(gpu, folder, { embedChunkBytes: 0 }),
        "embedChunkBytes must be positive",
      );
    } finally {
      destroyQwen3Weights(w);
      folder.close();
    }
  });
});

/** A fresh random model with `edit` applied to its weights, then `run` on its folder. */
function withEditedWeights(
  edit: Parameters<typeof editWeights>[1],
  run: (dir: string) => Promise<void>,
): Promise<void> {
  return withTempDir(async (dir) => {
    await writeRandomQwen3(dir, SIZES, { seed: 1 });
    await editWeights(dir, edit);
    await run(dir);
  });
}

Deno.test("Qwen3 loader: a missing config key names config.json and the key", async () => {
  await withTempDir(async (dir) => {
    await writeRandomQwen3(dir, SIZES, { seed: 1 });
    const config = JSON.parse(await Deno.readTextFile(join(dir, "config.json")));
    delete config.intermediate_size;
    await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify(config));
    await rejectsWith(() => load(dir), "config.json", "intermediate_size");
  });
});

Deno.test("Qwen3 loader: missing, extra and misshapen tensors name the tensor, file and config", async () => {
  await withEditedWeights(
    (t) => t.splice(t.findIndex((x) => x.name.endsWith("1.self_attn.k_proj.weight")), 1),
    (dir) =>
      rejectsWith(
        () => load(dir),
        'tensor "model.layers.1.self_attn.k_proj.weight" is missing',
        "a Qwen3 decoder with 2 layers per",
        "config.json needs it (F32, F16 or BF16, shape [8,16])",
      ),
  );
  await withEditedWeights(
    (t) =>
      t.push({
        name: "model.layers.2.mlp.up_proj.weight",
        dtype: "F32",
        shape: [24, 16],
        data: new Float32Array(384),
      }),
    (dir) =>
      rejectsWith(
        () => load(dir),
        'unexpected tensor "model.layers.2.mlp.up_proj.weight"',
        "a Qwen3 decoder with 2 layers",
      ),
  );
  await withEditedWeights(
    (t) => {
      const i = t.findIndex((x) => x.name === "model.layers.0.mlp.gate_proj.weight");
      t[i] = { ...t[i], shape: [20, 16], data: new Float32Array(320) };
    },
    (dir) =>
      rejectsWith(
        () => load(dir),
        'tensor "model.layers.0.mlp.gate_proj.weight" has shape [20,16]',
        "implies [24,16]",
        "the config and the weights disagree",
      ),
  );
});

Deno.test("Qwen3 loader: lm_head is accepted and never read", async () => {
  await withEditedWeights(
    (t) =>
      t.push({
        name: "lm_head.weight",
        dtype: "F32",
        shape: [64, 16],
        data: new Float32Array(1024),
      }),
    async (dir) => {
      const w = await load(dir);
      if (w.layers.length !== 2) throw new Error("expected 2 layers");
    },
  );
});

Deno.test("Qwen3 tokenizer files missing from a model folder are named", async () => {
  await withTempDir(async (dir) => {
    await writeRandomQwen3(dir, SIZES, { seed: 1 });
    await rejectsWith(() => loadQwenTokenizer(dir), "tokenizer.json");
  });
});
