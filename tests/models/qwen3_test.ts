import assert from "node:assert/strict";
import { ModelFolder } from "../../src/io/hf.ts";
import { SafetensorsFile } from "../../src/io/safetensors.ts";
import { loadLora } from "../../src/models/lora.ts";
import { qwen3Forward, type TokenBatch } from "../../src/models/qwen3.ts";
import {
  loadQwen3Weights,
  qwen3LinearShapes,
  type Qwen3Weights,
} from "../../src/models/qwen3_weights.ts";
import { assertMaxAbs, assertNmse, testGpu } from "../helpers.ts";

const DIR = new URL("../fixtures/qwen3/", import.meta.url).pathname;

async function fixtureCases() {
  const cases = await SafetensorsFile.open(`${DIR}cases.safetensors`);
  const ids = await cases.readIntegers("input_ids");
  const lengths = await cases.readIntegers("lengths");
  const batch: TokenBatch = {
    ids: Int32Array.from(ids),
    lengths,
    batch: lengths.length,
    seqLen: ids.length / lengths.length,
  };
  return { cases, batch };
}

/** Only rows of real tokens carry meaning (fixture README). */
function validRows(x: Float32Array, batch: TokenBatch, hidden: number): Float32Array {
  const out: number[] = [];
  for (let b = 0; b < batch.batch; b++) {
    for (let t = 0; t < batch.lengths[b]; t++) {
      const row = (b * batch.seqLen + t) * hidden;
      out.push(...x.subarray(row, row + hidden));
    }
  }
  return Float32Array.from(out);
}

async function runCase(
  w: Qwen3Weights,
  expectedName: string,
  tol: number,
  options: Parameters<typeof qwen3Forward>[3] = {},
) {
  const gpu = await testGpu();
  const { cases, batch } = await fixtureCases();
  const out = qwen3Forward(gpu, w, batch, options);
  const got = (await gpu.read(out)) as Float32Array;
  out.destroy();
  const hidden = w.config.hiddenSize;
  const expected = validRows(await cases.readF32(expectedName), batch, hidden);
  const actual = validRows(got, batch, hidden);
  assertMaxAbs(expected, actual, tol, expectedName);
  assertNmse(expected, actual, 1e-6, expectedName);
  cases.close();
}

Deno.test("Qwen3 full-precision hidden state and layer outputs match the oracle", async () => {
  const gpu = await testGpu();
  const folder = await ModelFolder.open(DIR);
  const w = await loadQwen3Weights(gpu, folder, { quantize: "none" });
  await runCase(w, "hidden_full", 7e-5);
  await runCase(w, "debug.hidden_full.layer0", 9e-5, { stopAfterLayer: 0 });
  await runCase(w, "debug.hidden_full.layer1", 1e-4, { stopAfterLayer: 1 });
});

Deno.test("Qwen3 NF4 and NF4 + LoRA hidden states match the oracle", async () => {
  const gpu = await testGpu();
  const folder = await ModelFolder.open(DIR);
  const w = await loadQwen3Weights(gpu, folder);
  assert.equal(w.layers[0].linears.q_proj.kind, "nf4");
  await runCase(w, "hidden_nf4", 7e-5);
  const lora = await loadLora(gpu, `${DIR}lora`, qwen3LinearShapes(w.config), w.config.numLayers);
  assert.equal(lora.scaling, 2);
  await runCase(w, "hidden_nf4_lora", 6e-5, { lora });
});
