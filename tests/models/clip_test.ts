import assert from "node:assert/strict";
import { join } from "node:path";
import { ModelFolder } from "../../src/io/hf.ts";
import { SafetensorsFile } from "../../src/io/safetensors.ts";
import {
  clipPoolingPositions,
  clipTextForward,
  destroyClipTextModel,
  loadClipTextModel,
} from "../../src/models/clip.ts";
import { loadSdxlTeacher } from "../../src/models/sdxl_teacher.ts";
import {
  type ClipTextShape,
  writeClipTokenizerFolder,
  writeRandomSdxlTeacherFolder,
} from "../../src/models/random_sdxl.ts";
import { assertMaxAbs, assertNmse, rejectsWith, testGpu, withTempDir } from "../helpers.ts";

const FIXTURE = new URL("../fixtures/clip/", import.meta.url).pathname;
const BATCH = 3;
const SEQ = 77;

async function readCases() {
  const file = await SafetensorsFile.open(join(FIXTURE, "cases.safetensors"));
  try {
    return {
      idsL: await file.readIntegers("input_ids_l"),
      idsG: await file.readIntegers("input_ids_g"),
      eos: await file.readIntegers("eos_index_g"),
      penultimateL: await file.readF32("penultimate_l"),
      penultimateG: await file.readF32("penultimate_g"),
      promptEmbeds: await file.readF32("prompt_embeds"),
      pooled: await file.readF32("pooled"),
    };
  } finally {
    file.close();
  }
}

/** README tolerances (abs), plus NMSE < 1e-6 on every output. */
function assertParity(expected: Float32Array, actual: Float32Array, tol: number, what: string) {
  assertMaxAbs(expected, actual, tol, what);
  assertNmse(expected, actual, 1e-6, what);
}

/** Copies a fixture encoder folder, optionally changing its config. */
async function copyEncoder(
  part: "text_encoder" | "text_encoder_2",
  to: string,
  configChanges: Record<string, unknown> = {},
): Promise<void> {
  await Deno.mkdir(to, { recursive: true });
  await Deno.copyFile(join(FIXTURE, part, "model.safetensors"), join(to, "model.safetensors"));
  const config = JSON.parse(await Deno.readTextFile(join(FIXTURE, part, "config.json")));
  await Deno.writeTextFile(
    join(to, "config.json"),
    JSON.stringify({ ...config, ...configChanges }),
  );
}

/** An SDXL folder with the fixture encoders and the real tokenizer files. */
async function fixtureSdxlFolder(
  dir: string,
  skip: string[] = [],
  changes: Record<string, unknown> = {},
): Promise<void> {
  for (const part of ["text_encoder", "text_encoder_2"] as const) {
    if (!skip.includes(part)) await copyEncoder(part, join(dir, part), changes);
  }
  if (!skip.includes("tokenizer")) await writeClipTokenizerFolder(join(dir, "tokenizer"));
  if (!skip.includes("tokenizer_2")) await writeClipTokenizerFolder(join(dir, "tokenizer_2"), "!");
}

Deno.test("clip: the pooling position is the first largest id, not config.eos_token_id", async () => {
  const cases = await readCases();
  assert.deepEqual(clipPoolingPositions(cases.idsG, BATCH, SEQ), cases.eos);
  // text_encoder/ pads with the EOS id itself: still the first one.
  assert.deepEqual(clipPoolingPositions(cases.idsL, BATCH, SEQ), cases.eos);
  assert.deepEqual(clipPoolingPositions([5, 9, 1, 9, 0], 1, 5), [1]);
});

Deno.test("clip: text_encoder/ penultimate layer matches the fixture, last layer not loaded", async () => {
  const gpu = await testGpu();
  const cases = await readCases();
  const folder = await ModelFolder.open(join(FIXTURE, "text_encoder"));
  const model = await loadClipTextModel(gpu, folder);
  folder.close();
  try {
    assert.equal(model.config.hiddenAct, "quick_gelu");
    assert.equal(model.layers.length, 2);
    assert.equal(model.pooling, undefined);
    assert.equal(model.tokenEmbedding.dtype, "f16");
    assert.equal(model.layers[0].fc1.weight.dtype, "f16");
    const out = clipTextForward(gpu, model, cases.idsL, BATCH, SEQ);
    assert.equal(out.pooled, undefined);
    const got = await gpu.readF32(out.penultimate);
    out.penultimate.destroy();
    assertParity(cases.penultimateL, got, 8e-5, "penultimate_l");
  } finally {
    destroyClipTextModel(model);
  }
});

Deno.test("clip: text_encoder_2/ penultimate and pooled match the fixture", async () => {
  const gpu = await testGpu();
  const cases = await readCases();
  const folder = await ModelFolder.open(join(FIXTURE, "text_encoder_2"));
  const model = await loadClipTextModel(gpu, folder, { pooled: true });
  folder.close();
  try {
    assert.equal(model.config.hiddenAct, "gelu");
    assert.equal(model.pooledDim, 40);
    const out = clipTextForward(gpu, model, cases.idsG, BATCH, SEQ);
    assert.deepEqual(out.eos, cases.eos);
    const [penultimate, pooled] = await gpu.readAll([out.penultimate, out.pooled!]);
    out.penultimate.destroy();
    out.pooled!.destroy();
    assertParity(cases.penultimateG, penultimate as Float32Array, 2e-4, "penultimate_g");
    assertParity(cases.pooled, pooled as Float32Array, 6e-5, "pooled");
  } finally {
    destroyClipTextModel(model);
  }
});

Deno.test("sdxl teacher: prompt_embeds and pooled match the fixture; identity is portable", async () => {
  const gpu = await testGpu();
  const cases = await readCases();
  await withTempDir(async (dir) => {
    await fixtureSdxlFolder(dir);
    const teacher = await loadSdxlTeacher(gpu, dir);
    try {
      assert.equal(teacher.seqLen, 77);
      assert.equal(teacher.seqDim, 32 + 48);
      assert.equal(teacher.pooledDim, 40);
      const { seq, pooled } = await teacher.encodeIds(cases.idsL, cases.idsG, BATCH);
      assertParity(cases.promptEmbeds, seq, 2e-4, "prompt_embeds");
      assertParity(cases.pooled, pooled, 6e-5, "pooled");

      assert.deepEqual(Object.keys(teacher.identity).sort(), [
        "compute",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer_2/merges.txt",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/tokenizer_config.json",
        "tokenizer_2/vocab.json",
      ]);
      for (const [key, value] of Object.entries(teacher.identity)) {
        if (key !== "compute") assert.match(value, /^[0-9a-f]{64}:\d+$/, key);
        assert.ok(!value.includes(dir), `${key} holds the folder path`);
      }
      assert.equal(teacher.tokenizer["tokenizer.pad"], 49407);
      assert.equal(teacher.tokenizer["tokenizer_2.pad"], 0);

      // The fixture encoders have a 512-token vocabulary: real captions must not pass.
      await rejectsWith(
        () => teacher.encode(["a photo of a cat"]),
        "text_encoder",
        "token id 49406",
        "do not belong together",
      );
    } finally {
      teacher.destroy();
    }
  });
});

Deno.test("sdxl teacher: reads diffusers' model.fp16.safetensors when it is the only weights", async () => {
  const gpu = await testGpu();
  const cases = await readCases();
  await withTempDir(async (dir) => {
    await fixtureSdxlFolder(dir);
    const part = join(dir, "text_encoder_2");
    await Deno.rename(join(part, "model.safetensors"), join(part, "model.fp16.safetensors"));
    const teacher = await loadSdxlTeacher(gpu, dir);
    try {
      assert.ok("text_encoder_2/model.fp16.safetensors" in teacher.identity);
      const { pooled } = await teacher.encodeIds(cases.idsL, cases.idsG, BATCH);
      assertParity(cases.pooled, pooled, 6e-5, "pooled");
    } finally {
      teacher.destroy();
    }
  });
});

const SMALL: Record<"text_encoder" | "text_encoder_2", ClipTextShape> = {
  text_encoder: {
    hiddenSize: 24,
    numLayers: 3,
    numHeads: 3,
    intermediateSize: 40,
    vocabSize: 49408,
    hiddenAct: "quick_gelu",
  },
  text_encoder_2: {
    hiddenSize: 24,
    numLayers: 3,
    numHeads: 2,
    intermediateSize: 36,
    vocabSize: 49408,
    hiddenAct: "gelu",
    projectionDim: 12,
  },
};

Deno.test("sdxl teacher: captions are tokenized by both tokenizers and encoded per row", async () => {
  const gpu = await testGpu();
  await withTempDir(async (dir) => {
    await writeRandomSdxlTeacherFolder(dir, SMALL, 7);
    const teacher = await loadSdxlTeacher(gpu, dir);
    try {
      assert.equal(teacher.seqDim, 48);
      assert.equal(teacher.pooledDim, 12);
      const captions = ["A photo of a cat.", "an astronaut riding a horse on the moon", ""];
      const { seq, pooled } = await teacher.encode(captions);
      assert.equal(seq.length, captions.length * 77 * 48);
      assert.equal(pooled.length, captions.length * 12);
      assert.ok(seq.every(Number.isFinite) && pooled.every(Number.isFinite));

      const idsL = teacher.tokenizers.l.encodeBatch(captions).ids;
      const idsG = teacher.tokenizers.g.encodeBatch(captions).ids;
      assert.equal(idsL[76], 49407, "tokenizer/ pads with <|endoftext|>");
      assert.equal(idsG[76], 0, "tokenizer_2/ pads with '!'");
      const byIds = await teacher.encodeIds(idsL, idsG, captions.length);
      assert.deepEqual(byIds.seq, seq);
      assert.deepEqual(byIds.pooled, pooled);

      // A caption's targets do not depend on the batch it comes in.
      const alone = await teacher.encode([captions[1]]);
      assertMaxAbs(seq.subarray(77 * 48, 2 * 77 * 48), alone.seq, 1e-5, "seq alone");
      assertMaxAbs(pooled.subarray(12, 24), alone.pooled, 1e-5, "pooled alone");

      const empty = await teacher.encode([]);
      assert.equal(empty.seq.length + empty.pooled.length, 0);
    } finally {
      teacher.destroy();
    }
  });
});

Deno.test("sdxl teacher: a folder missing a part names it and what an SDXL folder holds", async () => {
  const gpu = await testGpu();
  for (const missing of ["text_encoder_2", "tokenizer_2"]) {
    await withTempDir(async (dir) => {
      await fixtureSdxlFolder(dir, [missing]);
      await rejectsWith(
        () => loadSdxlTeacher(gpu, dir),
        `${dir} has no ${missing}/`,
        "A diffusers SDXL folder",
        "text_encoder_2/ (OpenCLIP ViT-bigG/14",
        "tokenizer_2/ (CLIP tokenizer",
      );
    });
  }
  await withTempDir(async (dir) => {
    await fixtureSdxlFolder(dir);
    await rejectsWith(
      () => loadSdxlTeacher(gpu, join(dir, "text_encoder")),
      "looks like a single model folder",
      "model_index.json",
    );
    await rejectsWith(() => loadSdxlTeacher(gpu, join(dir, "nowhere")), "nowhere not found");
  });
});

Deno.test("sdxl teacher: config and weights that disagree are named both", async () => {
  const gpu = await testGpu();
  await withTempDir(async (dir) => {
    await fixtureSdxlFolder(dir, ["text_encoder_2"]);
    await copyEncoder("text_encoder_2", join(dir, "text_encoder_2"), { intermediate_size: 80 });
    await rejectsWith(
      () => loadSdxlTeacher(gpu, dir),
      `${join(dir, "text_encoder_2")}/model.safetensors`,
      'tensor "text_model.encoder.layers.0.mlp.fc1.weight" has shape [96,48]',
      `${join(dir, "text_encoder_2")}/config.json implies [80,48]`,
    );
  });
});

Deno.test("clip: config errors name the file, the key and the fix", async () => {
  const gpu = await testGpu();
  await withTempDir(async (dir) => {
    const load = async (changes: Record<string, unknown>, pooled = false) => {
      const to = join(dir, crypto.randomUUID());
      await copyEncoder("text_encoder", to, changes);
      const folder = await ModelFolder.open(to);
      try {
        destroyClipTextModel(await loadClipTextModel(gpu, folder, { pooled }));
      } finally {
        folder.close();
      }
    };
    await rejectsWith(
      () => load({ num_hidden_layers: 4 }),
      'tensor "text_model.encoder.layers.3.layer_norm1.weight" is missing',
      "a CLIP text model with 4 layers per",
    );
    await rejectsWith(
      () => load({ num_hidden_layers: 2 }),
      'unexpected tensor "text_model.encoder.layers.2.',
      "2 layers",
    );
    await rejectsWith(() => load({ hidden_act: "relu" }), 'hidden_act "relu" is not supported');
    await rejectsWith(
      () => load({ num_attention_heads: 5 }),
      "not a multiple of num_attention_heads 5",
    );
    await rejectsWith(
      () => load({}, true),
      "text_projection.weight",
      "CLIPTextModelWithProjection",
    );
  });
});
