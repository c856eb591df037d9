/** layerNorm and rmsNorm (forward with stats, backward) and columnSum. */
import assert from "node:assert/strict";
import {
  layerNorm,
  layerNormBackward,
  layerNormWithStats,
  rmsNorm,
  rmsNormBackward,
  rmsNormWithStats,
} from "../../../src/ops/norm.ts";
import {
  layerNormBackwardRef,
  layerNormRef,
  rmsNormBackwardRef,
  rmsNormRef,
} from "../../../src/ops/norm_ref.ts";
import { columnSum } from "../../../src/ops/reduce.ts";
import { columnSumRef } from "../../../src/ops/reduce_ref.ts";
import { type Draw, finiteDiffCase, gpuCase, type OpCheck } from "../harness.ts";

/** Weights around 1 like trained norms, so a swapped index shows. */
function normWeight(draw: Draw, d: number): Float32Array {
  return draw.randn(d, 0.3).map((v) => 1 + v);
}

interface LayerNormHost {
  x: Float32Array;
  w: Float32Array;
  b: Float32Array;
  dy: Float32Array;
}

/** x with an offset mean, which checks that the variance is computed stably (two-pass). */
function layerNormInputs(rows: number, d: number, offset: number) {
  return (draw: Draw): LayerNormHost => ({
    x: draw.randn(rows * d, 2).map((v) => v + offset),
    w: normWeight(draw, d),
    b: draw.randn(d),
    dy: draw.randn(rows * d),
  });
}

function layerNormCase([rows, d]: [number, number]): OpCheck {
  // The kernel sums x - x[0], so values around 300 centre without the f32 rounding of their mean
  // (lavapipe 2e-15..6e-15 against 1.1e-10 when centring on the mean, also on an NVIDIA H200);
  // the bound leaves room for WGSL's 2.5-ULP division and inverse square root on real GPUs.
  const bound = 1e-12;
  return gpuCase<LayerNormHost>({
    name: `layerNorm ${rows}x${d} f32`,
    inputs: layerNormInputs(rows, d, 300),
    gpu(scope, h) {
      const x = scope.upload(h.x, [rows, d], "f32", "x");
      const w = scope.upload(h.w, [d], "f32", "w");
      const b = scope.upload(h.b, [d], "f32", "b");
      const stats = layerNormWithStats(scope.gpu, x, w, b, 1e-5);
      const y = layerNorm(scope.gpu, x, w, b, 1e-5);
      return { y, mean: stats.mean, rstd: stats.rstd, statsY: stats.y };
    },
    reference: (h) => ({ ...layerNormRef(h.x, h.w, h.b, 1e-5) }),
    nmse: { y: bound, mean: 1e-12, rstd: bound },
    same: [["statsY", "y"]],
  });
}

/** Rows shorter and longer than a workgroup, and enough rows that the parameter gradients are
 * summed over several chunks, the last one partial (1001 rows of 16; 4099 rows of 17). */
function layerNormBackwardCase([rows, d]: [number, number]): OpCheck {
  // f32 gives 1e-15..1e-13 except for rows of 3 values around 30: their rstd amplifies the
  // rounding of x - mean where a row barely varies (dx 6e-9 and 1.5e-8 measured at 4099x3).
  const bound = d <= 3 ? 1e-7 : 1e-11;
  return gpuCase<LayerNormHost>({
    name: `layerNormBackward ${rows}x${d} f32`,
    inputs: layerNormInputs(rows, d, 30),
    gpu(scope, h) {
      const x = scope.upload(h.x, [rows, d], "f32", "x");
      const w = scope.upload(h.w, [d], "f32", "w");
      const b = scope.upload(new Float32Array(d), [d], "f32", "b");
      const dy = scope.upload(h.dy, [rows, d], "f32", "dy");
      const { y, mean, rstd } = layerNormWithStats(scope.gpu, x, w, b, 1e-5);
      for (const t of [y, mean, rstd]) scope.own(t);
      const first = layerNormBackward(scope.gpu, dy, x, w, mean, rstd);
      const again = layerNormBackward(scope.gpu, dy, x, w, mean, rstd);
      const frozen = layerNormBackward(scope.gpu, dy, x, w, mean, rstd, { paramGrads: false });
      assert.equal(frozen.dweight, undefined);
      assert.equal(frozen.dbias, undefined);
      return {
        dx: first.dx,
        dweight: first.dweight!,
        dbias: first.dbias!,
        dweightAgain: again.dweight!,
        dbiasAgain: again.dbias!,
        frozenDx: frozen.dx,
      };
    },
    reference: (h) => ({ ...layerNormBackwardRef(h.dy, h.x, h.w, 1e-5) }),
    nmse: bound,
    // The parameter sums are bitwise reproducible; the frozen variant gives the same dx.
    same: [["dweightAgain", "dweight"], ["dbiasAgain", "dbias"], ["frozenDx", "dx"]],
  });
}

interface RmsNormHost {
  x: Float32Array;
  w: Float32Array;
  dy: Float32Array;
  prior: Float32Array;
}

/** [rows, cols] normalised in runs of d: whole rows (d = cols) or per head (Qwen3 q_norm). */
function rmsNormInputs(rows: number, cols: number, d: number) {
  return (draw: Draw): RmsNormHost => ({
    x: draw.randn(rows * cols, 3),
    w: normWeight(draw, d),
    dy: draw.randn(rows * cols),
    prior: draw.randn(rows * cols),
  });
}

function rmsNormName(op: string, [rows, cols, d]: [number, number, number]): string {
  return `${op} ${rows}x${cols}${d === cols ? "" : ` per-head${d}`} f32`;
}

function rmsNormCase(shape: [number, number, number]): OpCheck {
  const [rows, cols, d] = shape;
  return gpuCase<RmsNormHost>({
    name: rmsNormName("rmsNorm", shape),
    inputs: rmsNormInputs(rows, cols, d),
    gpu(scope, h) {
      const x = scope.upload(h.x, [rows, cols], "f32", "x");
      const w = scope.upload(h.w, [d], "f32", "w");
      const stats = rmsNormWithStats(scope.gpu, x, w, 1e-6);
      return { y: rmsNorm(scope.gpu, x, w, 1e-6), statsY: stats.y, rstd: stats.rstd };
    },
    reference: (h) => ({ ...rmsNormRef(h.x, h.w, 1e-6) }),
    nmse: 1e-10,
    same: [["statsY", "y"]],
  });
}

function rmsNormBackwardCase(shape: [number, number, number]): OpCheck {
  const [rows, cols, d] = shape;
  return gpuCase<RmsNormHost>({
    name: rmsNormName("rmsNormBackward", shape),
    inputs: rmsNormInputs(rows, cols, d),
    gpu(scope, h) {
      const x = scope.upload(h.x, [rows, cols], "f32", "x");
      const w = scope.upload(h.w, [d], "f32", "w");
      const dy = scope.upload(h.dy, [rows, cols], "f32", "dy");
      const acc = scope.upload(h.prior, [rows, cols], "f32", "residualGrad");
      const { y, rstd } = rmsNormWithStats(scope.gpu, x, w, 1e-6);
      scope.own(y);
      scope.own(rstd);
      const frozen = rmsNormBackward(scope.gpu, dy, x, w, rstd);
      assert.equal(frozen.dweight, undefined);
      const trained = rmsNormBackward(scope.gpu, dy, x, w, rstd, { weightGrad: true });
      const added = rmsNormBackward(scope.gpu, dy, x, w, rstd, { out: acc, accumulate: true });
      assert.equal(added.dx, acc);
      return { dx: frozen.dx, trainedDx: trained.dx, dweight: trained.dweight!, accumulated: acc };
    },
    reference(h) {
      const { dx, dweight } = rmsNormBackwardRef(h.dy, h.x, h.w, 1e-6);
      return { dx, dweight, accumulated: dx.map((v, i) => v + h.prior[i]) };
    },
    nmse: { dx: 1e-8, dweight: 1e-12, accumulated: 1e-12 },
    // weightGrad must not change dx.
    same: [["trainedDx", "dx"]],
  });
}

function columnSumCase(shape: number[]): OpCheck {
  const cols = shape.at(-1)!;
  return gpuCase<{ x: Float32Array }>({
    name: `columnSum ${shape.join("x")} f32`,
    inputs: (draw) => ({ x: draw.randn(shape.reduce((a, b) => a * b)) }),
    gpu(scope, h) {
      const sum = columnSum(scope.gpu, scope.upload(h.x, shape, "f32", "x"));
      assert.deepEqual(sum.shape, [cols]);
      return { sum };
    },
    reference: (h) => ({ sum: columnSumRef(h.x, cols) }),
    nmse: 1e-12,
  });
}

export const NORM_CHECKS: OpCheck[] = [
  ...([[1, 1], [65, 7], [5, 37], [3, 1000], [3, 2561], [2, 9728], [7, 128]] as const).map((s) =>
    layerNormCase([...s])
  ),
  ...([[1, 3], [5, 37], [3, 2561], [1001, 77], [4099, 3]] as const).map((s) =>
    layerNormBackwardCase([...s])
  ),
  ...([
    [1, 1, 1],
    [65, 7, 7],
    [5, 37, 37],
    [3, 2561, 2561],
    [2, 9728, 9728],
    [7, 5 * 128, 128],
    [3, 3 * 24, 24],
  ] as const).map((s) => rmsNormCase([...s])),
  // Not rows of 1: there dx = rstd w dy (1 - x̂²) cancels to rounding noise.
  ...([
    [1, 3, 3],
    [65, 7, 7],
    [5, 37, 37],
    [3, 2561, 2561],
    [77, 5 * 128, 128],
    [13, 3 * 24, 24],
  ] as const).map((s) => rmsNormBackwardCase([...s])),
  finiteDiffCase<LayerNormHost>({
    name: "layerNormBackward 3x5 f64 fd",
    inputs: layerNormInputs(3, 5, 0),
    wrt: ["x", "w", "b"],
    forward: (h) => layerNormRef(h.x, h.w, h.b, 1e-5).y,
    backward(h, dy) {
      const { dx: x, dweight: w, dbias: b } = layerNormBackwardRef(dy, h.x, h.w, 1e-5);
      return { x, w, b };
    },
  }),
  // [T 3, heads 2 * hd 4] normalised per head, as Qwen3's q_norm.
  finiteDiffCase<RmsNormHost>({
    name: "rmsNormBackward 3x8 per-head4 f64 fd",
    inputs: rmsNormInputs(3, 8, 4),
    wrt: ["x", "w"],
    forward: (h) => rmsNormRef(h.x, h.w, 1e-6).y,
    backward(h, dy) {
      const { dx: x, dweight: w } = rmsNormBackwardRef(dy, h.x, h.w, 1e-6);
      return { x, w };
    },
  }),
  // One pass (rows <= 16), two passes, two passes with > 256 chunks' worth of rows, a wide row
  // that needs many workgroups, and a 3-D input summed over both leading axes.
  ...[[1, 1], [65, 33], [5, 37], [123, 53], [4099, 3], [2, 70001], [3, 7, 11]].map(columnSumCase),
];
