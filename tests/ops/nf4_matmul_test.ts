import assert from "node:assert/strict";
import type { Gpu } from "../../src/gpu/device.ts";
import type { Tensor } from "../../src/gpu/tensor.ts";
import { nf4Quantize, type Nf4Quantized } from "../../src/ops/nf4.ts";
import {
  nf4Matmul,
  nf4MatmulInputGrad,
  type Nf4Weight,
  uploadNf4Weight,
} from "../../src/ops/nf4_matmul.ts";
import { nf4MatmulInputGradRef, nf4MatmulRef } from "../../src/ops/nf4_matmul_ref.ts";
import { assertNmse, randn, testGpu } from "../helpers.ts";

interface Case {
  what: string;
  ref: ArrayLike<number>;
  out: Tensor;
}

/** A random [n, k] weight (std 0.05, like trained projections), quantised and uploaded. */
function randomWeight(gpu: Gpu, n: number, k: number, seed: number) {
  const q = nf4Quantize(randn(n * k, seed, 0.05));
  return { q, w: uploadNf4Weight(gpu, q, n, k, `w${n}x${k}`) };
}

async function checkAll(gpu: Gpu, cases: Case[], temporaries: Tensor[]): Promise<void> {
  const got = await gpu.readAll(cases.map((c) => c.out)) as Float32Array[];
  cases.forEach((c, i) => assertNmse(c.ref, got[i], 1e-7, c.what));
  for (const t of [...temporaries, ...cases.map((c) => c.out)]) t.destroy();
}

function destroyWeight(w: Nf4Weight): void {
  w.packed.destroy();
  w.absmax.destroy();
}

// [m, k, n]: k % 64 != 0 and k % 8 != 0 take the general kernels (blocks straddle rows);
// the others the tiled ones, with partial row tiles (7, 33, 40), several row tiles (33, 40),
// several reduction chunks (k = 640 with 32-row tiles) and a 1-row tile.
const SHAPES: Array<[number, number, number]> = [
  [7, 100, 37],
  [1, 64, 5],
  [33, 192, 65],
  [7, 96, 37],
  [5, 37, 9],
  [40, 128, 70],
  [33, 640, 19],
  [1, 2560, 40],
  [9, 8, 3],
  // DEQUANTIZE_MIN_ROWS rows or more: W dequantised once, then the f32 matmul.
  [70, 192, 65],
  [64, 37, 9],
];

Deno.test("nf4Matmul matches the dequantised reference, with and without bias", async () => {
  const gpu = await testGpu();
  const cases: Case[] = [];
  const temporaries: Tensor[] = [];
  const weights: Nf4Weight[] = [];
  SHAPES.forEach(([m, k, n], s) => {
    const { q, w } = randomWeight(gpu, n, k, 10 + s);
    const x = randn(m * k, 20 + s);
    const bias = randn(n, 30 + s);
    const tx = gpu.upload(x, [m, k], "f32", "x");
    const tb = gpu.upload(bias, [n], "f32", "bias");
    cases.push(
      {
        what: `nf4Matmul [${m}, ${k}] x [${n}, ${k}]^T`,
        ref: nf4MatmulRef(x, q, n, k),
        out: nf4Matmul(gpu, tx, w),
      },
      {
        what: `nf4Matmul [${m}, ${k}] x [${n}, ${k}]^T + bias`,
        ref: nf4MatmulRef(x, q, n, k, bias),
        out: nf4Matmul(gpu, tx, w, { bias: tb }),
      },
    );
    temporaries.push(tx, tb);
    weights.push(w);
  });
  await checkAll(gpu, cases, temporaries);
  weights.forEach(destroyWeight);
});

Deno.test("nf4MatmulInputGrad matches dy W, also over several chunks of N and accumulating", async () => {
  const gpu = await testGpu();
  const cases: Case[] = [];
  const temporaries: Tensor[] = [];
  const weights: Nf4Weight[] = [];
  // n = 1100 with 32-row tiles is three chunks of 512 along the reduction.
  [...SHAPES, [33, 64, 1100] as [number, number, number]].forEach(([m, k, n], s) => {
    const { q, w } = randomWeight(gpu, n, k, 40 + s);
    const dy = randn(m * n, 50 + s);
    const tdy = gpu.upload(dy, [m, n], "f32", "dy");
    cases.push({
      what: `nf4MatmulInputGrad [${m}, ${n}] x [${n}, ${k}]`,
      ref: nf4MatmulInputGradRef(dy, q, n, k),
      out: nf4MatmulInputGrad(gpu, tdy, w),
    });
    const start = randn(m * k, 60 + s);
    const acc = gpu.upload(start, [m, k], "f32", "acc");
    nf4MatmulInputGrad(gpu, tdy, w, { out: acc, accumulate: true });
    const grad = nf4MatmulInputGradRef(dy, q, n, k);
    cases.push({
      what: `nf4MatmulInputGrad [${m}, ${n}] x [${n}, ${k}] accumulated`,
      ref: grad.map((g, i) => g + start[i]),
      out: acc,
    });
    temporaries.push(tdy);
    weights.push(w);
  });
  await checkAll(gpu, cases, temporaries);
  weights.forEach(destroyWeight);
});

Deno.test("the NF4 ops stage large operands in passes and grow the tile buffer mid-submission", async () => {
  const gpu = await testGpu();
  const small = randomWeight(gpu, 24, 128, 70);
  // 40 rows of 26112 (fewer than DEQUANTIZE_MIN_ROWS): two 32-row tiles of 51 chunks each
  // (3.2 MiB), staged one tile per pass.
  const tall = randomWeight(gpu, 5, 26112, 71);
  const tallT = randomWeight(gpu, 26112, 8, 72);
  // One row of 68 chunks of 16384: 4.3 MiB of tiles, more than the buffer's first size.
  const wide = randomWeight(gpu, 2, 68 * 16384, 73);
  const xs = randn(2 * 3 * 128, 74);
  const xt = randn(40 * 26112, 75);
  const xw = randn(68 * 16384, 76);
  const txs = gpu.upload(xs, [2, 3, 128], "f32", "x3d");
  const txt = gpu.upload(xt, [40, 26112], "f32", "xtall");
  const txw = gpu.upload(xw, [1, 68 * 16384], "f32", "xwide");
  // Recorded back to back: the last call needs a larger tile buffer than the others used, so
  // it must submit their work before replacing the buffer.
  const ys = nf4Matmul(gpu, txs, small.w);
  const yt = nf4Matmul(gpu, txt, tall.w);
  const dxt = nf4MatmulInputGrad(gpu, txt, tallT.w);
  const yw = nf4Matmul(gpu, txw, wide.w);
  assert.deepEqual(ys.shape, [2, 3, 24]);
  await checkAll(gpu, [
    { what: "nf4Matmul [2, 3, 128]", ref: nf4MatmulRef(xs, small.q, 24, 128), out: ys },
    { what: "nf4Matmul [40, 26112]", ref: nf4MatmulRef(xt, tall.q, 5, 26112), out: yt },
    {
      what: "nf4MatmulInputGrad [40, 26112]",
      ref: nf4MatmulInputGradRef(xt, tallT.q, 26112, 8),
      out: dxt,
    },
    { what: "nf4Matmul [1, 1114112]", ref: nf4MatmulRef(xw, wide.q, 2, 68 * 16384), out: yw },
  ], [txs, txt, txw]);
  for (const { w } of [small, tall, tallT, wide]) destroyWeight(w);
});

Deno.test("the NF4 ops reject mismatched shapes with errors naming the fix", async () => {
  const gpu = await testGpu();
  const { w } = randomWeight(gpu, 8, 64, 80);
  const x = gpu.zeros([3, 65], "f32", "x");
  assert.throws(() => nf4Matmul(gpu, x, w), /last dimension 64/);
  assert.throws(() => nf4MatmulInputGrad(gpu, x, w), /last dimension 8/);
  const wrong: Nf4Quantized = nf4Quantize(new Float32Array(8 * 64));
  assert.throws(() => uploadNf4Weight(gpu, wrong, 8, 32, "w"), /nf4Quantize/);
  x.destroy();
  destroyWeight(w);
});
