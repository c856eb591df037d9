import assert from "node:assert/strict";
import { ModelFolder } from "../../src/io/hf.ts";
import { SafetensorsFile } from "../../src/io/safetensors.ts";
import { loadLora } from "../../src/models/lora.ts";
import type { TokenBatch } from "../../src/models/qwen3.ts";
import { loadQwen3Weights, qwen3LinearShapes } from "../../src/models/qwen3_weights.ts";
import { loadResamplerWeights } from "../../src/models/resampler_weights.ts";
import { parseResamplerConfig } from "../../src/models/resampler_config.ts";
import { DistillStep, type MicroBatch, type StudentModel } from "../../src/train/step.ts";
import { testGpu } from "../helpers.ts";

const FIX = new URL("../fixtures/", import.meta.url).pathname;

/**
 * Tolerances as the fixture README states them: the first value holds when the optimizer is
 * fed the stored gradients, the last (where there are two) when our own gradients are used end
 * to end, which AdamW's first steps amplify where |g| is tiny.
 */
async function tolerances(): Promise<Map<string, number[]>> {
  const text = await Deno.readTextFile(`${FIX}train_step/README.md`);
  const out = new Map<string, number[]>();
  for (const line of text.split("\n")) {
    const m = line.match(/^\| `([^`]+)` \|.*\| ([^|]*) \|$/);
    if (!m) continue;
    // "abs 8.0e-07 (stored inputs fed) / 8.0e-05 (end to end)": every number after "abs".
    const column = m[2].slice(m[2].indexOf("abs "));
    const abs = m[2].includes("abs ")
      ? [...column.matchAll(/[0-9.]+e[+-][0-9]+/g)].map((x) => Number(x[0]))
      : [];
    if (abs.length) out.set(m[1], abs);
  }
  return out;
}

async function loadStudent(): Promise<StudentModel> {
  const gpu = await testGpu();
  const qwen = await loadQwen3Weights(gpu, await ModelFolder.open(`${FIX}qwen3`));
  const lora = await loadLora(
    gpu,
    `${FIX}qwen3/lora`,
    qwen3LinearShapes(qwen.config),
    qwen.config.numLayers,
  );
  const config = parseResamplerConfig(
    JSON.parse(await Deno.readTextFile(`${FIX}resampler/config.json`)),
    "fixture resampler config",
  );
  const resampler = await loadResamplerWeights(gpu, config, `${FIX}resampler/model.safetensors`);
  return { qwen, lora, resampler };
}

async function fixtureBatch(cases: SafetensorsFile, rows: number[]): Promise<MicroBatch> {
  const ids = await cases.readIntegers("input_ids");
  const mask = await cases.readIntegers("attention_mask");
  const seq = await cases.readF32("target_seq");
  const pooled = await cases.readF32("target_pooled");
  const [b, t] = cases.info("input_ids").shape;
  const seqRow = seq.length / b;
  const pooledRow = pooled.length / b;
  const tokens: TokenBatch = {
    ids: Int32Array.from(rows.flatMap((r) => ids.slice(r * t, (r + 1) * t))),
    lengths: rows.map((r) => mask.slice(r * t, (r + 1) * t).reduce((a, x) => a + x, 0)),
    batch: rows.length,
    seqLen: t,
  };
  return {
    tokens,
    targetSeq: Float32Array.from(
      rows.flatMap((r) => [...seq.subarray(r * seqRow, (r + 1) * seqRow)]),
    ),
    targetPooled: Float32Array.from(
      rows.flatMap((r) => [...pooled.subarray(r * pooledRow, (r + 1) * pooledRow)]),
    ),
  };
}

function maxAbs(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

async function compareTensors(
  step: DistillStep,
  cases: SafetensorsFile,
  prefix: string,
  tensors: ReadonlyMap<string, import("../../src/gpu/tensor.ts").Tensor>,
  tol: Map<string, number[]>,
  which: "first" | "last",
) {
  const names = [...tensors.keys()];
  const got = (await step.gpu.readAll(names.map((n) => tensors.get(n)!))) as Float32Array[];
  for (let i = 0; i < names.length; i++) {
    const key = `${prefix}${names[i]}`;
    const expected = await cases.readF32(key);
    const bounds = tol.get(key)!;
    const bound = which === "first" ? bounds[0] : bounds[bounds.length - 1];
    const err = maxAbs(expected, got[i]);
    assert.ok(err <= bound, `${key}: max |diff| ${err} over ${bound}`);
  }
}

function near(name: string, actual: number, expected: number, bound: number) {
  assert.ok(
    Math.abs(actual - expected) <= bound,
    `${name}: ${actual} vs ${expected} (bound ${bound})`,
  );
}

Deno.test("a distillation step matches the train_step fixture: loss, gradients, norms, AdamW x2, accumulation", async () => {
  const gpu = await testGpu();
  const tol = await tolerances();
  const config = JSON.parse(await Deno.readTextFile(`${FIX}train_step/train_config.json`));
  const settings = {
    lr: { resampler: config.optimizer.lr_resampler, lora: config.optimizer.lr_lora },
    weightDecay: config.optimizer.weight_decay,
    maxGradNorm: config.max_grad_norm,
  };
  const cases = await SafetensorsFile.open(`${FIX}train_step/cases.safetensors`);
  const scalar = async (name: string) => (await cases.readF32(name))[0];
  const full = await fixtureBatch(cases, [0, 1]);

  const student = await loadStudent();
  const step = new DistillStep(gpu, student, settings, { gradientCheckpointing: false });
  step.accumulate(full, 1, 0);
  const m1 = await step.measure();
  near("loss", m1.loss, await scalar("loss"), tol.get("loss")![0]);
  near("loss_seq", m1.lossSeq, await scalar("loss_seq"), tol.get("loss_seq")![0]);
  near("loss_pooled", m1.lossPooled, await scalar("loss_pooled"), tol.get("loss_pooled")![0]);
  await compareTensors(step, cases, "grad.", step.gradients(), tol, "first");
  near("grad_norm", m1.gradNorm.total, await scalar("grad_norm"), tol.get("grad_norm")![0]);
  near(
    "grad_norm.lora",
    m1.gradNorm.lora,
    await scalar("grad_norm.lora"),
    tol.get("grad_norm.lora")![0],
  );
  near(
    "grad_norm.resampler",
    m1.gradNorm.resampler,
    await scalar("grad_norm.resampler"),
    tol.get("grad_norm.resampler")![0],
  );
  const coef1 = step.apply(m1.gradNorm.total, 1);
  near("clip_coef", coef1, await scalar("clip_coef"), tol.get("clip_coef")![0]);
  const params = () =>
    new Map([
      ...step.student.resampler.params,
      ...step.optimizer.groups.find((g) => g.name === "lora")!.params,
    ]);
  // End to end (our own gradients), so the looser second tolerance applies.
  await compareTensors(step, cases, "step1.", params(), tol, "last");

  step.accumulate(full, 1, 0);
  const m2 = await step.measure();
  near("step2.loss", m2.loss, await scalar("step2.loss"), tol.get("step2.loss")!.at(-1)!);
  step.apply(m2.gradNorm.total, 1);
  await compareTensors(step, cases, "step2.", params(), tol, "last");
  step.destroy();

  const fresh = await loadStudent();
  const accum = new DistillStep(gpu, fresh, settings, { gradientCheckpointing: true });
  accum.accumulate(await fixtureBatch(cases, [0]), 0.5, 0);
  accum.accumulate(await fixtureBatch(cases, [1]), 0.5, 0);
  const ma = await accum.measure();
  await compareTensors(accum, cases, "accum.grad.", accum.gradients(), tol, "first");
  near(
    "accum.grad_norm",
    ma.gradNorm.total,
    await scalar("accum.grad_norm"),
    tol.get("accum.grad_norm")![0],
  );
  accum.apply(ma.gradNorm.total, 1);
  const accumParams = new Map([
    ...accum.student.resampler.params,
    ...accum.optimizer.groups.find((g) => g.name === "lora")!.params,
  ]);
  await compareTensors(accum, cases, "accum.step1.", accumParams, tol, "last");
  accum.destroy();
  cases.close();
});

/** `micro`'s rows in the order `order`, each padded with `padId` to `seqLen`. */
function repad(micro: MicroBatch, order: number[], seqLen: number, padId: number): MicroBatch {
  const { ids, lengths, seqLen: t } = micro.tokens;
  const seqRow = micro.targetSeq.length / lengths.length;
  const pooledRow = micro.targetPooled.length / lengths.length;
  const out = new Int32Array(order.length * seqLen);
  order.forEach((r, b) => {
    const row = ids.subarray(r * t, r * t + lengths[r]);
    out.set(row, b * seqLen);
    out.fill(padId, b * seqLen + row.length, (b + 1) * seqLen);
  });
  const pick = (data: Float32Array, size: number) =>
    Float32Array.from(order.flatMap((r) => [...data.subarray(r * size, (r + 1) * size)]));
  return {
    tokens: { ids: out, lengths: order.map((r) => lengths[r]), batch: order.length, seqLen },
    targetSeq: pick(micro.targetSeq, seqRow),
    targetPooled: pick(micro.targetPooled, pooledRow),
  };
}

Deno.test("length bucketing does not change a step: rows reordered and padded only to their longest give the same loss and gradients", async () => {
  const gpu = await testGpu();
  const settings = { lr: { resampler: 1e-3, lora: 1e-4 }, weightDecay: 0.01, maxGradNorm: 0.5 };
  const cases = await SafetensorsFile.open(`${FIX}train_step/cases.safetensors`);
  const full = await fixtureBatch(cases, [0, 1]);
  cases.close();
  const { ids, lengths, seqLen } = full.tokens;
  const shorter = lengths.indexOf(Math.min(...lengths));
  assert.ok(lengths[shorter] < seqLen, "one fixture row is padded");
  const padId = ids[shorter * seqLen + seqLen - 1];
  const longest = Math.max(...lengths);
  const results = [];
  for (
    const micro of [repad(full, [0, 1], seqLen + 9, padId), repad(full, [1, 0], longest, padId)]
  ) {
    const step = new DistillStep(gpu, await loadStudent(), settings, {
      gradientCheckpointing: false,
    });
    step.accumulate(micro, 1, 0);
    const measured = await step.measure();
    const names = [...step.gradients().keys()];
    const grads = (await gpu.readAll(names.map((n) => step.gradients().get(n)!))) as Float32Array[];
    results.push({ measured, grads: new Map(names.map((n, i) => [n, grads[i]])) });
    step.destroy();
  }
  const [padded, bucketed] = results;
  near("loss", bucketed.measured.loss, padded.measured.loss, 1e-6 * padded.measured.loss);
  near(
    "grad_norm",
    bucketed.measured.gradNorm.total,
    padded.measured.gradNorm.total,
    1e-5 * padded.measured.gradNorm.total,
  );
  for (const [name, g] of padded.grads) {
    const scale = Math.max(...g.map(Math.abs));
    const err = maxAbs(g, bucketed.grads.get(name)!);
    assert.ok(err <= 1e-4 * scale, `${name}: max |diff| ${err} over 1e-4 x ${scale}`);
  }
});

Deno.test("steps after the first create no buffer and no bind group, with checkpointing and accumulation; one readback and one submit per micro-batch plus the read", async () => {
  const gpu = await testGpu();
  const settings = { lr: { resampler: 1e-3, lora: 1e-4 }, weightDecay: 0.01, maxGradNorm: 0.5 };
  const cases = await SafetensorsFile.open(`${FIX}train_step/cases.safetensors`);
  const micros = [await fixtureBatch(cases, [0]), await fixtureBatch(cases, [1])];
  cases.close();
  const step = new DistillStep(gpu, await loadStudent(), settings, {
    gradientCheckpointing: true,
  });
  const counts = [];
  for (let i = 0; i < 3; i++) {
    const before = gpu.stats;
    const result = await step.step(micros, 1, i);
    assert.ok(Number.isFinite(result.loss) && result.loss > 0, `step ${i + 1} loss ${result.loss}`);
    const after = gpu.stats;
    counts.push({
      buffers: after.buffersCreated - before.buffersCreated,
      bindGroups: after.bindGroupsCreated - before.bindGroupsCreated,
      readbacks: after.readbacks - before.readbacks,
      submits: after.submits - before.submits,
    });
  }
  // k + 1 submissions for k micro-batches: the second's upload sends the first's work, the read
  // the second's, and apply its AdamW update.
  const steady = { buffers: 0, bindGroups: 0, readbacks: 1, submits: 3 };
  assert.deepEqual(counts.slice(1), [steady, steady]);
  step.destroy();
});
