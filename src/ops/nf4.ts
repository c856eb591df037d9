/**
 * NF4 4-bit block quantisation with bitsandbytes' semantics (docs/numerics.md §3.1).
 *
 * A weight is flattened row-major and cut into blocks (64 values by default, the last one may
 * be shorter); each block stores its absmax as f32 and each value the index of its nearest NF4
 * code, two indices per byte with the first element in the high nibble. The index is decided
 * as bitsandbytes' CUDA kernel (`kQuantizeBlockwise` + `dQuantizeNF4`) decides it: the value is
 * scaled by the f32 reciprocal of absmax, rounded to f32, and compared with the f32-rounded
 * midpoints between neighbouring codes; a value equal to a midpoint takes the lower index.
 */

/** The 16 NF4 code values (bitsandbytes' table, ascending; index 7 is 0). Exact f32 values. */
export const NF4_CODE: Float32Array = Float32Array.of(
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
);

export const NF4_BLOCK_SIZE = 64;

/** The index written for the pad nibble of an odd element count (code 0.0). */
const PAD_INDEX = 7;

/**
 * `THRESHOLD[i]` separates code i from code i + 1: the f32-rounded midpoint, the constants of
 * bitsandbytes' `dQuantizeNF4`. `THRESHOLD[15]` is +inf so the search below needs no bound check.
 */
const THRESHOLD = new Float64Array(16);
for (let i = 0; i < 15; i++) THRESHOLD[i] = Math.fround((NF4_CODE[i] + NF4_CODE[i + 1]) / 2);
THRESHOLD[15] = Infinity;

/**
 * A scaled value x in [-1, 1] falls in bucket floor((x + 1) * BUCKETS_PER_UNIT); BUCKET_START[b]
 * is the index of the lowest code a value in that bucket can take. Buckets are far narrower
 * than the closest two thresholds (0.085 apart), so one comparison with the next threshold
 * finishes the search, and it almost always fails, so the branch predicts well: about ten
 * times faster than 15 comparisons. NaN (an all-zero block scales 0 by 1/0) lands in bucket 0
 * and fails the comparison, giving index 0 as in bitsandbytes. Two spare buckets take x that
 * rounds a hair above 1.
 */
const BUCKETS_PER_UNIT = 2048;
const BUCKET_START = new Uint8Array(2 * BUCKETS_PER_UNIT + 2);
for (let b = 0; b < BUCKET_START.length; b++) {
  const low = b / BUCKETS_PER_UNIT - 1;
  let index = 0;
  while (THRESHOLD[index] < low) index++;
  BUCKET_START[b] = index;
}

export interface Nf4Quantized {
  /** ceil(n / 2) bytes; element 2i in the high nibble of byte i, element 2i + 1 in the low one. */
  packed: Uint8Array;
  /** One f32 absmax per block of `blockSize` consecutive elements (ceil(n / blockSize)). */
  absmax: Float32Array;
}

function checkBlockSize(fn: string, blockSize: number): void {
  if (!Number.isInteger(blockSize) || blockSize <= 0 || blockSize % 2 !== 0) {
    throw new Error(
      `${fn}: blockSize must be a positive even integer (bitsandbytes uses 64), got ${blockSize}`,
    );
  }
}

/** The arrays `nf4Quantize` needs for `n` elements: reused from `into` or freshly allocated. */
function nf4Output(n: number, blockSize: number, into: Nf4Quantized | undefined): Nf4Quantized {
  const bytes = Math.ceil(n / 2);
  const blocks = Math.ceil(n / blockSize);
  if (!into) return { packed: new Uint8Array(bytes), absmax: new Float32Array(blocks) };
  if (into.packed.length < bytes || into.absmax.length < blocks) {
    throw new Error(
      `nf4Quantize: ${n} elements need ${bytes} packed bytes and ${blocks} absmax values, ` +
        `but the output arrays hold ${into.packed.length} and ${into.absmax.length}`,
    );
  }
  return { packed: into.packed.subarray(0, bytes), absmax: into.absmax.subarray(0, blocks) };
}

/**
 * Quantises `weights` (a row-major [out, in] weight flattened) to NF4. Runs at load time on
 * every linear weight of the model, so it avoids per-element allocation and branches. With
 * `into` (arrays at least as long as needed, e.g. sized for the model's largest linear) the
 * result is written to their starts and returned as subarrays, so a loader that uploads each
 * result before quantising the next weight can reuse one pair of arrays for all of them.
 */
export function nf4Quantize(
  weights: Float32Array,
  blockSize = NF4_BLOCK_SIZE,
  into?: Nf4Quantized,
): Nf4Quantized {
  checkBlockSize("nf4Quantize", blockSize);
  const n = weights.length;
  const { packed, absmax } = nf4Output(n, blockSize, into);
  const threshold = THRESHOLD;
  const bucketStart = BUCKET_START;
  for (let block = 0, start = 0; start < n; block++, start += blockSize) {
    const end = Math.min(start + blockSize, n);
    let max = 0;
    for (let i = start; i < end; i++) {
      const a = Math.abs(weights[i]);
      max = a > max ? a : max;
    }
    absmax[block] = max;
    const inv = Math.fround(1 / max);
    // fround: the product rounded to f32 as the CUDA kernel computes it (exact in f64 first).
    let i = start;
    for (; i + 1 < end; i += 2) {
      const x0 = Math.fround(weights[i] * inv);
      const x1 = Math.fround(weights[i + 1] * inv);
      const q0 = bucketStart[((x0 + 1) * BUCKETS_PER_UNIT) | 0];
      const q1 = bucketStart[((x1 + 1) * BUCKETS_PER_UNIT) | 0];
      packed[i >> 1] = ((x0 > threshold[q0] ? q0 + 1 : q0) << 4) |
        (x1 > threshold[q1] ? q1 + 1 : q1);
    }
    if (i < end) {
      const x0 = Math.fround(weights[i] * inv);
      const q0 = bucketStart[((x0 + 1) * BUCKETS_PER_UNIT) | 0];
      packed[i >> 1] = ((x0 > threshold[q0] ? q0 + 1 : q0) << 4) | PAD_INDEX;
    }
  }
  return { packed, absmax };
}

/** `code[index] * absmax` for the first `n` elements, each an exact f32 product. */
export function nf4Dequantize(
  packed: Uint8Array,
  absmax: Float32Array,
  n: number,
  blockSize = NF4_BLOCK_SIZE,
): Float32Array {
  checkBlockSize("nf4Dequantize", blockSize);
  if (packed.length < Math.ceil(n / 2) || absmax.length < Math.ceil(n / blockSize)) {
    throw new Error(
      `nf4Dequantize: ${n} elements need ${Math.ceil(n / 2)} packed bytes and ` +
        `${Math.ceil(n / blockSize)} absmax values, got ${packed.length} and ${absmax.length}`,
    );
  }
  const out = new Float32Array(n);
  const code = NF4_CODE;
  for (let i = 0; i < n; i++) {
    const byte = packed[i >> 1];
    out[i] = code[(i & 1) === 0 ? byte >> 4 : byte & 15] * absmax[(i / blockSize) | 0];
  }
  return out;
}
