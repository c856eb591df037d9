import code from "../../kernels/elementwise.wgsl" with { type: "text" };
import { f32, type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";

const WG = 256;

function sameShape(op: string, a: Tensor, b: Tensor): void {
  if (a.size !== b.size || a.dtype !== "f32" || b.dtype !== "f32") {
    throw new Error(
      `${op}: '${a.name}' [${a.shape}] ${a.dtype} and '${b.name}' [${b.shape}] ${b.dtype} ` +
        `must be f32 with the same number of elements`,
    );
  }
}

function binary(gpu: Gpu, entry: "add" | "mul", a: Tensor, b: Tensor, out?: Tensor): Tensor {
  sameShape(entry, a, b);
  const result = out ?? gpu.empty(a.shape, "f32", `${entry}(${a.name})`);
  gpu.dispatch({
    kernel: { name: "elementwise", code, entry },
    params: [a.size, f32(0)],
    bindings: [a, b, result],
    workgroups: grid1d(gpu, a.size, WG),
  });
  return result;
}

/** a + b elementwise (f32). */
export function add(gpu: Gpu, a: Tensor, b: Tensor, out?: Tensor): Tensor {
  return binary(gpu, "add", a, b, out);
}

/** a * b elementwise (f32). */
export function mul(gpu: Gpu, a: Tensor, b: Tensor, out?: Tensor): Tensor {
  return binary(gpu, "mul", a, b, out);
}

/** a * s (f32). */
export function scale(gpu: Gpu, a: Tensor, s: number, out?: Tensor): Tensor {
  const result = out ?? gpu.empty(a.shape, "f32", `scale(${a.name})`);
  gpu.dispatch({
    kernel: { name: "elementwise", code, entry: "scale" },
    params: [a.size, f32(s)],
    bindings: [a, null, result],
    workgroups: grid1d(gpu, a.size, WG),
  });
  return result;
}

/** acc += b (f32), the residual update; a separate entry because one buffer cannot be bound twice. */
export function addInPlace(gpu: Gpu, acc: Tensor, b: Tensor): Tensor {
  sameShape("addInPlace", acc, b);
  gpu.dispatch({
    kernel: { name: "elementwise", code, entry: "add_in_place" },
    params: [acc.size, f32(0)],
    bindings: [null, b, acc],
    workgroups: grid1d(gpu, acc.size, WG),
  });
  return acc;
}
