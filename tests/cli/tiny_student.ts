/** A tiny random student on disk (Qwen3 folder + untrained adapter) for encode and serve tests. */
import { join } from "node:path";
import { DEFAULT_LORA_CONFIG, initLora } from "../../src/models/lora.ts";
import { writeRandomQwen3 } from "../../src/models/random_qwen3.ts";
import { ModelFolder } from "../../src/io/hf.ts";
import { qwen3Config, qwen3LinearShapes } from "../../src/models/qwen3_weights.ts";
import { initResampler } from "../../src/models/resampler_weights.ts";
import { RESAMPLER_DEFAULTS } from "../../src/models/resampler_config.ts";
import { readQwenPackageFiles } from "../../src/text/qwen_tokenizer.ts";
import { baseModelRecord, saveAdapter } from "../../src/train/adapter.ts";
import { Rng } from "../../src/util/rng.ts";
import { testGpu } from "../helpers.ts";

const SIZES = {
  hiddenSize: 32,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 8,
  intermediateSize: 48,
  vocabSize: 151936,
};

/**
 * A tiny random Qwen3 with the real tokenizer, and a random adapter for it. LoRA's B is drawn
 * too (training starts it at 0), so that what the tests compare runs through the LoRA path.
 */
export async function tinyStudent(root: string, hiddenSize = SIZES.hiddenSize) {
  const gpu = await testGpu();
  const qwen = join(root, `qwen-${hiddenSize}`);
  await writeRandomQwen3(qwen, { ...SIZES, hiddenSize }, {
    seed: 1,
    tokenizer: await readQwenPackageFiles(),
  });
  const folder = await ModelFolder.open(qwen);
  const config = qwen3Config(folder);
  folder.close();
  const rng = new Rng(2);
  const lora = initLora(gpu, qwen3LinearShapes(config), config.numLayers, {
    ...DEFAULT_LORA_CONFIG,
    r: 4,
  }, rng);
  for (const { b } of lora.pairs.values()) {
    gpu.write(b, rng.fillNormal(new Float32Array(b.size), 0.1));
  }
  const resampler = initResampler(gpu, {
    ...RESAMPLER_DEFAULTS,
    dimIn: hiddenSize,
    dim: 32,
    depth: 1,
    heads: 2,
    dimHead: 16,
    ffMult: 2,
  }, rng);
  const adapter = join(root, `adapter-${hiddenSize}`);
  await saveAdapter(gpu, adapter, {
    config: {
      format: "distill-adapter",
      version: 1,
      prompt: { mode: "chat", maxTokens: 24 },
      baseModel: baseModelRecord("tiny-random-qwen3", config),
      teacher: {},
    },
    lora,
    resampler,
  });
  return { qwen, adapter };
}
