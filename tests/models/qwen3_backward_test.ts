import assert from "node:assert/strict";
import { ModelFolder } from "../../src/io/hf.ts";
import { loadLora, loraSlot } from "../../src/models/lora.ts";
import {
  type LoraGrads,
  qwen3Backward,
  qwen3Forward,
  qwen3ForwardTrain,
  type TokenBatch,
} from "../../src/models/qwen3.ts";
import { loadQwen3Weights, qwen3LinearShapes } from "../../src/models/qwen3_weights.ts";
import { randn, testGpu } from "../helpers.ts";

const DIR = new URL("../fixtures/qwen3/", import.meta.url).pathname;

/**
 * Central differences of loss = Σ hidden ⊙ R over single LoRA entries, in f32 on the GPU,
 * so the step is large and the tolerance loose; the train_step fixture checks tightly.
 */
async function checkLoraGradients(dropout: number) {
  const gpu = await testGpu();
  const folder = await ModelFolder.open(DIR);
  const w = await loadQwen3Weights(gpu, folder);
  const c = w.config;
  const lora = await loadLora(gpu, `${DIR}lora`, qwen3LinearShapes(c), c.numLayers);
  lora.config.dropout = dropout;
  const train = { dropoutSeed: 1 };
  const batch: TokenBatch = {
    ids: Int32Array.from({ length: 2 * 9 }, (_, i) => (i * 37 + 11) % c.vocabSize),
    lengths: [9, 6],
    batch: 2,
    seqLen: 9,
  };
  const rows = batch.batch * batch.seqLen;
  // Padded rows carry no meaning, so the loss ignores them.
  const r = randn(rows * c.hiddenSize, 5);
  for (let b = 0; b < batch.batch; b++) {
    r.fill(
      0,
      (b * batch.seqLen + batch.lengths[b]) * c.hiddenSize,
      (b + 1) * batch.seqLen * c.hiddenSize,
    );
  }
  const R = gpu.upload(r, [rows, c.hiddenSize], "f32", "R");

  // With dropout the loss is that of the training forward, whose masks the seed fixes.
  const hiddenOf = () => {
    if (dropout === 0) return qwen3Forward(gpu, w, batch, { lora });
    const { hidden, state } = qwen3ForwardTrain(gpu, w, batch, { lora, train, checkpoint: true });
    for (const t of [...state.layerInputs, state.finalRstd, state.ctx.keyLengths]) t.destroy();
    return hidden;
  };
  const loss = async () => {
    const h = hiddenOf();
    const v = (await gpu.read(h)) as Float32Array;
    h.destroy();
    let s = 0;
    for (let i = 0; i < v.length; i++) s += v[i] * r[i];
    return s;
  };

  const gradsFor = (checkpoint: boolean) => {
    const grads: LoraGrads = new Map();
    for (const [slot, pair] of lora.pairs) {
      grads.set(slot, {
        a: gpu.zeros(pair.a.shape, "f32", `dA ${slot}`),
        b: gpu.zeros(pair.b.shape, "f32", `dB ${slot}`),
      });
    }
    const { hidden, state } = qwen3ForwardTrain(gpu, w, batch, { lora, train, checkpoint });
    hidden.destroy();
    qwen3Backward(gpu, w, state, R, lora, grads);
    return grads;
  };

  const full = gradsFor(false);
  const ckpt = gradsFor(true);
  const probes: Array<[number, "q_proj" | "v_proj" | "o_proj", "a" | "b", number]> = [
    [0, "q_proj", "a", 5],
    [0, "v_proj", "b", 17],
    [1, "o_proj", "a", 40],
    [1, "q_proj", "b", 3],
  ];
  const eps = 1e-2;
  for (const [layer, module, ab, index] of probes) {
    const slot = loraSlot(layer, module);
    const param = lora.pairs.get(slot)![ab];
    const values = (await gpu.read(param)) as Float32Array;
    const original = values[index];
    const at = async (v: number) => {
      values[index] = v;
      gpu.write(param, values);
      return await loss();
    };
    const numeric = ((await at(original + eps)) - (await at(original - eps))) / (2 * eps);
    await at(original);
    const [g, gc] =
      (await gpu.readAll([full.get(slot)![ab], ckpt.get(slot)![ab]])) as Float32Array[];
    const analytic = g[index];
    assert.equal(
      gc[index],
      analytic,
      `${slot}.${ab}[${index}]: checkpointing changed the gradient`,
    );
    const tol = 2e-3 * Math.max(1, Math.abs(numeric));
    assert.ok(
      Math.abs(analytic - numeric) < tol,
      `${slot}.${ab}[${index}]: analytic ${analytic} vs numeric ${numeric}`,
    );
  }
}

Deno.test("Qwen3 LoRA gradients agree with finite differences, with and without checkpointing", () =>
  checkLoraGradients(0));

Deno.test("Qwen3 LoRA gradients with LoRA dropout agree with finite differences of the same masks", () =>
  checkLoraGradients(0.3));
