import assert from "node:assert/strict";
import type { Tensor } from "../../src/gpu/tensor.ts";
import { SafetensorsFile } from "../../src/io/safetensors.ts";
import {
  AdamW,
  type AdamWGroup,
  clipCoefficient,
  gradNorms,
  lrFactor,
  mseLoss,
  squareSumPartials,
  warmupSteps,
} from "../../src/train/optim.ts";
import { adamwStepRef, mseLossRef, sumOfSquaresRef } from "../../src/train/optim_ref.ts";
import { assertMaxAbs, assertNmse, randn, testGpu } from "../helpers.ts";

const FIXTURE = new URL("../fixtures/train_step/", import.meta.url);
const fixturePath = (file: string) => new URL(file, FIXTURE).pathname;

function assertClose(expected: number, actual: number, tol: number, what: string): void {
  assert.ok(
    Math.abs(actual - expected) <= tol,
    `${what}: ${actual} vs ${expected} (|diff| ${Math.abs(actual - expected)} over ${tol})`,
  );
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  return worst;
}

// Lengths around the workgroup size (256) and past the 1024-partial cap (256 * 1024).
const ODD_LENGTHS = [1, 37, 255, 257, 1000, 300007];

Deno.test("mseLoss matches the reference on odd lengths, with and without lossScale", async () => {
  const gpu = await testGpu();
  const cases = ODD_LENGTHS.map((n, i) => {
    const pred = randn(n, 10 + i);
    const target = randn(n, 20 + i, 0.5);
    const lossScale = i % 2 ? 0.25 : 1;
    const tp = gpu.upload(pred, [n], "f32", "pred");
    const tt = gpu.upload(target, [n], "f32", "target");
    return {
      n,
      ref: mseLossRef(pred, target, lossScale),
      tp,
      tt,
      ...mseLoss(gpu, tp, tt, { lossScale }),
    };
  });
  const out = await gpu.readAll(cases.flatMap((c) => [c.loss, c.grad])) as Float32Array[];
  cases.forEach(({ n, ref }, i) => {
    assertClose(ref.loss, out[2 * i][0], 1e-6 * ref.loss, `loss n=${n}`);
    assertNmse(ref.grad, out[2 * i + 1], 1e-12, `grad n=${n}`);
  });
  for (const c of cases) for (const t of [c.tp, c.tt, c.loss, c.grad]) t.destroy();
});

Deno.test("mseLoss and the norm partials are bit-for-bit reproducible", async () => {
  const gpu = await testGpu();
  const n = 300007;
  const pred = gpu.upload(randn(n, 1), [n], "f32", "pred");
  const target = gpu.upload(randn(n, 2), [n], "f32", "target");
  const quad = gpu.upload(randn(n + 1, 3), [n + 1], "f32", "quad");
  const runs = [0, 1].map(() => {
    const { loss, grad } = mseLoss(gpu, pred, target);
    // pred's length is odd (the scalar reduction), quad's divisible by 4 (the vec4 one).
    return { loss, grad, norms: squareSumPartials(gpu, [pred, target, quad]).partials };
  });
  const out = await gpu.readAll(runs.flatMap((r) => [r.loss, r.grad, r.norms]));
  for (let k = 0; k < 3; k++) {
    assert.deepEqual(out[k], out[k + 3], `output ${k} differs between runs`);
  }
  for (const t of [pred, target, quad, ...runs.flatMap((r) => [r.loss, r.grad, r.norms])]) {
    t.destroy();
  }
});

Deno.test("mseLoss's gradient matches central finite differences of its loss", async () => {
  const gpu = await testGpu();
  const n = 53;
  const pred = randn(n, 5);
  const target = randn(n, 6);
  const tt = gpu.upload(target, [n], "f32", "target");
  const tp = gpu.upload(pred, [n], "f32", "pred");
  const { loss, grad } = mseLoss(gpu, tp, tt, { lossScale: 0.5 });
  const h = 0.05;
  const probes = [0, 7, 26, 52].flatMap((i) =>
    [h, -h].map((delta) => {
      const shifted = pred.slice();
      shifted[i] += delta;
      const t = gpu.upload(shifted, [n], "f32", "shifted");
      const r = mseLoss(gpu, t, tt);
      r.grad.destroy();
      return { i, t, loss: r.loss };
    })
  );
  const out = await gpu.readAll([grad, ...probes.map((p) => p.loss)]) as Float32Array[];
  for (let k = 0; k < probes.length; k += 2) {
    const i = probes[k].i;
    // lossScale 0.5 scales the gradient of the (unscaled) loss.
    const numeric = (0.5 * (out[1 + k][0] - out[2 + k][0])) / (2 * h);
    assertClose(
      numeric,
      out[0][i],
      1e-4 * Math.max(1, Math.abs(numeric)) + 2e-6,
      `d loss/d pred[${i}]`,
    );
  }
  for (const t of [tt, tp, loss, grad, ...probes.flatMap((p) => [p.t, p.loss])]) t.destroy();
});

Deno.test("micro-batches with lossScale 1/k give the full batch's gradient rows and mean loss", async () => {
  const gpu = await testGpu();
  // The fixture's seq shapes: [2, 6, 80], split into micro-batches of rows [0] and [1].
  const k = 2;
  const row = 6 * 80;
  const pred = randn(k * row, 31);
  const target = randn(k * row, 32);
  const inputs = [
    gpu.upload(pred, [k, 6, 80], "f32", "pred"),
    gpu.upload(target, [k, 6, 80], "f32", "target"),
  ];
  const full = mseLoss(gpu, inputs[0], inputs[1]);
  const micro = [0, 1].map((r) => {
    const rows = (x: Float32Array, name: string) =>
      gpu.upload(x.subarray(r * row, (r + 1) * row), [1, 6, 80], "f32", name);
    inputs.push(rows(pred, `pred${r}`), rows(target, `target${r}`));
    return mseLoss(gpu, inputs.at(-2)!, inputs.at(-1)!, { lossScale: 1 / k });
  });
  const outputs = [full, ...micro].flatMap((r) => [r.loss, r.grad]);
  const [fullLoss, fullGrad, loss0, grad0, loss1, grad1] = await gpu.readAll(
    outputs,
  ) as Float32Array[];
  // Chained through the backward pass, these rows sum to the full batch's parameter gradients.
  assertMaxAbs(fullGrad.subarray(0, row), grad0, 1e-9, "micro-batch 0 gradient");
  assertMaxAbs(fullGrad.subarray(row), grad1, 1e-9, "micro-batch 1 gradient");
  // The returned losses are unscaled, like the fixture's accum.micro*.loss.
  assertClose(fullLoss[0], (loss0[0] + loss1[0]) / k, 1e-6, "mean of the micro-batch losses");
  for (const t of [...inputs, ...outputs]) t.destroy();
});

Deno.test("gradNorms matches the reference per group and in total (odd, vec4 and empty tensors)", async () => {
  const gpu = await testGpu();
  // Lengths divisible by 4 (1000, 300008) take the vec4 reduction, the others the scalar one.
  const data = [...ODD_LENGTHS, 300008, 0].map((n, i) => randn(n, 40 + i, 0.1 * (i + 1)));
  const tensors = data.map((d, i) => gpu.upload(d, [d.length], "f32", `g${i}`));
  const norms = await gradNorms(gpu, { a: tensors.slice(0, 3), b: tensors.slice(3), none: [] });
  const sq = data.map(sumOfSquaresRef);
  const groupA = Math.sqrt(sq.slice(0, 3).reduce((s, x) => s + x));
  const groupB = Math.sqrt(sq.slice(3).reduce((s, x) => s + x));
  assertClose(groupA, norms.groups.a, 1e-6 * groupA, "group a");
  assertClose(groupB, norms.groups.b, 1e-6 * groupB, "group b");
  assert.equal(norms.groups.none, 0);
  assertClose(Math.hypot(groupA, groupB), norms.total, 1e-6 * norms.total, "total");
  for (const t of tensors) t.destroy();
});

Deno.test("clipCoefficient is torch's clip_grad_norm_ factor", () => {
  assert.equal(clipCoefficient(0.3, 0.5), 1);
  assert.equal(clipCoefficient(10, 0.5), 0.5 / (10 + 1e-6));
  assert.equal(clipCoefficient(0, 1), 1);
});

/** One optimizer over the given sizes, stepped with fresh random gradients, vs the reference. */
async function checkAdamW(sizes: number[], steps: Array<{ clipCoef: number; lrFactor: number }>) {
  const gpu = await testGpu();
  const options = { betas: [0.9, 0.999] as const, eps: 1e-8, weightDecay: 0.01 };
  const lrs = [1e-3, 2e-4];
  const init = sizes.map((n, i) => randn(n, 100 + i));
  const params = init.map((d, i) => gpu.upload(d, [d.length], "f32", `p${i}`));
  const groups: AdamWGroup[] = lrs.map((lr, g) => ({
    name: `g${g}`,
    lr,
    weightDecay: g === 1 ? 0.1 : undefined,
    params: new Map(params.flatMap((p, i) => (i % 2 === g ? [[`p${i}`, p]] : []))),
  }));
  const opt = new AdamW(gpu, groups, options);
  const ref = init.map((d) => ({
    p: Float64Array.from(d),
    m: new Float64Array(d.length),
    v: new Float64Array(d.length),
  }));
  for (const [s, { clipCoef, lrFactor }] of steps.entries()) {
    // Gradients from 1e-7 to 0.1 in size, so eps (1e-8) matters for some elements.
    const grads = sizes.map((n, i) =>
      randn(n, 200 + 10 * s + i).map((g, k) => g * 10 ** ((k % 7) - 7))
    );
    const tg = grads.map((g, i) => gpu.upload(g, [g.length], "f32", `grad${i}`));
    opt.step(new Map(tg.map((t, i) => [`p${i}`, t])), { clipCoef, lrFactor });
    ref.forEach((r, i) =>
      adamwStepRef(r.p, grads[i], r.m, r.v, {
        lr: lrs[i % 2] * lrFactor,
        weightDecay: i % 2 === 1 ? 0.1 : 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step: s + 1,
        clipCoef,
      })
    );
    gpu.flush();
    for (const t of tg) t.destroy();
  }
  assert.equal(opt.stepCount, steps.length);
  const got = await gpu.readAll(params) as Float32Array[];
  const state = await opt.state();
  ref.forEach((r, i) => {
    const what = `p${i} [${sizes[i]}]`;
    // The update (~lr per step) is what to compare, not the parameter it is added to; f32
    // rounding of parameters ~1 is up to ~1e-4 of an update of lr 2e-4.
    const delta = (x: ArrayLike<number>) => Float64Array.from(init[i], (p0, k) => x[k] - p0);
    assertNmse(delta(r.p), delta(got[i]), 1e-6, `${what} update`);
    assertMaxAbs(r.p, got[i], 1e-6, what);
    assertNmse(r.m, state.m.get(`p${i}`)!, 1e-10, `${what} m`);
    assertNmse(r.v, state.v.get(`p${i}`)!, 1e-10, `${what} v`);
  });
  opt.destroy();
  for (const t of params) t.destroy();
}

Deno.test("AdamW matches the reference over 3 steps with clipping, schedule and groups", async () => {
  await checkAdamW([1, 37, 255, 1000, 70001], [
    { clipCoef: 1, lrFactor: 0 },
    { clipCoef: 0.3, lrFactor: 1 },
    { clipCoef: 1, lrFactor: 0.55 },
  ]);
});

Deno.test("AdamW's vec4 kernel (lengths divisible by 4) gives the scalar kernel's bits", async () => {
  const gpu = await testGpu();
  // The first 1000 elements of a [1001] tensor take the f32 `adamw`, a [1000] one the vec4 one.
  const init = randn(1001, 7);
  const grad = randn(1001, 8).map((g, k) => g * 10 ** ((k % 7) - 7));
  const scalar = gpu.upload(init, [1001], "f32", "scalar");
  const vec4 = gpu.upload(init.slice(0, 1000), [1000], "f32", "vec4");
  const opt = new AdamW(gpu, [{
    name: "all",
    lr: 1e-3,
    params: new Map([["scalar", scalar], ["vec4", vec4]]),
  }]);
  const grads = new Map([
    ["scalar", gpu.upload(grad, [1001], "f32", "g.scalar")],
    ["vec4", gpu.upload(grad.slice(0, 1000), [1000], "f32", "g.vec4")],
  ]);
  for (let step = 0; step < 2; step++) opt.step(grads, { clipCoef: 0.5 });
  const [a, b] = await gpu.readAll([scalar, vec4]) as Float32Array[];
  const state = await opt.state();
  assert.deepEqual(b, a.slice(0, 1000));
  assert.deepEqual(state.m.get("vec4"), state.m.get("scalar")!.slice(0, 1000));
  assert.deepEqual(state.v.get("vec4"), state.v.get("scalar")!.slice(0, 1000));
  opt.destroy();
  for (const t of [scalar, vec4, ...grads.values()]) t.destroy();
});

Deno.test("AdamW state round-trips through state()/loadState() and checks its input", async () => {
  const gpu = await testGpu();
  const n = 300;
  const make = () => gpu.upload(randn(n, 7), [n], "f32", "w");
  const [wa, wb] = [make(), make()];
  const grad = gpu.upload(randn(n, 8), [n], "f32", "g");
  const a = new AdamW(gpu, [{ name: "x", lr: 1e-3, params: new Map([["w", wa]]) }]);
  const b = new AdamW(gpu, [{ name: "x", lr: 1e-3, params: new Map([["w", wb]]) }]);
  a.step(new Map([["w", grad]]));
  b.step(new Map([["w", grad]]));
  const saved = await a.state();
  // A fresh optimiser loaded from the checkpoint continues exactly like the original.
  const c = new AdamW(gpu, [{ name: "x", lr: 1e-3, params: new Map([["w", wb]]) }]);
  c.loadState(saved);
  assert.equal(c.stepCount, 1);
  a.step(new Map([["w", grad]]));
  c.step(new Map([["w", grad]]));
  const [ra, rc] = await gpu.readAll([wa, wb]);
  assert.deepEqual(ra, rc);

  assert.throws(() => a.step(new Map()), /no gradient for parameter 'w'/);
  const short = gpu.upload(randn(5, 1), [5], "f32", "short");
  assert.throws(() => a.step(new Map([["w", short]])), /does not match parameter 'w'/);
  const wrong = { ...saved, m: new Map([["other", new Float32Array(n)]]) };
  assert.throws(() => c.loadState(wrong), /m for parameter 'w' \[300\] is missing/);
  assert.throws(
    () =>
      new AdamW(gpu, [{ name: "x", lr: 1e-3, params: new Map([["w", wa]]) }, {
        name: "y",
        lr: 1e-3,
        params: new Map([["w", wb]]),
      }]),
    /'w' is in more than one group/,
  );
  for (const opt of [a, b, c]) opt.destroy();
  for (const t of [wa, wb, grad, short]) t.destroy();
});

Deno.test("lrFactor and warmupSteps match the fixture's schedule", async () => {
  const file = await SafetensorsFile.open(fixturePath("cases.safetensors"));
  const config = JSON.parse(await Deno.readTextFile(fixturePath("train_config.json")));
  const { total_steps: total, warmup_ratio: ratio, min_lr_ratio: minLr } = config.schedules[0];
  const w = warmupSteps(total, ratio);
  assert.deepEqual([w], await file.readIntegers("schedule.warmup_steps"));
  const factors = Array.from({ length: total }, (_, s) => lrFactor(s, total, w, minLr));
  assertMaxAbs(await file.readF32("schedule.lr_factor"), factors, 2e-6, "lr_factor");
  const lr = (peak: number) => factors.map((f) => peak * f);
  const opt = config.optimizer;
  assertMaxAbs(
    await file.readF32("schedule.lr_resampler"),
    lr(opt.lr_resampler),
    3e-9,
    "lr_resampler",
  );
  assertMaxAbs(await file.readF32("schedule.lr_lora"), lr(opt.lr_lora), 2e-10, "lr_lora");
  // HF's ceil of the float product: 100 * 0.07 is 7.000000000000001 in IEEE doubles.
  assert.equal(warmupSteps(100, 0.07), 8);
  assert.equal(lrFactor(0, 10, 0), 1);
  file.close();
});

/** "abs X" tolerances from the fixture README (the first one: stored inputs fed). */
async function readmeTolerances(): Promise<Map<string, number>> {
  const tolerances = new Map<string, number>();
  for (const line of (await Deno.readTextFile(fixturePath("README.md"))).split("\n")) {
    const cells = line.split("|").map((c) => c.trim());
    const name = /^`([^`]+)`$/.exec(cells[1] ?? "")?.[1];
    const abs = /abs ([0-9.e+-]+)/.exec(cells.at(-2) ?? "")?.[1];
    if (name && abs) tolerances.set(name, Number(abs));
  }
  return tolerances;
}

Deno.test("clip + AdamW reproduce the train_step fixture fed its stored gradients", async () => {
  const gpu = await testGpu();
  const cases = await SafetensorsFile.open(fixturePath("cases.safetensors"));
  const config = JSON.parse(await Deno.readTextFile(fixturePath("train_config.json")));
  const tol = await readmeTolerances();
  const sources = {
    lora: await SafetensorsFile.open(
      new URL("../fixtures/qwen3/lora/adapter_model.safetensors", import.meta.url).pathname,
    ),
    resampler: await SafetensorsFile.open(
      new URL("../fixtures/resampler/model.safetensors", import.meta.url).pathname,
    ),
  };
  const lrs = { lora: config.optimizer.lr_lora, resampler: config.optimizer.lr_resampler };
  const names = { lora: sources.lora.names(), resampler: sources.resampler.names() };
  const allNames = [...names.lora, ...names.resampler];
  const initial = new Map<string, Float32Array>();
  for (const group of ["lora", "resampler"] as const) {
    for (const name of names[group]) initial.set(name, await sources[group].readF32(name));
  }
  const upload = (prefix: string) =>
    Promise.all(allNames.map(async (name) => {
      const values = prefix ? await cases.readF32(prefix + name) : initial.get(name)!;
      return [name, gpu.upload(values, [values.length], "f32", prefix + name)] as const;
    })).then((entries) => new Map<string, Tensor>(entries));
  const optimizer = (params: Map<string, Tensor>) =>
    new AdamW(
      gpu,
      (["resampler", "lora"] as const).map((group) => ({
        name: group,
        lr: lrs[group],
        params: new Map(names[group].map((n) => [n, params.get(n)!])),
      })),
      {
        betas: config.optimizer.betas,
        eps: config.optimizer.eps,
        weightDecay: config.optimizer.weight_decay,
      },
    );
  const report: string[] = [];
  const compare = async (params: Map<string, Tensor>, prefix: string) => {
    const got = await gpu.readAll(allNames.map((n) => params.get(n)!)) as Float32Array[];
    let worst = 0;
    for (const [i, name] of allNames.entries()) {
      const expected = await cases.readF32(prefix + name);
      worst = Math.max(worst, maxAbsDiff(expected, got[i]));
      assertMaxAbs(expected, got[i], tol.get(prefix + name)!, prefix + name);
    }
    report.push(`${prefix}* max |diff| ${worst.toExponential(2)}`);
  };
  /** Norms of the stored gradients under `prefix`, checked, and the clip coefficient. */
  const clip = async (grads: Map<string, Tensor>, stage: string) => {
    const norms = await gradNorms(gpu, {
      lora: names.lora.map((n) => grads.get(n)!),
      resampler: names.resampler.map((n) => grads.get(n)!),
    });
    const checks: Array<[string, number]> = [[`${stage}grad_norm`, norms.total]];
    if (!stage) {
      checks.push(["grad_norm.lora", norms.groups.lora]);
      checks.push(["grad_norm.resampler", norms.groups.resampler]);
    }
    const coef = clipCoefficient(norms.total, config.max_grad_norm);
    checks.push([`${stage}clip_coef`, coef]);
    for (const [key, value] of checks) {
      const expected = (await cases.readF32(key))[0];
      assertClose(expected, value, tol.get(key)!, key);
      report.push(`${key} |diff| ${Math.abs(expected - value).toExponential(2)}`);
    }
    return coef;
  };

  // Step 1 from the initial parameters, fed `grad.*`.
  const params = await upload("");
  const grads1 = await upload("grad.");
  const opt = optimizer(params);
  opt.step(grads1, { clipCoef: await clip(grads1, "") });
  await compare(params, "step1.");

  // Step 2: from the stored step1 parameters (as the fixture chains), the state carried over
  // through a checkpoint round trip into a fresh optimizer, fed `step2.grad.*`.
  const state = await opt.state();
  opt.destroy();
  const stored = await upload("step1.");
  const opt2 = optimizer(stored);
  opt2.loadState(state);
  const grads2 = await upload("step2.grad.");
  opt2.step(grads2, { clipCoef: await clip(grads2, "step2.") });
  await compare(stored, "step2.");
  opt2.destroy();

  // Accumulated gradients (the fixture stores only their sum): a fresh optimizer.
  const fresh = await upload("");
  const accumGrads = await upload("accum.grad.");
  const opt3 = optimizer(fresh);
  opt3.step(accumGrads, { clipCoef: await clip(accumGrads, "accum.") });
  await compare(fresh, "accum.step1.");
  opt3.destroy();

  console.log(report.join("\n"));
  for (const m of [params, grads1, stored, grads2, fresh, accumGrads]) {
    for (const t of m.values()) t.destroy();
  }
  cases.close();
  sources.lora.close();
  sources.resampler.close();
});

Deno.test("AdamW updates a [1280] and a [2560 * 9728] tensor in one step", async () => {
  const gpu = await testGpu();
  const sizes = [1280, 2560 * 9728];
  // Cheap deterministic data (randn over 25M elements would dominate the test).
  const value = (k: number, salt: number) =>
    (Math.imul(k + salt, 2654435761) >>> 0) / 2 ** 32 - 0.5;
  const gradValue = (k: number, salt: number) => value(k, salt) * 10 ** -(k % 6);
  const fill = (n: number, f: (k: number) => number) => {
    const out = new Float32Array(n);
    for (let k = 0; k < n; k++) out[k] = f(k);
    return out;
  };
  const params = sizes.map((n, i) => gpu.upload(fill(n, (k) => value(k, i)), [n], "f32", `p${i}`));
  const grads = sizes.map((n, i) =>
    gpu.upload(fill(n, (k) => gradValue(k, 7 + i)), [n], "f32", `g${i}`)
  );
  const opt = new AdamW(gpu, [
    { name: "small", lr: 1e-3, params: new Map([["p0", params[0]]]) },
    { name: "large", lr: 2e-5, params: new Map([["p1", params[1]]]) },
  ]);
  opt.step(new Map([["p0", grads[0]], ["p1", grads[1]]]), { clipCoef: 0.5 });
  const got = await gpu.readAll(params) as Float32Array[];
  sizes.forEach((n, i) => {
    // 2560 * 9728 / 256 workgroups exceed 65535 on x, so the last elements sit on grid row y > 0.
    const samples = [...Array(2000).keys(), ...Array(2000).keys().map((k) => n - 1 - k)]
      .concat(Array.from({ length: Math.floor(n / 9973) }, (_, k) => k * 9973))
      .filter((k) => k >= 0 && k < n);
    const expected: number[] = [];
    for (const k of samples) {
      const p = Float64Array.of(Math.fround(value(k, i)));
      const g = [Math.fround(gradValue(k, 7 + i))];
      adamwStepRef(p, g, new Float64Array(1), new Float64Array(1), {
        lr: i ? 2e-5 : 1e-3,
        weightDecay: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step: 1,
        clipCoef: 0.5,
      });
      expected.push(p[0]);
    }
    assertMaxAbs(expected, samples.map((k) => got[i][k]), 1e-7, `p${i} [${n}]`);
  });
  opt.destroy();
  for (const t of [...params, ...grads]) t.destroy();
});
