// Register-tiled matmul: y[b, m, n] = alpha * sum_k A[b, m, k] * B[b, k, n] (+ bias[n]), f32
// accumulate; the accumulating variants add that to what y holds.
//
// A is `x` stored [M, K] or, transposed, [K, M]; B is `w` stored [N, K] (PyTorch Linear) or
// [K, N], as f32 or as raw f16/bf16 bit patterns packed two per u32 (unpacked here, so no
// shader-f16 is needed). Each invocation owns a TM x TN tile of y and keeps it in registers for
// the whole K loop; there is no workgroup memory and no barrier. On CPU adapters (lavapipe and
// llvmpipe run 8 invocations as one SIMD vector) every storage load becomes a loop over the
// lanes, which costs far more than the arithmetic, so the kernel's speed comes from reusing each
// loaded value TM or TN times; the tile size is picked per adapter in src/ops/matmul.ts.
//
// Tile and workgroup sizes are override constants; the element types and the unrolled tile
// code are dollar-sign markers that src/ops/matmul.ts fills (`Kernel.markers`) for one layout,
// weight type, vector width and tile size. The tile stays unrolled because the loop form is
// slow: as WGSL loops over override bounds with array accumulators, Mesa 22.3's lavapipe does
// not unroll them into registers, and a 512^3 product with 16 x 16 tiles ran at 0.7 GFLOP/s
// against 5.1 unrolled (256^3 with 4 x 4 tiles: 0.5 against 2.0), with no shorter compile;
// llvmpipe through OpenGL unrolls them, but ran at 3.4 GFLOP/s and took 35 s to compile.

// Rows and columns of y per invocation, K values per step, invocations per workgroup.
override TM: u32;
override TN: u32;
override KS: u32;
override WG: u32;

$MATMUL_PARAMS
@group(0) @binding(1) var<storage, read> x: array<$X_ELEM>;
@group(0) @binding(2) var<storage, read> w: array<$W_ELEM>;
@group(0) @binding(3) var<storage, read_write> y: array<$Y_ELEM>;
// Read only by the variants with a bias.
@group(0) @binding(4) var<storage, read> bias: array<f32>;

fn bf16_lo(word: u32) -> f32 {
  return bitcast<f32>(word << 16u);
}

fn bf16_hi(word: u32) -> f32 {
  return bitcast<f32>(word & 0xffff0000u);
}

fn f16_lo(word: u32) -> f32 {
  return unpack2x16float(word).x;
}

fn f16_hi(word: u32) -> f32 {
  return unpack2x16float(word).y;
}

// Workgroups: x = row tile, y = group of column tiles, z = batch. Row tiles vary fastest, so
// workgroups that run at the same time read the same weight rows (from cache); the lanes of a
// workgroup take adjacent column tiles.
@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
  let n0 = (wid.y * WG + lid.x) * TN;
  let m0 = wid.x * TM;
  let x_base = wid.z * p.x_batch;
  let w_base = wid.z * p.w_batch;
  let y_base = wid.z * p.y_batch;
$PROLOGUE
  for (var k = 0u; k < p.k; k += KS) {
$BODY
  }
$EPILOGUE
}
