import assert from "node:assert/strict";
import {
  bf16ArrayToF32,
  bf16ToF32,
  decodeF32,
  decodeIntegers,
  encodeLittleEndian,
  f16ArrayToF32,
  f16ToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
  f32ToBf16Bits,
  f32ToF16Bits,
} from "../../src/io/dtype.ts";

/** Deterministic uniform numbers in [0, 1) (xorshift32), so failures reproduce. */
function uniform(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 2 ** 32;
  };
}

/** IEEE binary16 decoded from its fields, independent of the bit tricks under test. */
function f16ByFormula(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 31) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

function f32FromBits(bits: number): number {
  return new Float32Array(new Uint32Array([bits]).buffer)[0];
}

Deno.test("f16ToF32 decodes all 65536 patterns exactly (-0, subnormals, inf, NaN)", () => {
  for (let h = 0; h < 65536; h++) {
    assert.ok(Object.is(f16ToF32(h), f16ByFormula(h)), `0x${h.toString(16)}`);
  }
  assert.equal(f16ToF32(0x3c00), 1);
  assert.equal(f16ToF32(0x7bff), 65504);
  assert.equal(f16ToF32(0x0001), 2 ** -24);
  assert.ok(Object.is(f16ToF32(0x8000), -0));
});

Deno.test("f32ToF16Bits rounds to nearest even, with overflow, subnormals and NaN", () => {
  const cases: Array<[number, number]> = [
    [1, 0x3c00],
    [-2, 0xc000],
    [65504, 0x7bff],
    [65519.99, 0x7bff],
    [65520, 0x7c00], // halfway to 65536: ties to even, which is infinity
    [1e6, 0x7c00],
    [-Infinity, 0xfc00],
    [-0, 0x8000],
    [1 + 2 ** -11, 0x3c00], // tie between 0x3c00 and 0x3c01: even
    [1 + 3 * 2 ** -11, 0x3c02], // tie between 0x3c01 and 0x3c02: even
    [2 ** -24, 0x0001],
    [2 ** -25, 0x0000], // tie between 0 and the smallest subnormal: even
    [3 * 2 ** -25, 0x0002],
    [1023.5 * 2 ** -24, 0x0400], // the largest subnormal rounds up into the smallest normal
    [2 ** -14, 0x0400],
    [-1e-10, 0x8000],
  ];
  for (const [x, bits] of cases) assert.equal(f32ToF16Bits(x), bits, `${x}`);
  const nan = f32ToF16Bits(NaN);
  assert.equal(nan & 0x7c00, 0x7c00);
  assert.notEqual(nan & 0x3ff, 0);
});

Deno.test("f32ToF16Bits agrees with the built-in Float16Array on every f16 and random f32s", () => {
  for (let h = 0; h < 65536; h++) {
    const x = f16ToF32(h);
    if (!Number.isNaN(x)) assert.equal(f32ToF16Bits(x), h);
  }
  const reference = new Float16Array(1);
  const referenceBits = new Uint16Array(reference.buffer);
  const next = uniform(1);
  for (let i = 0; i < 200_000; i++) {
    // Any bit pattern, or magnitudes around the f16 range, so every branch is hit.
    const f32 = i % 2
      ? f32FromBits(Math.floor(next() * 2 ** 32))
      : Math.fround((next() - 0.5) * 2 ** (next() * 50 - 30));
    if (Number.isNaN(f32)) continue;
    reference[0] = f32;
    assert.equal(f32ToF16Bits(f32), referenceBits[0], `${f32}`);
  }
});

Deno.test("bf16 conversions: exact decode, round to nearest even, NaN stays NaN", () => {
  for (let h = 0; h < 65536; h++) {
    const x = bf16ToF32(h);
    if (Number.isNaN(x)) assert.equal(((h >> 7) & 0xff) === 0xff && (h & 0x7f) !== 0, true);
    else assert.equal(f32ToBf16Bits(x), h, `0x${h.toString(16)}`);
  }
  assert.equal(bf16ToF32(0x3f80), 1);
  assert.equal(bf16ToF32(0x4049), 3.140625);
  assert.equal(f32ToBf16Bits(Math.PI), 0x4049);
  assert.equal(f32ToBf16Bits(f32FromBits(0x3f808000)), 0x3f80); // tie: even
  assert.equal(f32ToBf16Bits(f32FromBits(0x3f818000)), 0x3f82); // tie: even
  assert.equal(f32ToBf16Bits(f32FromBits(0x3f808001)), 0x3f81); // above the tie
  assert.equal(f32ToBf16Bits(f32FromBits(0x7f7fffff)), 0x7f80); // max f32 -> inf
  assert.equal(f32ToBf16Bits(NaN) & 0x7fc0, 0x7fc0);
});

Deno.test("array conversions match the scalar ones and keep NaN payloads", () => {
  const next = uniform(2);
  const values = Float32Array.from(
    { length: 1000 },
    () => (next() - 0.5) * 2 ** (next() * 40 - 20),
  );
  values[0] = NaN;
  values[1] = -0;
  values[2] = Infinity;
  const f16 = f32ArrayToF16(values);
  const bf16 = f32ArrayToBf16(values);
  for (let i = 0; i < values.length; i++) {
    assert.equal(f16[i], f32ToF16Bits(values[i]));
    assert.equal(bf16[i], f32ToBf16Bits(values[i]));
  }
  const back16 = f16ArrayToF32(f16);
  const backBf16 = bf16ArrayToF32(bf16);
  for (let i = 0; i < values.length; i++) {
    assert.ok(Object.is(back16[i], f16ToF32(f16[i])));
    assert.ok(Object.is(backBf16[i], bf16ToF32(bf16[i])));
  }
  const payloadNaN = new Uint16Array([0x7d23]);
  assert.equal(new Uint32Array(f16ArrayToF32(payloadNaN).buffer)[0], 0x7fa46000);
});

Deno.test("little-endian encode/decode is explicit about byte order", () => {
  const bytes = encodeLittleEndian(new Float32Array([1, -2]), "F32");
  assert.deepEqual([...bytes], [0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0]);
  assert.deepEqual([...encodeLittleEndian(new Uint16Array([0x3c00]), "F16")], [0x00, 0x3c]);
  assert.deepEqual([...encodeLittleEndian(new BigInt64Array([-2n]), "I64")], [
    0xfe,
    ...Array(7).fill(0xff),
  ]);
  assert.deepEqual([...decodeF32(new Uint8Array([0x80, 0x3f]), "BF16")], [1]);
  assert.deepEqual(decodeIntegers(new Uint8Array([0xff, 0xff, 0xff, 0x7f]), "I32"), [2147483647]);
  assert.throws(
    () => encodeLittleEndian(new Float32Array(2), "BF16"),
    /BF16 takes a Uint16Array.*Float32Array/,
  );
  assert.throws(
    () => decodeIntegers(encodeLittleEndian(new BigInt64Array([2n ** 60n]), "I64"), "I64"),
    /beyond the exact range/,
  );
});
