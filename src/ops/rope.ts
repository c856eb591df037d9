/**
 * Rotary position embedding in the rotate-half form of transformers' Qwen3
 * (`apply_rotary_pos_emb`), f32. The cos/sin table is built once on the host
 * (`ropeTable`) and read by the kernel; see `ropeAngles` for how the angles are rounded.
 * `ropeBackward` rotates the output gradient back (by -angle, the transpose of the rotation).
 */
import code from "../../kernels/rope.wgsl" with { type: "text" };
import { type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut, requirePositiveInteger, requireSize } from "./checks.ts";

const WG = 256;
// Bits of the kernel's `flags` parameter.
const POSITIONS = 1;
const INVERSE = 2;

/**
 * How the angle pos * inv_freq is computed:
 * - "transformers" (default): as transformers' default RoPE init and Qwen3RotaryEmbedding,
 *   inv_freq = 1 / theta ** (arange(0, hd, 2) / hd) and then pos * inv_freq, each step
 *   rounded to f32 (cos/sin of that f32 angle are then evaluated in float64 and rounded).
 * - "float64": every step in float64 (the numerics oracle's rope_cos_sin). The two differ
 *   by up to pos * 2^-24 radians, about 1.5e-5 at position 256.
 */
export type RopeAngles = "transformers" | "float64";

export interface RopeTableOptions {
  headDim: number;
  theta: number;
  /** Positions the table covers: 0 .. maxPositions - 1. */
  maxPositions: number;
  angles?: RopeAngles;
}

export interface RopeTable {
  /** f32 [maxPositions, headDim / 2, 2]: (cos, sin) of each position's angle i. */
  cosSin: Tensor;
  headDim: number;
  maxPositions: number;
}

/** inv_freq_i = theta^(-2i/hd), i < hd/2, rounded as `angles` says. */
export function ropeInvFreq(headDim: number, theta: number, angles: RopeAngles): Float64Array {
  const half = headDim / 2;
  const invFreq = new Float64Array(half);
  for (let i = 0; i < half; i++) {
    if (angles === "float64") {
      invFreq[i] = 1 / theta ** ((2 * i) / headDim);
    } else {
      const exponent = Math.fround((2 * i) / headDim);
      invFreq[i] = Math.fround(1 / Math.fround(Math.fround(theta) ** exponent));
    }
  }
  return invFreq;
}

/** The angle of pair i at `position`, with the rounding `angles` says. */
export function ropeAngle(position: number, invFreq: number, angles: RopeAngles): number {
  return angles === "float64" ? position * invFreq : Math.fround(position * invFreq);
}

/** Builds and uploads the cos/sin table once per model (uploading submits pending work). */
export function ropeTable(gpu: Gpu, options: RopeTableOptions): RopeTable {
  const { headDim, theta, maxPositions, angles = "transformers" } = options;
  requirePositiveInteger("ropeTable", "maxPositions", maxPositions);
  if (!Number.isInteger(headDim) || headDim <= 0 || headDim % 2 !== 0) {
    throw new Error(`ropeTable: headDim must be a positive even integer, got ${headDim}`);
  }
  if (!(theta > 0)) throw new Error(`ropeTable: theta must be positive, got ${theta}`);
  const half = headDim / 2;
  const invFreq = ropeInvFreq(headDim, theta, angles);
  const table = new Float32Array(maxPositions * half * 2);
  for (let pos = 0; pos < maxPositions; pos++) {
    for (let i = 0; i < half; i++) {
      const angle = ropeAngle(pos, invFreq[i], angles);
      table[(pos * half + i) * 2] = Math.cos(angle);
      table[(pos * half + i) * 2 + 1] = Math.sin(angle);
    }
  }
  const cosSin = gpu.upload(table, [maxPositions, half, 2], "f32", `rope.cosSin(theta ${theta})`);
  return { cosSin, headDim, maxPositions };
}

export interface RopeOptions {
  /** Heads per token; x holds tokens * heads * headDim elements. */
  heads: number;
  /**
   * Tokens per sequence: token t has position t % seqLen (positions 0..T-1 of each sequence
   * of a [B, T, ...] batch). Default: all tokens form one sequence.
   */
  seqLen?: number;
  /** i32/u32 [tokens]: explicit positions (< table.maxPositions; not checked on the GPU). */
  positions?: Tensor;
  /** Output tensor; pass x itself to rotate in place. */
  out?: Tensor;
}

/**
 * Rotates x [B, T, heads, hd] (any shape with tokens * heads * hd elements, e.g. the
 * [B*T, heads*hd] output of a projection) by each token's position.
 */
export function rope(gpu: Gpu, x: Tensor, table: RopeTable, options: RopeOptions): Tensor {
  return rotate(gpu, "rope", "x", x, table, options, false);
}

/**
 * The gradient of `rope`: dx from the output gradient dy, with the same table and options
 * (positions, seqLen) as the forward. `out: dy` rotates the gradient in place.
 */
export function ropeBackward(gpu: Gpu, dy: Tensor, table: RopeTable, options: RopeOptions): Tensor {
  return rotate(gpu, "ropeBackward", "dy", dy, table, options, true);
}

function rotate(
  gpu: Gpu,
  op: string,
  arg: "x" | "dy",
  x: Tensor,
  table: RopeTable,
  options: RopeOptions,
  inverse: boolean,
): Tensor {
  requireDType(op, arg, x, ["f32"]);
  const { heads, positions, out } = options;
  requirePositiveInteger(op, "heads", heads);
  const tokenSize = heads * table.headDim;
  if (x.size % tokenSize !== 0) {
    throw new Error(
      `${op}: ${arg} '${x.name}' [${x.shape}] must hold whole tokens of heads ${heads} * headDim ` +
        `${table.headDim} = ${tokenSize} elements`,
    );
  }
  const tokens = x.size / tokenSize;
  let seqLen = 1;
  let flags = inverse ? INVERSE : 0;
  if (positions) {
    if (options.seqLen !== undefined) throw new Error(`${op}: pass seqLen or positions, not both`);
    requireDType(op, "positions", positions, ["i32", "u32"]);
    requireSize(op, "positions", positions, tokens, "one position per token");
    flags |= POSITIONS;
  } else {
    seqLen = options.seqLen ?? tokens;
    requirePositiveInteger(op, "seqLen", seqLen);
    if (tokens % seqLen !== 0) {
      throw new Error(
        `${op}: ${arg} '${x.name}' holds ${tokens} tokens, not a multiple of seqLen ${seqLen}`,
      );
    }
    if (seqLen > table.maxPositions) {
      throw new Error(
        `${op}: seqLen ${seqLen} exceeds the table's ${table.maxPositions} positions; build ` +
          `ropeTable with a larger maxPositions`,
      );
    }
  }
  const inPlace = out !== undefined && out.buffer === x.buffer;
  if (out && !inPlace) requireOut(op, out, x.size, positions ? [x, positions] : [x]);
  const result = out ?? gpu.empty(x.shape, "f32", `${op}(${x.name})`);
  const pairs = tokens * heads * (table.headDim / 2);
  const lookup = positions ?? table.cosSin;
  gpu.dispatch({
    kernel: { name: "rope", code, entry: inPlace ? "rope_in_place" : "rope", constants: { WG } },
    params: [pairs, heads, table.headDim / 2, seqLen, flags],
    bindings: inPlace
      ? [null, table.cosSin, lookup, null, result]
      : [x, table.cosSin, lookup, result, null],
    workgroups: grid1d(gpu, pairs, WG),
  });
  return result;
}
