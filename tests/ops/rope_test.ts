import assert from "node:assert/strict";
import {
  rope,
  ropeAngle,
  type RopeAngles,
  ropeBackward,
  ropeInvFreq,
  ropeTable,
} from "../../src/ops/rope.ts";
import { ropeBackwardRef, ropeRef } from "../../src/ops/rope_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";
import { dot, numericGrad } from "./finite_diff.ts";

function angleOf(headDim: number, theta: number, angles: RopeAngles) {
  const invFreq = ropeInvFreq(headDim, theta, angles);
  return (pos: number, i: number) => ropeAngle(pos, invFreq[i], angles);
}

Deno.test("ropeInvFreq follows theta^(-2i/hd); transformers rounding stays within f32 steps", () => {
  const exact = ropeInvFreq(128, 1e6, "float64");
  const hf = ropeInvFreq(128, 1e6, "transformers");
  assert.equal(exact[0], 1);
  assert.ok(Math.abs(exact[32] - 1e-3) < 1e-15, `inv_freq[32] = ${exact[32]}, 1e-3 expected`);
  for (let i = 0; i < 64; i++) {
    assert.equal(hf[i], Math.fround(hf[i]), "transformers inv_freq must be an f32 value");
    assert.ok(Math.abs(hf[i] / exact[i] - 1) < 4e-7, `inv_freq[${i}]: ${hf[i]} vs ${exact[i]}`);
  }
  // The f32 product pos * inv_freq is off by at most half an ulp of the angle.
  const angle = ropeAngle(255, hf[0], "transformers");
  assert.equal(angle, 255);
  assert.equal(ropeAngle(255, hf[1], "transformers"), Math.fround(255 * hf[1]));
});

Deno.test("rope matches the rotate-half reference: batches, odd heads, explicit positions", async () => {
  const gpu = await testGpu();
  const cases = [
    // [batch, seqLen, heads, headDim, theta, angles]
    { b: 3, t: 7, heads: 5, hd: 24, theta: 1e4, angles: "transformers" as const },
    { b: 2, t: 13, heads: 3, hd: 128, theta: 1e6, angles: "transformers" as const },
    { b: 1, t: 257, heads: 1, hd: 128, theta: 1e6, angles: "float64" as const },
  ].map(({ b, t, heads, hd, theta, angles }, c) => {
    const x = randn(b * t * heads * hd, 40 + c);
    const table = ropeTable(gpu, { headDim: hd, theta, maxPositions: t + 3, angles });
    // [B*T, heads*hd] as a projection produces it.
    const tx = gpu.upload(x, [b * t, heads * hd], "f32", "x");
    const y = rope(gpu, tx, table, { heads, seqLen: t });
    const positions = Array.from({ length: b * t }, (_, k) => k % t);
    return {
      what: `rope B${b} T${t} heads ${heads} hd ${hd} ${angles}`,
      expected: ropeRef(x, heads, hd, positions, angleOf(hd, theta, angles)),
      tensors: [tx, y, table.cosSin],
      y,
    };
  });
  // Explicit (shuffled) positions, written in place into a 4-D [B, T, heads, hd] tensor.
  const [t, heads, hd] = [9, 3, 24];
  const posValues = new Int32Array([4, 0, 8, 1, 1, 7, 2, 11, 3]);
  const x = randn(t * heads * hd, 50);
  const table = ropeTable(gpu, { headDim: hd, theta: 1e6, maxPositions: 12 });
  const tx = gpu.upload(x, [1, t, heads, hd], "f32", "x");
  const tp = gpu.upload(posValues, [t], "i32", "positions");
  const inPlace = rope(gpu, tx, table, { heads, positions: tp, out: tx });
  assert.equal(inPlace, tx);
  const results = await gpu.readAll([...cases.map((c) => c.y), tx]) as Float32Array[];
  cases.forEach(({ what, expected }, i) => assertNmse(expected, results[i], 1e-12, what));
  const expected = ropeRef(x, heads, hd, posValues, angleOf(hd, 1e6, "transformers"));
  assertNmse(expected, results[cases.length], 1e-12, "rope in place with positions");
  for (const tensor of [...cases.flatMap((c) => c.tensors), table.cosSin, tx, tp]) tensor.destroy();
});

Deno.test("rope rejects shapes that are not whole tokens and sequences past the table", async () => {
  const gpu = await testGpu();
  const table = ropeTable(gpu, { headDim: 24, theta: 1e6, maxPositions: 4 });
  const x = gpu.zeros([5, 3 * 24], "f32", "q");
  assert.throws(() => rope(gpu, x, table, { heads: 2 }), /must hold whole tokens of heads 2/);
  assert.throws(
    () => rope(gpu, x, table, { heads: 3 }),
    /seqLen 5 exceeds the table's 4 positions/,
  );
  assert.throws(
    () => rope(gpu, x, table, { heads: 3, seqLen: 2 }),
    /5 tokens, not a multiple of seqLen 2/,
  );
  assert.throws(() => ropeTable(gpu, { headDim: 5, theta: 1e4, maxPositions: 4 }), /positive even/);
  for (const t of [table.cosSin, x]) t.destroy();
});

Deno.test("ropeBackwardRef agrees with finite differences of the forward reference", () => {
  const [tokens, heads, hd] = [3, 2, 6];
  const angle = angleOf(hd, 1e4, "float64");
  const positions = [2, 0, 5];
  const x = randn(tokens * heads * hd, 60);
  const dy = randn(x.length, 61);
  const numeric = numericGrad((v) => dot(dy, ropeRef(v, heads, hd, positions, angle)), x);
  assertNmse(numeric, ropeBackwardRef(dy, heads, hd, positions, angle), 1e-14, "rope dx");
});

Deno.test("ropeBackward undoes rope and matches the reference: seqLen, positions, in place", async () => {
  const gpu = await testGpu();
  const [b, t, heads, hd] = [3, 7, 5, 24];
  const table = ropeTable(gpu, { headDim: hd, theta: 1e6, maxPositions: t + 2 });
  const angle = angleOf(hd, 1e6, "transformers");
  const dy = randn(b * t * heads * hd, 62);
  const tdy = gpu.upload(dy, [b * t, heads * hd], "f32", "dy");
  const dx = ropeBackward(gpu, tdy, table, { heads, seqLen: t });
  // Backward of the forward is the identity.
  const roundTrip = ropeBackward(gpu, rope(gpu, tdy, table, { heads, seqLen: t }), table, {
    heads,
    seqLen: t,
  });
  const posValues = new Int32Array([4, 0, 8, 1, 1, 7, 2]);
  const single = randn(t * heads * hd, 63);
  const tp = gpu.upload(posValues, [t], "i32", "positions");
  const tsingle = gpu.upload(single, [t, heads * hd], "f32", "dySingle");
  const inPlace = ropeBackward(gpu, tsingle, table, { heads, positions: tp, out: tsingle });
  assert.equal(inPlace, tsingle);
  const [gotDx, gotRoundTrip, gotInPlace] = await gpu.readAll([dx, roundTrip, tsingle]);
  const seqPositions = Array.from({ length: b * t }, (_, k) => k % t);
  assertNmse(ropeBackwardRef(dy, heads, hd, seqPositions, angle), gotDx, 1e-12, "ropeBackward");
  assertNmse(dy, gotRoundTrip, 1e-12, "ropeBackward(rope(x))");
  const expected = ropeBackwardRef(single, heads, hd, posValues, angle);
  assertNmse(expected, gotInPlace, 1e-12, "ropeBackward in place with positions");
  assert.throws(
    () => ropeBackward(gpu, tdy, table, { heads: 2 }),
    /ropeBackward: dy 'dy' \[21,120\] must hold whole tokens of heads 2/,
  );
  for (const tensor of [table.cosSin, tdy, dx, roundTrip, tp, tsingle]) tensor.destroy();
});
