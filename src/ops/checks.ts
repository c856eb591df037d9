/** Argument checks shared by the ops: each error names the op, the argument and what was given. */
import type { DType, Tensor } from "../gpu/tensor.ts";

function describe(t: Tensor): string {
  return `'${t.name}' [${t.shape}] ${t.dtype}`;
}

export function requireDType(op: string, arg: string, t: Tensor, dtypes: readonly DType[]): void {
  if (!dtypes.includes(t.dtype)) {
    throw new Error(`${op}: ${arg} ${describe(t)} must be ${dtypes.join(" or ")}`);
  }
}

export function requireSize(
  op: string,
  arg: string,
  t: Tensor,
  size: number,
  meaning: string,
): void {
  if (t.size !== size) {
    throw new Error(`${op}: ${arg} ${describe(t)} must have ${size} elements (${meaning})`);
  }
}

/**
 * An output tensor passed by the caller must be f32, as large as the result and not share
 * memory with an input (WebGPU cannot bind one buffer as both read-only and writable).
 */
export function requireOut(op: string, out: Tensor, size: number, inputs: readonly Tensor[]): void {
  requireDType(op, "out", out, ["f32"]);
  requireSize(op, "out", out, size, "the size of the result");
  const shared = inputs.find((t) => t.buffer === out.buffer);
  if (shared) {
    const what = describe(out);
    throw new Error(
      `${op}: out ${what} shares its buffer with input '${shared.name}'; pass a separate out`,
    );
  }
}

export function requirePositiveInteger(op: string, arg: string, value: number): void {
  if (!Number.isInteger(value) || value <= 0) {
    throw new Error(`${op}: ${arg} must be a positive integer, got ${value}`);
  }
}
