/**
 * Pointwise activations on f32 tensors: silu, exact (erf) gelu, quickGelu (OpenAI CLIP),
 * the fused swiglu of the Qwen3 MLP, and erf itself. Any shape; the output has x's shape.
 */
import code from "../../kernels/activation.wgsl" with { type: "text" };
import { type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut, requireSize } from "./checks.ts";

const WG = 256;

type Entry = "silu" | "gelu" | "quick_gelu" | "erf" | "swiglu";

function activation(
  gpu: Gpu,
  op: string,
  entry: Entry,
  x: Tensor,
  other: Tensor | null,
  out: Tensor | undefined,
): Tensor {
  requireDType(op, "x", x, ["f32"]);
  if (out) requireOut(op, out, x.size, other ? [x, other] : [x]);
  const result = out ?? gpu.empty(x.shape, "f32", `${op}(${x.name})`);
  gpu.dispatch({
    kernel: { name: "activation", code, entry, constants: { WG } },
    params: [x.size],
    bindings: [x, other, result],
    workgroups: grid1d(gpu, x.size, WG),
  });
  return result;
}

/** x * sigmoid(x). */
export function silu(gpu: Gpu, x: Tensor, out?: Tensor): Tensor {
  return activation(gpu, "silu", "silu", x, null, out);
}

/** Exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (torch.nn.GELU(approximate="none")). */
export function gelu(gpu: Gpu, x: Tensor, out?: Tensor): Tensor {
  return activation(gpu, "gelu", "gelu", x, null, out);
}

/** x * sigmoid(1.702 x), OpenAI CLIP's `quick_gelu`. */
export function quickGelu(gpu: Gpu, x: Tensor, out?: Tensor): Tensor {
  return activation(gpu, "quickGelu", "quick_gelu", x, null, out);
}

/** The error function (f32, within about 1e-7 absolute). */
export function erf(gpu: Gpu, x: Tensor, out?: Tensor): Tensor {
  return activation(gpu, "erf", "erf", x, null, out);
}

/** silu(gate) * up elementwise, fused (Qwen3 MLP); gate and up have the same size. */
export function swiglu(gpu: Gpu, gate: Tensor, up: Tensor, out?: Tensor): Tensor {
  requireDType("swiglu", "gate", gate, ["f32"]);
  requireDType("swiglu", "up", up, ["f32"]);
  requireSize("swiglu", "up", up, gate.size, `the size of gate '${gate.name}' [${gate.shape}]`);
  return activation(gpu, "swiglu", "swiglu", gate, up, out);
}
