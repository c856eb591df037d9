import assert from "node:assert/strict";
import { join } from "node:path";
import type { Gpu } from "../../src/gpu/device.ts";
import { SafetensorsFile, writeSafetensors } from "../../src/io/safetensors.ts";
import {
  destroyResampler,
  initResampler,
  loadResampler,
  loadResamplerWeights,
  resamplerParamCount,
  resamplerParamShapes,
  type ResamplerWeights,
  saveResampler,
} from "../../src/models/resampler_weights.ts";
import {
  destroyResamplerActivations,
  resamplerBackward,
  resamplerForward,
  resamplerForwardTrain,
  zeroResamplerGrads,
} from "../../src/models/resampler.ts";
import {
  parseResamplerConfig,
  readResamplerConfig,
  RESAMPLER_CONFIG_FILE,
  RESAMPLER_DEFAULTS,
  RESAMPLER_WEIGHTS_FILE,
  type ResamplerConfig,
} from "../../src/models/resampler_config.ts";
import { resamplerForwardRef } from "../../src/models/resampler_ref.ts";
import { Rng } from "../../src/util/rng.ts";
import { dot, numericGrad } from "../ops/finite_diff.ts";
import { assertMaxAbs, assertNmse, randn, testGpu } from "../helpers.ts";

const DIR = new URL("../fixtures/resampler/", import.meta.url).pathname;

/** Right-padded 0/1 mask rows -> number of real positions per row. */
function lengthsFromMask(mask: number[], batch: number): number[] {
  const t = mask.length / batch;
  return Array.from({ length: batch }, (_, b) => {
    const row = mask.slice(b * t, (b + 1) * t);
    const len = row.indexOf(0) === -1 ? t : row.indexOf(0);
    assert.ok(row.slice(len).every((m) => m === 0), `mask row ${b} is not right-padded`);
    return len;
  });
}

async function hostParams(gpu: Gpu, w: ResamplerWeights): Promise<Map<string, Float32Array>> {
  const values = await gpu.readAll([...w.params.values()]) as Float32Array[];
  return new Map([...w.params.keys()].map((name, i) => [name, values[i]]));
}

Deno.test("resampler forward matches the oracle fixture (seq, pooled, final latents)", async () => {
  const gpu = await testGpu();
  const config = await readResamplerConfig(`${DIR}config.json`);
  assert.equal(resamplerParamCount(config), 31256);
  const w = await loadResamplerWeights(gpu, config, `${DIR}model.safetensors`);
  const cases = await SafetensorsFile.open(`${DIR}cases.safetensors`);
  const hiddenHost = await cases.readF32("hidden");
  const lengths = lengthsFromMask(await cases.readIntegers("attention_mask"), 2);
  assert.deepEqual(lengths, [7, 11]);
  const hidden = gpu.upload(hiddenHost, [2, 11, 64], "f32", "hidden");
  const { seq, pooled, acts } = resamplerForwardTrain(gpu, w, hidden, lengths);
  const infer = resamplerForward(gpu, w, hidden, lengths);
  const [s, p, l, s2, p2] = await gpu.readAll([
    seq,
    pooled,
    acts.latentsOut,
    infer.seq,
    infer.pooled,
  ]) as Float32Array[];
  const expected = {
    seq: await cases.readF32("seq"),
    pooled: await cases.readF32("pooled"),
    latents: await cases.readF32("debug.latents_out"),
  };
  assertMaxAbs(expected.seq, s, 6e-5, "seq");
  assertMaxAbs(expected.pooled, p, 5e-5, "pooled");
  assertMaxAbs(expected.latents, l, 6e-5, "latents_out");
  assertNmse(expected.seq, s, 1e-6, "seq");
  assertNmse(expected.pooled, p, 1e-6, "pooled");
  assertNmse(expected.latents, l, 1e-6, "latents_out");
  // The inference forward frees as it goes but computes the same thing.
  assert.deepEqual(s2, s);
  assert.deepEqual(p2, p);
  // The float64 reference agrees with the oracle too.
  const ref = resamplerForwardRef(config, await hostParams(gpu, w), hiddenHost, lengths);
  assertMaxAbs(expected.seq, ref.seq, 2e-6, "reference seq");
  assertMaxAbs(expected.pooled, ref.pooled, 2e-6, "reference pooled");
  assertMaxAbs(expected.latents, ref.latents, 2e-6, "reference latents_out");
  destroyResamplerActivations(acts);
  for (const t of [hidden, seq, pooled, infer.seq, infer.pooled]) t.destroy();
  destroyResampler(w);
  cases.close();
});

const TINY: ResamplerConfig = {
  dimIn: 6,
  dim: 8,
  depth: 2,
  heads: 2,
  dimHead: 4,
  ffMult: 4,
  numQueries: 3,
  dimSeq: 5,
  dimPooled: 4,
  numPositions: 0,
  seqBias: false,
};

/** Random values everywhere (LayerNorm weights around 1), so no gradient is trivially zero. */
function randomParams(config: ResamplerConfig, seed: number): Map<string, Float32Array> {
  const params = new Map<string, Float32Array>();
  let i = 0;
  for (const [name, shape] of resamplerParamShapes(config)) {
    const values = randn(shape.reduce((a, b) => a * b, 1), seed + i++, 0.5);
    const isNormWeight = /norm[^.]*\.weight$/.test(name);
    params.set(name, isNormWeight ? values.map((v) => 1 + 0.4 * v) : values);
  }
  return params;
}

async function checkBackwardByFiniteDifferences(config: ResamplerConfig): Promise<void> {
  const gpu = await testGpu();
  const [batch, t] = [3, 5];
  const lengths = [3, 5, 0];
  const host = randomParams(config, 100);
  const w: ResamplerWeights = {
    config: config,
    params: new Map(
      [...host].map((
        [name, v],
      ) => [name, gpu.upload(v, resamplerParamShapes(config).get(name)!, "f32", name)]),
    ),
  };
  const hiddenHost = randn(batch * t * config.dimIn, 7);
  const dSeqHost = randn(batch * config.numQueries * config.dimSeq, 8);
  const dPooledHost = randn(batch * config.dimPooled, 9);
  const hidden = gpu.upload(hiddenHost, [batch, t, config.dimIn], "f32", "hidden");
  const dSeq = gpu.upload(dSeqHost, [batch, config.numQueries, config.dimSeq], "f32", "dSeq");
  const dPooled = gpu.upload(dPooledHost, [batch, config.dimPooled], "f32", "dPooled");
  const { seq, pooled, acts } = resamplerForwardTrain(gpu, w, hidden, lengths);
  // The gradients are added to what the buffers hold: start them at known values.
  const startHost = new Map([...host].map(([name, v], i) => [name, randn(v.length, 300 + i)]));
  const grads = new Map(
    [...startHost].map(([name, v]) => [name, gpu.upload(v, w.params.get(name)!.shape, "f32")]),
  );
  const dHidden = resamplerBackward(gpu, w, acts, dSeq, dPooled, grads);
  const [s, p, dh, ...g] = await gpu.readAll([
    seq,
    pooled,
    dHidden,
    ...grads.values(),
  ]) as Float32Array[];

  const ref = resamplerForwardRef(config, host, hiddenHost, lengths);
  assertNmse(ref.seq, s, 1e-11, "seq vs reference");
  assertNmse(ref.pooled, p, 1e-11, "pooled vs reference");

  const loss = (params: ReadonlyMap<string, ArrayLike<number>>, h: ArrayLike<number>) => {
    const out = resamplerForwardRef(config, params, h, lengths);
    return dot(dSeqHost, out.seq) + dot(dPooledHost, out.pooled);
  };
  [...grads.keys()].forEach((name, i) => {
    const fd = numericGrad(
      (v) => loss(new Map<string, ArrayLike<number>>([...host, [name, v]]), hiddenHost),
      host.get(name)!,
    );
    const added = g[i].map((v, j) => v - startHost.get(name)![j]);
    assertNmse(fd, added, 1e-10, `grad ${name} (added to the buffer's start value)`);
  });
  const fdHidden = numericGrad((h) => loss(host, h), hiddenHost);
  assertNmse(fdHidden, dh, 1e-10, "dHidden");
  // Padded positions are invisible, so their gradient is exactly zero.
  for (let b = 0; b < batch; b++) {
    const padded = dh.subarray((b * t + lengths[b]) * config.dimIn, (b + 1) * t * config.dimIn);
    assert.ok(padded.every((v) => v === 0), `dHidden of padded positions of row ${b}`);
  }
  destroyResamplerActivations(acts);
  for (const x of [hidden, dSeq, dPooled, seq, pooled, dHidden, ...grads.values()]) x.destroy();
  destroyResampler(w);
}

Deno.test("resampler backward matches finite differences of the float64 reference", () =>
  checkBackwardByFiniteDifferences(TINY));

Deno.test("resampler with positions and per-token output offsets: backward by finite differences", () =>
  // 7 positions for 5 student tokens: the two unused rows of pos_emb get a zero gradient.
  checkBackwardByFiniteDifferences({ ...TINY, numPositions: 7, seqBias: true }));

Deno.test("initResampler follows PyTorch's defaults and is reproducible from the seed", async () => {
  const gpu = await testGpu();
  const config = { ...TINY, dimIn: 40, dim: 16 };
  const a = await hostParams(gpu, initResampler(gpu, config, new Rng(5)));
  const b = await hostParams(gpu, initResampler(gpu, config, new Rng(5)));
  assert.deepEqual([...a.keys()], [...resamplerParamShapes(config).keys()]);
  assert.deepEqual(a, b);
  const within = (v: Float32Array, bound: number) => v.every((x) => Math.abs(x) <= bound);
  assert.ok(within(a.get("proj_in.weight")!, 1 / Math.sqrt(40)));
  assert.ok(within(a.get("proj_in.bias")!, 1 / Math.sqrt(40)));
  assert.ok(within(a.get("layers.1.ff.w2.weight")!, 1 / Math.sqrt(64)));
  assert.ok(!within(a.get("proj_in.weight")!, 0.9 / Math.sqrt(40)), "uses the whole range");
  assert.ok(a.get("layers.0.attn.norm_x.weight")!.every((x) => x === 1));
  assert.ok(a.get("norm_pool.bias")!.every((x) => x === 0));
  const latents = a.get("latents")!;
  const std = Math.sqrt(latents.reduce((s, x) => s + x * x, 0) / latents.length);
  assert.ok(std > 0.15 && std < 0.35, `latents std ${std}, expected about 16^-0.5 = 0.25`);
});

/** The parameter count from the architecture, written out independently of `paramSpecs`. */
function closedFormCount(c: ResamplerConfig): number {
  const inner = c.heads * c.dimHead;
  const norm = 2 * c.dim;
  const block = 3 * norm + inner * c.dim + 2 * inner * c.dim + c.dim * inner +
    2 * c.ffMult * c.dim * c.dim;
  return c.numQueries * c.dim + (c.dimIn * c.dim + c.dim) + c.depth * block +
    (c.dimSeq * c.dim + c.dimSeq) + norm + (c.dimPooled * c.dim + c.dimPooled) +
    c.numPositions * c.dim + (c.seqBias ? c.numQueries * c.dimSeq : 0);
}

Deno.test("resampler parameter count matches the closed formula, defaults and options", () => {
  const defaults = { dimIn: 2560, ...RESAMPLER_DEFAULTS };
  assert.equal(resamplerParamCount(defaults), 213_601_536);
  for (
    const config of [
      defaults,
      TINY,
      { ...TINY, numPositions: 7, seqBias: true },
      { ...defaults, numPositions: 256, seqBias: true },
    ]
  ) {
    assert.equal(resamplerParamCount(config), closedFormCount(config), JSON.stringify(config));
  }
});

Deno.test("saveResampler and loadResampler round-trip config and weights", async () => {
  const gpu = await testGpu();
  const dir = await Deno.makeTempDir();
  try {
    const w = initResampler(gpu, TINY, new Rng(3));
    await saveResampler(gpu, w, dir);
    const json = JSON.parse(await Deno.readTextFile(join(dir, RESAMPLER_CONFIG_FILE)));
    assert.deepEqual(json, {
      dim_in: 6,
      dim: 8,
      depth: 2,
      heads: 2,
      dim_head: 4,
      ff_mult: 4,
      num_queries: 3,
      dim_seq: 5,
      dim_pooled: 4,
    });
    const file = await SafetensorsFile.open(join(dir, RESAMPLER_WEIGHTS_FILE));
    assert.deepEqual(file.names(), [...resamplerParamShapes(TINY).keys()]);
    file.close();
    assert.deepEqual(
      (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort(),
      [
        RESAMPLER_CONFIG_FILE,
        RESAMPLER_WEIGHTS_FILE,
      ].sort(),
    );
    const loaded = await loadResampler(gpu, dir, { studentHiddenSize: 6 });
    assert.deepEqual(loaded.config, TINY);
    assert.deepEqual(await hostParams(gpu, loaded), await hostParams(gpu, w));
    destroyResampler(w);
    destroyResampler(loaded);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("resampler config and weight errors name the file, the key and the fix", async () => {
  const gpu = await testGpu();
  assert.deepEqual(parseResamplerConfig({ dim_in: 2560 }, "c.json"), {
    dimIn: 2560,
    ...RESAMPLER_DEFAULTS,
  });
  assert.throws(() => parseResamplerConfig({ dim: 8 }, "c.json"), /c.json: 'dim_in'.*required/);
  assert.throws(
    () => parseResamplerConfig({ dim_in: 8, depht: 2 }, "c.json"),
    /c.json: unknown key 'depht'/,
  );
  assert.throws(
    () => parseResamplerConfig({ dim_in: 8, dim_head: 6 }, "c.json"),
    /'dim_head' 6 must be a multiple of 4/,
  );
  assert.throws(
    () => parseResamplerConfig({ dim_in: 8, heads: 0 }, "c.json"),
    /'heads' must be a positive integer/,
  );

  const dir = await Deno.makeTempDir();
  try {
    const w = initResampler(gpu, TINY, new Rng(1));
    await saveResampler(gpu, w, dir);
    await assert.rejects(
      loadResampler(gpu, dir, { studentHiddenSize: 2560 }),
      /this resampler expects dim_in 6 but the student has hidden size 2560/,
    );
    const weightsPath = join(dir, RESAMPLER_WEIGHTS_FILE);
    const values = await hostParams(gpu, w);
    const shapes = resamplerParamShapes(TINY);
    const write = (skip: string, reshape?: [string, number[]], extra?: string) =>
      writeSafetensors(weightsPath, [
        ...[...values].filter(([name]) => name !== skip).map(([name, data]) => ({
          name,
          dtype: "F32" as const,
          shape: reshape?.[0] === name ? reshape[1] : shapes.get(name)!,
          data,
        })),
        ...(extra
          ? [{ name: extra, dtype: "F32" as const, shape: [1], data: new Float32Array(1) }]
          : []),
      ]);
    await write("layers.1.ff.w1.weight");
    await assert.rejects(
      loadResampler(gpu, dir),
      /resampler.safetensors: tensor "layers.1.ff.w1.weight" is missing, but the resampler of depth 2 per .*resampler_config.json needs it/,
    );
    await write("", ["latents", [8, 3]]);
    await assert.rejects(
      loadResampler(gpu, dir),
      /tensor "latents" has shape \[8,3\] but .*resampler_config.json implies \[3,8\]/,
    );
    await write("", undefined, "layers.2.ff.w1.weight");
    await assert.rejects(
      loadResampler(gpu, dir),
      /unexpected tensor "layers.2.ff.w1.weight": the resampler of depth 2 per .*resampler_config.json has no such tensor/,
    );
    await Deno.writeTextFile(join(dir, RESAMPLER_CONFIG_FILE), "{");
    await assert.rejects(loadResampler(gpu, dir), /resampler_config.json: invalid JSON/);
    await assert.rejects(
      loadResampler(gpu, join(dir, "nope")),
      /resampler_config.json not found/,
    );

    const hidden = gpu.upload(randn(2 * 4 * 5, 1), [2, 4, 5], "f32", "hidden");
    assert.throws(
      () => resamplerForward(gpu, w, hidden, [4, 4]),
      /expects dim_in 6 but the student has hidden size 5/,
    );
    const good = gpu.upload(randn(2 * 4 * 6, 1), [2, 4, 6], "f32", "hidden");
    assert.throws(
      () => resamplerForward(gpu, w, good, [4, 5]),
      /keyLengths\[1\] = 5 is outside \[0, 4\]/,
    );
    assert.throws(
      () => resamplerForward(gpu, w, good, [4]),
      /keyLengths has 1 entries, 2 expected/,
    );
    const { seq, pooled, acts } = resamplerForwardTrain(gpu, w, good, [4, 2]);
    const grads = zeroResamplerGrads(gpu, w);
    assert.throws(
      () => resamplerBackward(gpu, w, acts, pooled, seq, grads),
      /dSeq .* must be f32 \[2,3,5\]/,
    );
    const latentsGrad = grads.get("latents")!;
    grads.delete("latents");
    assert.throws(
      () => resamplerBackward(gpu, w, acts, seq, pooled, grads),
      /no gradient buffer for parameter 'latents'/,
    );
    latentsGrad.destroy();
    for (const g of grads.values()) g.destroy();
    destroyResamplerActivations(acts);
    for (const t of [hidden, good, seq, pooled]) t.destroy();
    destroyResampler(w);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
