/**
 * Pointwise activations on f32 tensors: silu, exact (erf) gelu, quickGelu (OpenAI CLIP),
 * the fused swiglu of the Qwen3 MLP, and erf itself. Any shape; the output has x's shape.
 * Each `*Backward` takes the output gradient and the forward's input and returns dx.
 */
import code from "../../kernels/activation.wgsl" with { type: "text" };
import { type Gpu, grid1d } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { requireDType, requireOut, requireSize } from "./checks.ts";

const WG = 256;

type Entry = "silu" | "gelu" | "quick_gelu" | "erf" | "swiglu";
type BackwardEntry = "silu_backward" | "gelu_backward" | "quick_gelu_backward";

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

function activationBackward(
  gpu: Gpu,
  op: string,
  entry: BackwardEntry,
  dy: Tensor,
  x: Tensor,
  out: Tensor | undefined,
): Tensor {
  requireDType(op, "dy", dy, ["f32"]);
  requireDType(op, "x", x, ["f32"]);
  requireSize(op, "dy", dy, x.size, `the gradient of the output, the size of x '${x.name}'`);
  if (out) requireOut(op, out, x.size, [dy, x]);
  const dx = out ?? gpu.empty(x.shape, "f32", `${op}(${dy.name})`);
  gpu.dispatch({
    kernel: { name: "activation", code, entry, constants: { WG } },
    params: [x.size],
    bindings: [x, null, dx, dy],
    workgroups: grid1d(gpu, x.size, WG),
  });
  return dx;
}

/** dy * silu'(x), silu'(x) = sigmoid(x) (1 + x sigmoid(-x)). */
export function siluBackward(gpu: Gpu, dy: Tensor, x: Tensor, out?: Tensor): Tensor {
  return activationBackward(gpu, "siluBackward", "silu_backward", dy, x, out);
}

/** dy * gelu'(x) for the exact GELU: gelu'(x) = Phi(x) + x phi(x) (normal CDF and density). */
export function geluBackward(gpu: Gpu, dy: Tensor, x: Tensor, out?: Tensor): Tensor {
  return activationBackward(gpu, "geluBackward", "gelu_backward", dy, x, out);
}

/** dy * quickGelu'(x), quickGelu'(x) = silu'(1.702 x). */
export function quickGeluBackward(gpu: Gpu, dy: Tensor, x: Tensor, out?: Tensor): Tensor {
  return activationBackward(gpu, "quickGeluBackward", "quick_gelu_backward", dy, x, out);
}

export interface SwigluGrads {
  /** dOut * up * silu'(gate). */
  dGate: Tensor;
  /** dOut * silu(gate). */
  dUp: Tensor;
}

/** Both gradients of swiglu(gate, up) from its output gradient, in one pass. */
export function swigluBackward(gpu: Gpu, dOut: Tensor, gate: Tensor, up: Tensor): SwigluGrads {
  const op = "swigluBackward";
  for (const [arg, t] of [["dOut", dOut], ["gate", gate], ["up", up]] as const) {
    requireDType(op, arg, t, ["f32"]);
    requireSize(op, arg, t, gate.size, `the size of gate '${gate.name}' [${gate.shape}]`);
  }
  const dGate = gpu.empty(gate.shape, "f32", `${op}.dGate(${gate.name})`);
  const dUp = gpu.empty(up.shape, "f32", `${op}.dUp(${up.name})`);
  gpu.dispatch({
    kernel: { name: "activation", code, entry: "swiglu_backward", constants: { WG } },
    params: [gate.size],
    bindings: [gate, up, dGate, dOut, dUp],
    workgroups: grid1d(gpu, gate.size, WG),
  });
  return { dGate, dUp };
}
