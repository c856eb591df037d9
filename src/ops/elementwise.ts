/**
 * Elementwise f32 ops. Their backward passes need no kernels of their own:
 * - add / addInPlace (the residual): d a = d b = dy, so the gradient is passed on as is
 *   (or summed into the residual stream's gradient with `addInPlace`);
 * - mul: d a = mul(dy, b), d b = mul(dy, a);
 * - scale: d a = scale(dy, s).
 */
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
    params: [a.size, f32(0), 0],
    bindings: [a, b, result],
    workgroups: grid1d(gpu, a.size, WG),
  });
  return result;
}

/** a + b elementwise (f32). Backward: dy to both a and b. */
export function add(gpu: Gpu, a: Tensor, b: Tensor, out?: Tensor): Tensor {
  return binary(gpu, "add", a, b, out);
}

/** a * b elementwise (f32). Backward: d a = mul(dy, b), d b = mul(dy, a). */
export function mul(gpu: Gpu, a: Tensor, b: Tensor, out?: Tensor): Tensor {
  return binary(gpu, "mul", a, b, out);
}

/** a * s (f32). Backward: d a = scale(dy, s). */
export function scale(gpu: Gpu, a: Tensor, s: number, out?: Tensor): Tensor {
  const result = out ?? gpu.empty(a.shape, "f32", `scale(${a.name})`);
  gpu.dispatch({
    kernel: { name: "elementwise", code, entry: "scale" },
    params: [a.size, f32(s), 0],
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
    params: [acc.size, f32(0), 0],
    bindings: [null, b, acc],
    workgroups: grid1d(gpu, acc.size, WG),
  });
  return acc;
}

/**
 * Inverted dropout: each element is zeroed with probability `p`, the rest scaled by
 * 1/(1-p). The mask is a hash of (seed, index), so applying it again with the same seed to
 * the gradient is the backward pass, and a resumed run reproduces it from the seed alone.
 */
export function dropout(gpu: Gpu, x: Tensor, p: number, seed: number, out?: Tensor): Tensor {
  if (!(p >= 0 && p < 1)) throw new Error(`dropout: probability ${p} outside [0, 1)`);
  const result = out ?? gpu.empty(x.shape, "f32", `dropout(${x.name})`);
  gpu.dispatch({
    kernel: { name: "elementwise", code, entry: "dropout" },
    params: [x.size, f32(p), seed >>> 0, f32(1 / (1 - p))],
    bindings: [x, null, result],
    workgroups: grid1d(gpu, x.size, WG),
  });
  return result;
}
