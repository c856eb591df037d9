/** Activations (forward and backward) and the elementwise ops. */
import assert from "node:assert/strict";
import type { Gpu } from "../../../src/gpu/device.ts";
import type { Tensor } from "../../../src/gpu/tensor.ts";
import {
  erf,
  gelu,
  geluBackward,
  quickGelu,
  quickGeluBackward,
  silu,
  siluBackward,
  swiglu,
  swigluBackward,
} from "../../../src/ops/activation.ts";
import {
  erfRef,
  geluGradRef,
  geluRef,
  quickGeluGradRef,
  quickGeluRef,
  siluGradRef,
  siluRef,
  swigluBackwardRef,
  swigluRef,
} from "../../../src/ops/activation_ref.ts";
import { add, addInPlace, dropout, mul, scale } from "../../../src/ops/elementwise.ts";
import { addRef, dropoutRef, mulRef, scaleRef } from "../../../src/ops/elementwise_ref.ts";
import { assertMaxAbs } from "../../helpers.ts";
import { type Draw, finiteDiffCase, gpuCase, type OpCheck } from "../harness.ts";

/** [-10, 10] in steps of 1/512 (exact in f32), the approximation's interval edges, and extremes. */
function sweep(): Float32Array {
  const edges = [0.84375, 1.25, 1 / 0.35, 6, 10, 1e-30, 1e-8, 13, 30, 100, 1000];
  const values = edges.flatMap((e) => [e, -e, Math.fround(e) * (1 + 2 ** -23)]);
  for (let i = -5120; i <= 5120; i++) values.push(i / 512);
  return new Float32Array(values);
}

const SWEEP_LENGTH = sweep().length;

/** The sweep, or `n` normal values with std 3 (most of the curve, some of the tails). */
function unaryInputs(n: number | "sweep") {
  return (draw: Draw) => ({
    x: n === "sweep" ? sweep() : draw.randn(n, 3),
    dy: draw.randn(n === "sweep" ? SWEEP_LENGTH : n),
  });
}

function shapeName(n: number | "sweep"): string {
  return n === "sweep" ? `${SWEEP_LENGTH} sweep` : `${n}`;
}

interface Unary {
  op: string;
  forward: (gpu: Gpu, x: Tensor) => Tensor;
  ref: (x: number) => number;
  backward?: (gpu: Gpu, dy: Tensor, x: Tensor) => Tensor;
  grad?: (x: number) => number;
}

const UNARY: Unary[] = [
  { op: "erf", forward: erf, ref: erfRef },
  { op: "gelu", forward: gelu, ref: geluRef, backward: geluBackward, grad: geluGradRef },
  { op: "silu", forward: silu, ref: siluRef, backward: siluBackward, grad: siluGradRef },
  {
    op: "quickGelu",
    forward: quickGelu,
    ref: quickGeluRef,
    backward: quickGeluBackward,
    grad: quickGeluGradRef,
  },
];

function unaryCase(u: Unary, n: number | "sweep"): OpCheck {
  return gpuCase<{ x: Float32Array }>({
    name: `${u.op} ${shapeName(n)} f32`,
    inputs: unaryInputs(n),
    gpu: (scope, h) => ({ y: u.forward(scope.gpu, scope.upload(h.x, [h.x.length], "f32", "x")) }),
    reference: (h) => ({ y: Array.from(h.x, u.ref) }),
    nmse: 1e-12,
    check(got, h, expected) {
      if (u.op === "erf") return assertMaxAbs(expected.y, got.y, 1e-7, "erf");
      // Outputs are about |x|, so the absolute error scales with |x| (a few f32 ulps).
      const scaled = Array.from(
        h.x,
        (v, i) => (got.y[i] - expected.y[i]) / Math.max(1, Math.abs(v)),
      );
      assertMaxAbs(new Float32Array(scaled.length), scaled, 2e-7, "error / max(1, |x|)");
      // The negative tail of gelu is computed through erfc, so it keeps relative accuracy too.
      const at = h.x.indexOf(-6);
      if (u.op === "gelu" && at >= 0) {
        const ratio = got.y[at] / geluRef(-6);
        assert.ok(Math.abs(ratio - 1) < 1e-5, `gelu(-6) = ${got.y[at]}, ${geluRef(-6)} expected`);
      }
    },
  });
}

function unaryBackwardCase(u: Unary, n: number | "sweep"): OpCheck {
  return gpuCase<{ x: Float32Array; dy: Float32Array }>({
    name: `${u.op}Backward ${shapeName(n)} f32`,
    inputs: unaryInputs(n),
    gpu(scope, h) {
      const x = scope.upload(h.x, [h.x.length], "f32", "x");
      return { dx: u.backward!(scope.gpu, scope.upload(h.dy, [h.x.length], "f32", "dy"), x) };
    },
    reference: (h) => ({ dx: Array.from(h.x, (v, i) => h.dy[i] * u.grad!(v)) }),
    nmse: 1e-12,
    // The derivatives are O(1); a few f32 ulps of dy * f'(x) in absolute terms.
    check: (got, _, expected) => assertMaxAbs(expected.dx, got.dx, 1e-6, "dx"),
  });
}

interface SwigluHost {
  gate: Float32Array;
  up: Float32Array;
  dOut: Float32Array;
}

function swigluInputs(n: number) {
  return (draw: Draw): SwigluHost => ({
    gate: draw.randn(n, 3),
    up: draw.randn(n),
    dOut: draw.randn(n),
  });
}

function swigluCases(n: number): OpCheck[] {
  return [
    gpuCase<SwigluHost>({
      name: `swiglu ${n} f32`,
      inputs: swigluInputs(n),
      gpu: (scope, h) => ({
        y: swiglu(
          scope.gpu,
          scope.upload(h.gate, [n], "f32", "gate"),
          scope.upload(h.up, [n], "f32", "up"),
        ),
      }),
      reference: (h) => ({ y: swigluRef(h.gate, h.up) }),
      nmse: 1e-12,
    }),
    gpuCase<SwigluHost>({
      name: `swigluBackward ${n} f32`,
      inputs: swigluInputs(n),
      gpu: (scope, h) => ({
        ...swigluBackward(
          scope.gpu,
          scope.upload(h.dOut, [n], "f32", "dOut"),
          scope.upload(h.gate, [n], "f32", "gate"),
          scope.upload(h.up, [n], "f32", "up"),
        ),
      }),
      reference: (h) => swigluBackwardRef(h.dOut, h.gate, h.up),
      nmse: 1e-12,
    }),
  ];
}

/** The derivative references against central differences, on [-8, 8] in steps of 1/16. */
function unaryFiniteDiff(u: Unary): OpCheck {
  return finiteDiffCase<{ x: Float32Array }>({
    name: `${u.op}Backward 257 grid f64 fd`,
    inputs: () => ({ x: Float32Array.from({ length: 257 }, (_, i) => -8 + i / 16) }),
    wrt: ["x"],
    forward: (h) => Array.from(h.x, u.ref),
    backward: (h, dy) => ({ x: Array.from(h.x, (v, i) => dy[i] * u.grad!(v)) }),
    // The loss sums 257 terms; a larger step keeps its rounding small next to the difference.
    h: 1e-4,
  });
}

interface BinaryHost {
  a: Float32Array;
  b: Float32Array;
}

/** add, mul, scale and addInPlace on one pair of inputs. */
function elementwiseCase(n: number): OpCheck {
  return gpuCase<BinaryHost>({
    name: `add mul scale addInPlace ${n} f32`,
    inputs: (draw) => ({ a: draw.randn(n), b: draw.randn(n) }),
    gpu(scope, h) {
      const a = scope.upload(h.a, [n], "f32", "a");
      const b = scope.upload(h.b, [n], "f32", "b");
      const acc = scope.upload(h.a, [n], "f32", "acc");
      addInPlace(scope.gpu, acc, b);
      return {
        add: add(scope.gpu, a, b),
        mul: mul(scope.gpu, a, b),
        scale: scale(scope.gpu, a, -0.37),
        addInPlace: acc,
      };
    },
    reference: (h) => ({
      add: addRef(h.a, h.b),
      mul: mulRef(h.a, h.b),
      scale: scaleRef(h.a, -0.37),
      addInPlace: addRef(h.a, h.b),
    }),
    nmse: 1e-12,
  });
}

/** Matches its reference bit for bit, drops about p, repeats its mask for a seed only. */
function dropoutCase(n: number): OpCheck {
  return gpuCase<{ x: Float32Array }>({
    name: `dropout ${n} p0.25 f32`,
    inputs: (draw) => ({ x: draw.randn(n) }),
    gpu(scope, h) {
      const x = scope.upload(h.x, [n], "f32", "x");
      return {
        y: dropout(scope.gpu, x, 0.25, 1234),
        again: dropout(scope.gpu, x, 0.25, 1234),
        otherSeed: dropout(scope.gpu, x, 0.25, 99),
      };
    },
    reference: (h) => ({ y: dropoutRef(h.x, 0.25, 1234) }),
    nmse: 1e-14,
    same: [["again", "y"]],
    check(got, _, expected) {
      assert.deepEqual(got.y, expected.y);
      assert.notDeepEqual(got.y, got.otherSeed);
      // Within 5 standard deviations of a binomial fraction.
      const dropped = got.y.filter((v) => v === 0).length / n;
      const tolerance = 5 * Math.sqrt(0.25 * 0.75 / n);
      assert.ok(Math.abs(dropped - 0.25) < tolerance, `dropped fraction ${dropped}`);
    },
  });
}

const ODD_LENGTHS = [1, 7, 65];

export const POINTWISE_CHECKS: OpCheck[] = [
  ...UNARY.flatMap((u) => [...ODD_LENGTHS, "sweep" as const].map((n) => unaryCase(u, n))),
  ...UNARY.filter((u) => u.backward).flatMap((u) => [
    ...[...ODD_LENGTHS, "sweep" as const].map((n) => unaryBackwardCase(u, n)),
    unaryFiniteDiff(u),
  ]),
  ...[...ODD_LENGTHS, 3 * 9728 + 5].flatMap(swigluCases),
  finiteDiffCase<SwigluHost>({
    name: "swigluBackward 7 f64 fd",
    inputs: swigluInputs(7),
    wrt: ["gate", "up"],
    forward: (h) => Array.from(h.gate, (g, i) => siluRef(g) * h.up[i]),
    backward: (h, dOut) => {
      const { dGate: gate, dUp: up } = swigluBackwardRef(dOut, h.gate, h.up);
      return { gate, up };
    },
  }),
  ...[1, 65, 1237].map(elementwiseCase),
  ...[65, 20011].map(dropoutCase),
];
