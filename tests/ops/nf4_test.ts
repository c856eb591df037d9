import assert from "node:assert/strict";
import { ModelFolder } from "../../src/io/hf.ts";
import { SafetensorsFile } from "../../src/io/safetensors.ts";
import { NF4_CODE, nf4Dequantize, nf4Quantize } from "../../src/ops/nf4.ts";
import { randn } from "../helpers.ts";

const FIXTURE = new URL("../fixtures/qwen3/", import.meta.url).pathname;

/** Unpacks the 4-bit indices of the first n elements (high nibble first). */
function indices(packed: Uint8Array, n: number): number[] {
  return Array.from(
    { length: n },
    (_, i) => (i & 1) === 0 ? packed[i >> 1] >> 4 : packed[i >> 1] & 15,
  );
}

/** Bit patterns, so -0 and NaN compare exactly. */
function bits(a: Float32Array): Uint32Array {
  return new Uint32Array(a.buffer, a.byteOffset, a.length);
}

/**
 * Brute force: the nearest code by float64 distance, ties to the lower index, for the value
 * as bitsandbytes scales it (w times the f32 reciprocal of absmax, rounded to f32).
 */
function nearestIndexRef(w: number, absmax: number): number {
  const x = Math.fround(w * Math.fround(1 / absmax));
  let best = 0;
  for (let i = 1; i < 16; i++) {
    if (Math.abs(x - NF4_CODE[i]) < Math.abs(x - NF4_CODE[best])) best = i;
  }
  return best;
}

function nextUp(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer);
  u[0] += x >= 0 ? 1 : -1;
  return f[0];
}

Deno.test("nf4Quantize reproduces the fixture's packed bytes, absmax and dequantised values", async () => {
  const cases = await SafetensorsFile.open(`${FIXTURE}cases.safetensors`);
  const model = await ModelFolder.open(FIXTURE);
  try {
    assert.deepEqual(bits(await cases.readF32("nf4.code")), bits(NF4_CODE));
    const keys = cases.names().filter((name) => name.endsWith(".packed"));
    assert.equal(keys.length, 14, "every *_proj of both layers");
    for (const name of keys) {
      const key = name.slice("nf4.".length, -".packed".length);
      const q = nf4Quantize(await model.readF32(key));
      assert.deepEqual(q.packed, await cases.readBytes(name), `${key} packed`);
      assert.deepEqual(
        bits(q.absmax),
        bits(await cases.readF32(`nf4.${key}.absmax`)),
        `${key} absmax`,
      );
    }
    const key = "model.layers.0.self_attn.q_proj.weight";
    const q = nf4Quantize(await model.readF32(key));
    const expected = await cases.readF32(`nf4.${key}.dequant`);
    assert.deepEqual(bits(nf4Dequantize(q.packed, q.absmax, expected.length)), bits(expected));
  } finally {
    cases.close();
    model.close();
  }
});

Deno.test("nf4Quantize picks the nearest code like a brute-force search", () => {
  for (const blockSize of [64, 128]) {
    const w = randn(100_003, blockSize, 0.02);
    const { packed, absmax } = nf4Quantize(w, blockSize);
    const got = indices(packed, w.length);
    for (let i = 0; i < w.length; i++) {
      const want = nearestIndexRef(w[i], absmax[Math.floor(i / blockSize)]);
      if (got[i] !== want) assert.fail(`element ${i} (${w[i]}): index ${got[i]}, nearest ${want}`);
    }
  }
});

Deno.test("a value on a decision threshold takes the lower code, one f32 step above the upper", () => {
  for (let i = 0; i < 15; i++) {
    // absmax 1 makes the scaled value the weight itself.
    const t = Math.fround((NF4_CODE[i] + NF4_CODE[i + 1]) / 2);
    const w = Float32Array.of(1, t, nextUp(t), -1);
    assert.deepEqual(indices(nf4Quantize(w).packed, 4), [15, i, i + 1, 0], `threshold ${i}`);
  }
});

Deno.test("nf4Quantize edge cases follow bitsandbytes", () => {
  // A partial last block has its own absmax; an odd count pads the last low nibble with 7.
  const w = randn(64 + 37, 7);
  w[64 + 5] = 3; // the largest value, in the partial block only
  const q = nf4Quantize(w);
  assert.equal(q.packed.length, 51);
  assert.equal(q.absmax.length, 2);
  assert.equal(q.absmax[0], Math.max(...w.subarray(0, 64).map(Math.abs)));
  assert.equal(q.absmax[1], 3);
  assert.equal(q.packed[50] & 15, 7);
  // An all-zero block has absmax 0; 0 * (1/0) is NaN, which every threshold test rejects, so
  // bitsandbytes writes index 0 and dequantises to -1 * 0.
  const zeros = nf4Quantize(new Float32Array(64));
  assert.equal(zeros.absmax[0], 0);
  assert.ok(zeros.packed.every((b) => b === 0));
  assert.ok(nf4Dequantize(zeros.packed, zeros.absmax, 64).every((v) => v === 0));
  assert.throws(() => nf4Quantize(w, 63), /positive even integer/);
  assert.throws(() => nf4Dequantize(q.packed, q.absmax, 200), /packed bytes/);
});

Deno.test("nf4Dequantize is code[index] * absmax rounded once to f32", () => {
  const w = randn(1000, 9, 0.1);
  const q = nf4Quantize(w);
  const d = nf4Dequantize(q.packed, q.absmax, w.length);
  const idx = indices(q.packed, w.length);
  for (let i = 0; i < w.length; i++) {
    assert.equal(d[i], Math.fround(NF4_CODE[idx[i]] * q.absmax[i >> 6]));
  }
});

Deno.test("nf4Quantize into reused arrays matches fresh ones and refuses short arrays", () => {
  const into = { packed: new Uint8Array(600).fill(0xaa), absmax: new Float32Array(19).fill(-1) };
  // Largest first, then smaller and odd sizes, so stale data from the previous weight is there.
  for (const n of [1200, 64 + 37, 7]) {
    const w = randn(n, n, 0.1);
    const fresh = nf4Quantize(w);
    const reused = nf4Quantize(w, 64, into);
    assert.equal(reused.packed.buffer, into.packed.buffer, "written in place");
    assert.equal(reused.absmax.buffer, into.absmax.buffer, "written in place");
    assert.deepEqual(reused.packed, fresh.packed, `packed, ${n} elements`);
    assert.deepEqual(bits(reused.absmax), bits(fresh.absmax), `absmax, ${n} elements`);
  }
  assert.throws(
    () => nf4Quantize(new Float32Array(1202), 64, into),
    /1202 elements need 601 packed bytes and 19 absmax values, but the output arrays hold 600 and 19/,
  );
});
