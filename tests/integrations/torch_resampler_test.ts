import assert from "node:assert/strict";
import { join } from "node:path";
import { writeSafetensors } from "../../src/io/safetensors.ts";
import { initResampler, saveResampler } from "../../src/models/resampler_weights.ts";
import { resamplerForward } from "../../src/models/resampler.ts";
import { Rng } from "../../src/util/rng.ts";
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
  numPositions: 0,
  seqBias: false,
};

for (
  const [label, config] of [
    ["", CONFIG],
    // The mean start's per-token offset and learned positions (random, not their initial values).
    [" with seq_bias and pos_emb", { ...CONFIG, numPositions: 9, seqBias: true }],
  ] as const
) {
  Deno.test({
    name: torchPython
      ? `torch DistillResampler matches distill's resampler on the same weights and input${label}`
      : `torch DistillResampler parity${label} (ignored: no python3 that imports torch; set DISTILL_PYTHON)`,
    ignore: !torchPython,
    async fn() {
      const gpu = await testGpu();
      const dir = await Deno.makeTempDir({ prefix: "distill-torch-parity-" });
      const weights = initResampler(gpu, config, new Rng(7));
      for (const name of ["seq_bias", "pos_emb"]) {
        const t = weights.params.get(name);
        if (t) gpu.write(t, randn(t.size, 9));
      }
      await saveResampler(gpu, weights, join(dir, "resampler"));
      const hidden = randn(BATCH * SEQ * config.dimIn, 8);
      // A full row, a padded one and one with no text at all (only the latents are visible).
      const keyLengths = [SEQ, 4, 0];
      const input = gpu.upload(hidden, [BATCH, SEQ, config.dimIn], "f32", "hidden");
      const { seq, pooled } = resamplerForward(gpu, weights, input, keyLengths);
      const [seqData, pooledData] = (await gpu.readAll([seq, pooled])) as Float32Array[];
      for (const t of [input, seq, pooled, ...weights.params.values()]) t.destroy();
      await writeSafetensors(join(dir, "case.safetensors"), [
        { name: "hidden", dtype: "F32", shape: [BATCH, SEQ, config.dimIn], data: hidden },
        { name: "key_lengths", dtype: "F32", shape: [BATCH], data: Float32Array.from(keyLengths) },
        {
          name: "seq",
          dtype: "F32",
          shape: [BATCH, config.numQueries, config.dimSeq],
          data: seqData,
        },
        { name: "pooled", dtype: "F32", shape: [BATCH, config.dimPooled], data: pooledData },
      ]);
      const output = await runPython("integrations/torch/test_distill_resampler.py", {
        DISTILL_PARITY_DIR: dir,
        ...(config.seqBias ? { DISTILL_PARITY_ONLY: "1" } : {}),
      });
      assert.match(output, /OK/);
      console.log(output.trim());
      await Deno.remove(dir, { recursive: true });
    },
  });
}
