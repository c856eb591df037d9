import assert from "node:assert/strict";
import { softmax, softmaxBackward, type SoftmaxOptions } from "../../src/ops/softmax.ts";
import {
  softmaxBackwardRef,
  softmaxRef,
  type SoftmaxRefOptions,
} from "../../src/ops/softmax_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";
import { dot, numericGrad } from "./finite_diff.ts";

type Shape = [number, number, number, number];

interface Case {
  what: string;
  shape: Shape;
  gpuOptions: SoftmaxOptions;
  refOptions: SoftmaxRefOptions;
}

/** Runs every case in one submission and checks values, exact zeros and row sums. */
async function checkCases(cases: Case[]): Promise<void> {
  const gpu = await testGpu();
  const inputs = cases.map(({ shape }, c) => {
    const n = shape.reduce((a, b) => a * b);
    // Large scores with a per-row offset: without max subtraction exp would overflow.
    return randn(n, 100 + c, 8).map((v, i) => v + 400 * Math.sin(Math.floor(i / shape[3])));
  });
  const tensors = cases.map(({ shape }, c) => gpu.upload(inputs[c], shape, "f32", "scores"));
  const outputs = cases.map((c, i) => softmax(gpu, tensors[i], c.gpuOptions));
  const results = await gpu.readAll(outputs) as Float32Array[];
  cases.forEach(({ what, shape, refOptions }, c) => {
    const expected = softmaxRef(inputs[c], shape, refOptions);
    const got = results[c];
    assertNmse(expected, got, 1e-10, what);
    const tk = shape[3];
    for (let row = 0; row < got.length / tk; row++) {
      let sum = 0;
      let refSum = 0;
      for (let j = 0; j < tk; j++) {
        const k = row * tk + j;
        if (expected[k] === 0) {
          assert.equal(got[k], 0, `${what}: hidden key ${k} must be exactly 0`);
        }
        sum += got[k];
        refSum += expected[k];
      }
      assert.ok(
        Math.abs(sum - refSum) < 1e-5,
        `${what}: row ${row} sums to ${sum}, ${refSum} expected`,
      );
    }
  });
  for (const t of [...tensors, ...outputs]) t.destroy();
}

Deno.test("softmax without masks, with scale, on Tk = 256 + 77 and short rows", async () => {
  await checkCases([
    { what: "plain", shape: [2, 3, 5, 333], gpuOptions: {}, refOptions: {} },
    {
      what: "scaled",
      shape: [1, 3, 7, 37],
      gpuOptions: { scale: 1 / Math.sqrt(24) },
      refOptions: { scale: Math.fround(1 / Math.sqrt(24)) },
    },
    { what: "one key", shape: [1, 1, 3, 1], gpuOptions: {}, refOptions: {} },
    // The scale applies before the max: a negative scale flips which score is largest.
    {
      what: "negative scale",
      shape: [1, 1, 3, 129],
      gpuOptions: { scale: -2 },
      refOptions: { scale: -2 },
    },
  ]);
});

Deno.test("softmax with a causal mask, shifted diagonals and fully masked rows", async () => {
  await checkCases([
    {
      what: "causal",
      shape: [2, 3, 77, 77],
      gpuOptions: { causal: true },
      refOptions: { causal: true },
    },
    {
      what: "causal offset 2",
      shape: [1, 5, 5, 7],
      gpuOptions: { causal: true, causalOffset: 2 },
      refOptions: { causal: true, causalOffset: 2 },
    },
    {
      // Query 0 sees no key: its row must be zeros.
      what: "causal offset -1",
      shape: [1, 3, 5, 5],
      gpuOptions: { causal: true, causalOffset: -1 },
      refOptions: { causal: true, causalOffset: -1 },
    },
  ]);
});

Deno.test("softmax with key-padding masks and lengths, alone and with causal", async () => {
  const gpu = await testGpu();
  const [batch, tk] = [3, 333];
  // Batch 2 hides every key: its rows must be zeros, not NaN.
  const lengths = [256 + 77, 101, 0];
  // Resampler-style mask: x positions padded after `lengths`, the last 77 (latents) always seen.
  const maskValues = new Int32Array(batch * tk);
  for (let b = 0; b < batch; b++) {
    for (let j = 0; j < tk; j++) maskValues[b * tk + j] = j < lengths[b] - 77 || j >= 256 ? 1 : 0;
  }
  maskValues.fill(0, 2 * tk);
  const lengthValues = new Uint32Array(lengths);
  const keyMask = gpu.upload(maskValues, [batch, tk], "i32", "mask");
  const keyLengths = gpu.upload(lengthValues, [batch], "u32", "lengths");
  const shortLengths = gpu.upload(new Uint32Array([11, 4, 0]), [batch], "u32", "short lengths");
  await checkCases([
    {
      what: "key mask",
      shape: [batch, 5, 9, tk],
      gpuOptions: { keyMask, scale: 0.125 },
      refOptions: { keyMask: maskValues, scale: 0.125 },
    },
    {
      what: "key lengths",
      shape: [batch, 3, 7, tk],
      gpuOptions: { keyLengths },
      refOptions: { keyLengths: lengthValues },
    },
    {
      what: "causal + key lengths",
      shape: [batch, 3, 11, 11],
      gpuOptions: { causal: true, keyLengths: shortLengths },
      refOptions: { causal: true, keyLengths: [11, 4, 0] },
    },
  ]);
  const twoBatches = gpu.zeros([2, 1, 1, tk], "f32", "two batches");
  assert.throws(
    () => softmax(gpu, twoBatches, { keyMask }),
    /keyMask 'mask' \[3,333\] i32 must have 666 elements/,
  );
  assert.throws(() => softmax(gpu, keyMask), /scores 'mask' \[3,333\] i32 must be f32/);
  for (const t of [keyMask, keyLengths, shortLengths, twoBatches]) t.destroy();
});

Deno.test("softmaxBackwardRef agrees with finite differences, with scale and causal mask", () => {
  const shape: Shape = [1, 2, 3, 5];
  const options = { scale: 0.7, causal: true, causalOffset: 1 };
  const scores = randn(30, 70, 2);
  const dP = randn(30, 71);
  const numeric = numericGrad((v) => dot(dP, softmaxRef(v, shape, options)), scores);
  const analytic = softmaxBackwardRef(dP, softmaxRef(scores, shape, options), 5, 0.7);
  assertNmse(numeric, analytic, 1e-14, "softmax d scores");
});

Deno.test("softmaxBackward matches the reference; masked keys and empty rows get 0", async () => {
  const gpu = await testGpu();
  const lengths = new Uint32Array([11, 4, 0]);
  const keyLengths = gpu.upload(lengths, [3], "u32", "lengths");
  const cases: Array<{ shape: Shape; scale: number; gpu: SoftmaxOptions; ref: SoftmaxRefOptions }> =
    [
      { shape: [2, 3, 5, 333], scale: 1, gpu: {}, ref: {} },
      {
        shape: [3, 3, 11, 11],
        scale: 0.125,
        gpu: { causal: true, keyLengths, scale: 0.125 },
        ref: { causal: true, keyLengths: lengths, scale: 0.125 },
      },
    ];
  const runs = cases.map(({ shape, scale, gpu: options }, c) => {
    const n = shape.reduce((a, b) => a * b);
    const scores = randn(n, 80 + c, 3);
    const dP = randn(n, 90 + c);
    const ts = gpu.upload(scores, shape, "f32", "scores");
    const tdP = gpu.upload(dP, shape, "f32", "dP");
    const probs = softmax(gpu, ts, options);
    const dScores = softmaxBackward(gpu, tdP, probs, { scale });
    return { scores, dP, tensors: [ts, tdP, probs, dScores], dScores };
  });
  const results = await gpu.readAll(runs.map((r) => r.dScores)) as Float32Array[];
  cases.forEach(({ shape, scale, ref }, c) => {
    const what = `softmaxBackward [${shape}]`;
    const probs = softmaxRef(runs[c].scores, shape, ref);
    const expected = softmaxBackwardRef(runs[c].dP, probs, shape[3], scale);
    assertNmse(expected, results[c], 1e-12, what);
    probs.forEach((prob, i) => {
      // -0 is a fine zero here (0 * negative).
      if (prob === 0) assert.ok(results[c][i] === 0, `${what}: hidden key ${i} must get 0`);
    });
  });
  const short = gpu.zeros([4], "f32", "short");
  assert.throws(
    () => softmaxBackward(gpu, short, runs[0].tensors[2]),
    /dP 'short' \[4\] f32 must have 9990 elements/,
  );
  for (const t of [keyLengths, short, ...runs.flatMap((r) => r.tensors)]) t.destroy();
});
