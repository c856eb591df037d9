/** Integer inputs (token ids, lengths, masks) that ops accept from the host or as GPU tensors. */
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireSize } from "./checks.ts";

/** Host integers, or a u32/i32 tensor already on the GPU (then the kernel trusts its values). */
export type IndexInput = ArrayLike<number> | Tensor;

export interface IndexTensor {
  tensor: Tensor;
  /** True when the op uploaded the host values itself and must destroy the tensor after use. */
  owned: boolean;
}

function isTensor(values: IndexInput): values is Tensor {
  return typeof (values as Tensor).dtype === "string" && "shape" in values;
}

export interface IndexCheck {
  /** Required number of values and what they stand for ("one per batch row"). */
  length?: { count: number; meaning: string };
  /** Throws a message naming the bad host value; tensors are not read back to be checked. */
  check: (value: number, at: number) => void;
}

/**
 * Host values are checked one by one and uploaded as u32; tensors must be u32 or i32.
 * Uploading submits pending work, so callers in a loop should upload once and pass tensors.
 */
export function indexTensor(
  gpu: Gpu,
  op: string,
  arg: string,
  values: IndexInput,
  { length, check }: IndexCheck,
): IndexTensor {
  if (isTensor(values)) {
    requireDType(op, arg, values, ["u32", "i32"]);
    if (length) requireSize(op, arg, values, length.count, length.meaning);
    return { tensor: values, owned: false };
  }
  if (length && values.length !== length.count) {
    throw new Error(
      `${op}: ${arg} has ${values.length} entries, ${length.count} expected (${length.meaning})`,
    );
  }
  if (values.length === 0) throw new Error(`${op}: ${arg} is empty`);
  const host = new Uint32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const value = values[i];
    if (!Number.isInteger(value)) {
      throw new Error(`${op}: ${arg}[${i}] = ${value} is not an integer`);
    }
    check(value, i);
    host[i] = value;
  }
  return { tensor: gpu.upload(host, [host.length], "u32", `${op}.${arg}`), owned: true };
}
