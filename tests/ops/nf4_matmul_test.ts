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

// Products on every shape, with bias and accumulating, are in ops_table_test.ts.

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
