/**
 * Safetensors element types and exact conversions between f32 and the 16-bit float formats.
 *
 * Every byte-level function here reads and writes little-endian data through a DataView, so the
 * result does not depend on the host's byte order (safetensors and WebGPU buffers are both
 * little-endian). Conversions work on bit patterns, so NaN payloads and -0 survive.
 */

/** Element types of the safetensors format that this project reads and writes. */
export type SafeDType =
  | "F64"
  | "F32"
  | "F16"
  | "BF16"
  | "I64"
  | "I32"
  | "I16"
  | "I8"
  | "U8"
  | "BOOL";

/** Bytes per element of each dtype. */
export const DTYPE_BYTES: Readonly<Record<SafeDType, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

export function isSafeDType(name: string): name is SafeDType {
  return Object.hasOwn(DTYPE_BYTES, name);
}

/** Host typed arrays that `encodeLittleEndian` accepts; see `TYPED_ARRAY_OF` for which dtype takes which. */
export type SafeTensorData =
  | Uint8Array
  | Int8Array
  | Uint16Array
  | Int16Array
  | Int32Array
  | Float32Array
  | Float64Array
  | BigInt64Array;

type SafeTensorDataConstructor =
  | Uint8ArrayConstructor
  | Int8ArrayConstructor
  | Uint16ArrayConstructor
  | Int16ArrayConstructor
  | Int32ArrayConstructor
  | Float32ArrayConstructor
  | Float64ArrayConstructor
  | BigInt64ArrayConstructor;

/** The typed array holding one dtype's values in host order (16-bit floats as raw bit patterns). */
const TYPED_ARRAY_OF: Readonly<Record<SafeDType, SafeTensorDataConstructor>> = {
  F64: Float64Array,
  F32: Float32Array,
  F16: Uint16Array,
  BF16: Uint16Array,
  I64: BigInt64Array,
  I32: Int32Array,
  I16: Int16Array,
  I8: Int8Array,
  U8: Uint8Array,
  BOOL: Uint8Array,
};

// Scratch cells for reinterpreting one f32 as its bits and back.
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

function f32Bits(x: number): number {
  scratchF32[0] = x;
  return scratchU32[0];
}

function f32FromBits(bits: number): number {
  scratchU32[0] = bits;
  return scratchF32[0];
}

/** The f32 bit pattern of an IEEE binary16 value; exact (every f16 is an f32). */
function f16BitsToF32Bits(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exponent = (h >>> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0x1f) return (sign | 0x7f800000 | (mantissa << 13)) >>> 0;
  if (exponent !== 0) return (sign | ((exponent + 112) << 23) | (mantissa << 13)) >>> 0;
  if (mantissa === 0) return sign >>> 0;
  // Subnormal f16 (mantissa * 2^-24): shift the leading one up to the implicit-bit position.
  let shift = 0;
  let m = mantissa;
  while ((m & 0x400) === 0) {
    m <<= 1;
    shift++;
  }
  return (sign | ((113 - shift) << 23) | ((m & 0x3ff) << 13)) >>> 0;
}

/** Value of the IEEE binary16 bit pattern `bits` (0..0xffff). */
export function f16ToF32(bits: number): number {
  return f32FromBits(f16BitsToF32Bits(bits & 0xffff));
}

/**
 * Bit pattern of `x` (first rounded to f32) as IEEE binary16, rounding to nearest, ties to even
 * (as `torch.Tensor.half()`): values from 65520 up become infinity, tiny values become
 * subnormals or signed zero, NaN stays a quiet NaN with its sign and top payload bits.
 */
export function f32ToF16Bits(x: number): number {
  const bits = f32Bits(x);
  const sign = (bits >>> 16) & 0x8000;
  const magnitude = bits & 0x7fffffff;
  if (magnitude > 0x7f800000) return sign | 0x7e00 | ((magnitude >>> 13) & 0x3ff);
  if (magnitude >= 0x477ff000) return sign | 0x7c00; // >= 65520 rounds up to infinity
  if (magnitude < 0x38800000) {
    // Below the smallest normal f16 (2^-14): the result is round(|x| * 2^24) subnormal steps,
    // exact in f64; a carry to 1024 yields the smallest normal, whose bits are 0x0400.
    const steps = f32FromBits(magnitude) * 2 ** 24;
    let rounded = Math.floor(steps);
    const rest = steps - rounded;
    if (rest > 0.5 || (rest === 0.5 && (rounded & 1) === 1)) rounded++;
    return sign | rounded;
  }
  // Normal: re-bias the exponent (127 -> 15) and drop 13 mantissa bits with round-to-even;
  // a mantissa carry correctly bumps the exponent.
  let half = (magnitude - 0x38000000) >>> 13;
  const dropped = magnitude & 0x1fff;
  if (dropped > 0x1000 || (dropped === 0x1000 && (half & 1) === 1)) half++;
  return sign | half;
}

/** Value of the bfloat16 bit pattern `bits` (the top half of an f32); exact. */
export function bf16ToF32(bits: number): number {
  return f32FromBits(((bits & 0xffff) << 16) >>> 0);
}

/**
 * Bit pattern of `x` (first rounded to f32) as bfloat16, rounding to nearest, ties to even (as
 * `torch.Tensor.bfloat16()`); NaN stays a quiet NaN with its sign.
 */
export function f32ToBf16Bits(x: number): number {
  const bits = f32Bits(x);
  if ((bits & 0x7fffffff) > 0x7f800000) return (bits >>> 16) | 0x0040;
  // Adding 0x7fff plus the lowest kept bit rounds to nearest even; infinities are unchanged and
  // the largest finite values correctly overflow to infinity.
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

let f16Table: Uint32Array | undefined;

/** f32 bit patterns of all 65536 f16 values, built on first use (256 KiB). */
function f16ToF32BitsTable(): Uint32Array {
  if (!f16Table) {
    f16Table = new Uint32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16BitsToF32Bits(h);
  }
  return f16Table;
}

/** Exact f32 values of f16 bit patterns. */
export function f16ArrayToF32(bits: Uint16Array): Float32Array {
  const table = f16ToF32BitsTable();
  const out = new Float32Array(bits.length);
  const outBits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) outBits[i] = table[bits[i]];
  return out;
}

/** f16 bit patterns of f32 values, rounded to nearest even (see `f32ToF16Bits`). */
export function f32ArrayToF16(values: Float32Array): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = f32ToF16Bits(values[i]);
  return out;
}

/** Exact f32 values of bf16 bit patterns. */
export function bf16ArrayToF32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const outBits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) outBits[i] = bits[i] << 16;
  return out;
}

/** bf16 bit patterns of f32 values, rounded to nearest even (see `f32ToBf16Bits`). */
export function f32ArrayToBf16(values: Float32Array): Uint16Array {
  const out = new Uint16Array(values.length);
  const inBits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  for (let i = 0; i < values.length; i++) {
    const bits = inBits[i];
    out[i] = (bits & 0x7fffffff) > 0x7f800000
      ? (bits >>> 16) | 0x0040
      : ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
  }
  return out;
}

function littleEndianView(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * f32 values of little-endian `bytes` holding `dtype` elements: exact for F32, F16 and BF16
 * (bits are copied, so NaN payloads survive); F64 and 64/32-bit integers round to nearest f32.
 * They are written to the start of `into` when given (a reusable scratch array, at least as
 * long as the result), and that subarray is returned; otherwise to a new array.
 */
export function decodeF32(bytes: Uint8Array, dtype: SafeDType, into?: Float32Array): Float32Array {
  const n = bytes.byteLength / DTYPE_BYTES[dtype];
  if (into && into.length < n) {
    throw new Error(`${n} ${dtype} values do not fit the ${into.length}-element output array`);
  }
  const view = littleEndianView(bytes);
  const out = into ? into.subarray(0, n) : new Float32Array(n);
  const outBits = new Uint32Array(out.buffer, out.byteOffset, n);
  switch (dtype) {
    case "F32":
      for (let i = 0; i < n; i++) outBits[i] = view.getUint32(4 * i, true);
      break;
    case "F16": {
      const table = f16ToF32BitsTable();
      for (let i = 0; i < n; i++) outBits[i] = table[view.getUint16(2 * i, true)];
      break;
    }
    case "BF16":
      for (let i = 0; i < n; i++) outBits[i] = view.getUint16(2 * i, true) << 16;
      break;
    case "F64":
      for (let i = 0; i < n; i++) out[i] = view.getFloat64(8 * i, true);
      break;
    default: {
      const ints = decodeIntegers(bytes, dtype);
      for (let i = 0; i < n; i++) out[i] = ints[i];
    }
  }
  return out;
}

const MAX_SAFE_I64 = BigInt(Number.MAX_SAFE_INTEGER);

/**
 * Values of little-endian integer `bytes` (I64, I32, I16, I8, U8, BOOL). I64 values must be
 * safe JS integers (|v| < 2^53), which token ids and counts always are.
 */
export function decodeIntegers(bytes: Uint8Array, dtype: SafeDType): number[] {
  const width = DTYPE_BYTES[dtype];
  const n = bytes.byteLength / width;
  const view = littleEndianView(bytes);
  const out = new Array<number>(n);
  switch (dtype) {
    case "I64":
      for (let i = 0; i < n; i++) {
        const value = view.getBigInt64(8 * i, true);
        if (value > MAX_SAFE_I64 || value < -MAX_SAFE_I64) {
          throw new Error(`I64 element ${i} is ${value}, beyond the exact range of JS numbers`);
        }
        out[i] = Number(value);
      }
      break;
    case "I32":
      for (let i = 0; i < n; i++) out[i] = view.getInt32(4 * i, true);
      break;
    case "I16":
      for (let i = 0; i < n; i++) out[i] = view.getInt16(2 * i, true);
      break;
    case "I8":
      for (let i = 0; i < n; i++) out[i] = view.getInt8(i);
      break;
    case "U8":
    case "BOOL":
      for (let i = 0; i < n; i++) out[i] = bytes[i];
      break;
    default:
      throw new Error(`${dtype} is a float dtype, not an integer one`);
  }
  return out;
}

/**
 * Why `data` cannot hold `dtype` values (see `encodeLittleEndian`), or undefined when it can;
 * lets a writer check every tensor before it writes any.
 */
export function dataTypeMismatch(data: SafeTensorData, dtype: SafeDType): string | undefined {
  const expected = TYPED_ARRAY_OF[dtype];
  if (data instanceof Uint8Array || data instanceof expected) return undefined;
  return `dtype ${dtype} takes a ${expected.name} (or little-endian bytes in a Uint8Array), ` +
    `got a ${data.constructor.name}`;
}

/**
 * Little-endian bytes of `data` as `dtype`. A Uint8Array is taken as bytes already in that
 * layout; any other array must be the one that holds `dtype` (Float32Array for F32, Uint16Array
 * bit patterns for F16/BF16, BigInt64Array for I64, ...). Throws naming both on a mismatch.
 */
export function encodeLittleEndian(data: SafeTensorData, dtype: SafeDType): Uint8Array {
  const problem = dataTypeMismatch(data, dtype);
  if (problem) throw new Error(problem);
  if (data instanceof Uint8Array) return data;
  const width = DTYPE_BYTES[dtype];
  const out = new Uint8Array(data.byteLength);
  const view = littleEndianView(out);
  // Reading through unsigned views of the same memory copies bit patterns (NaN payloads too).
  switch (width) {
    case 1:
      out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
      break;
    case 2: {
      const src = new Uint16Array(data.buffer, data.byteOffset, data.length);
      for (let i = 0; i < src.length; i++) view.setUint16(2 * i, src[i], true);
      break;
    }
    case 4: {
      const src = new Uint32Array(data.buffer, data.byteOffset, data.length);
      for (let i = 0; i < src.length; i++) view.setUint32(4 * i, src[i], true);
      break;
    }
    default: {
      const src = new BigUint64Array(data.buffer, data.byteOffset, data.length);
      for (let i = 0; i < src.length; i++) view.setBigUint64(8 * i, src[i], true);
    }
  }
  return out;
}
