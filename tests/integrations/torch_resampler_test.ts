import assert from "node:assert/strict";
import { join } from "node:path";
import { writeSafetensors } from "../../src/io/safetensors.ts";
import { initResampler, resamplerForward, saveResampler } from "../../src/models/resampler.ts";
import { Rng } from "../../src/train/rng.ts";
import { randn, testGpu } from "../helpers.ts";
import { runPython, torchPython } from "./python.ts";

const BATCH = 3;
const SEQ = 7;
const CONFIG = {
  dimIn: 24,
  dim: 32,
  depth: 2,
  heads: 2,
  dimHead: 12,
  ffMult: 2,
  numQueries: 5,
  dimSeq: 20,
  dimPooled: 12,
};

Deno.test({
  name: torchPython
    ? "torch DistillResampler matches distill's resampler on the same weights and input"
    : "torch DistillResampler parity (ignored: no python3 that imports torch; set DISTILL_PYTHON)",
  ignore: !torchPython,
  async fn() {
    const gpu = await testGpu();
    const dir = await Deno.makeTempDir({ prefix: "distill-torch-parity-" });
    const weights = initResampler(gpu, CONFIG, new Rng(7));
    await saveResampler(gpu, weights, join(dir, "resampler"));
    const hidden = randn(BATCH * SEQ * CONFIG.dimIn, 8);
    // A full row, a padded one and one with no text at all (only the latents are visible).
    const keyLengths = [SEQ, 4, 0];
    const input = gpu.upload(hidden, [BATCH, SEQ, CONFIG.dimIn], "f32", "hidden");
    const { seq, pooled } = resamplerForward(gpu, weights, input, keyLengths);
    const [seqData, pooledData] = (await gpu.readAll([seq, pooled])) as Float32Array[];
    for (const t of [input, seq, pooled, ...weights.params.values()]) t.destroy();
    await writeSafetensors(join(dir, "case.safetensors"), [
      { name: "hidden", dtype: "F32", shape: [BATCH, SEQ, CONFIG.dimIn], data: hidden },
      { name: "key_lengths", dtype: "F32", shape: [BATCH], data: Float32Array.from(keyLengths) },
      {
        name: "seq",
        dtype: "F32",
        shape: [BATCH, CONFIG.numQueries, CONFIG.dimSeq],
        data: seqData,
      },
      { name: "pooled", dtype: "F32", shape: [BATCH, CONFIG.dimPooled], data: pooledData },
    ]);
    const output = await runPython("integrations/torch/test_distill_resampler.py", {
      DISTILL_PARITY_DIR: dir,
    });
    assert.match(output, /OK/);
    console.log(output.trim());
    await Deno.remove(dir, { recursive: true });
  },
});
