// Workgroup-tiled matmul, the usual design for real GPUs: y[b, m, n] = alpha * sum_k
// A[b, m, k] * B[b, k, n] (+ bias[n]) (+ what y holds, when ACCUMULATE), f32 accumulate. The
// same products, layouts and weight types as kernels/matmul.wgsl, the default everywhere (on
// CPU adapters every storage load is a loop over the SIMD lanes, and big per-invocation tiles in
// registers win there); this one runs with `matmul(..., { kernel: "workgroup" })` until it has
// been timed on a real GPU.
//
// Each workgroup of 16 x 16 invocations owns a 64 x 64 tile of y. Every step of the K loop
// stages a 64 x 16 slab of A and a 16 x 64 slab of B in workgroup memory, each element loaded
// from storage once for the 64 invocations that use it, and each invocation accumulates a
// 4 x 4 block in registers. The layouts only change how a slab is loaded, so that consecutive
// invocations read consecutive addresses whichever axis is contiguous; the product loop is the
// same for all of them. What it is meant to beat: on an NVIDIA H200 the register-tiled kernel
// with 4 x 4 tiles reached 6.3 TFLOP/s at 1024^3 against PyTorch's 28 (fp32, no TF32).

// x stored [K, M] (transposed) instead of [M, K].
override X_KM: u32;
// w stored [K, N] instead of [N, K] (the PyTorch Linear layout).
override W_KN: u32;
override ADD_BIAS: u32;
override ACCUMULATE: u32;

const TILE = 64u;
const SLAB = 16u;
const WG_SIDE = 16u;
const PER_INVOCATION = 4u;

$MATMUL_PARAMS
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<$W_ELEM>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
// Read only when ADD_BIAS is set.
@group(0) @binding(4) var<storage, read> bias: array<f32>;

// [SLAB][TILE]: a_slab[kk * TILE + r] is A[m0 + r, k0 + kk], b_slab[kk * TILE + c] is
// B[k0 + kk, n0 + c]; zero past the edges of the product.
var<workgroup> a_slab: array<f32, 1024>;
var<workgroup> b_slab: array<f32, 1024>;

// Weight element `index` of w, as f32 (16-bit weights are packed two per u32).
fn weight(index: u32) -> f32 {
$W_VALUE
}

// Where the invocations' `idx`-th load lands in a slab, as (position along the tile, depth):
// consecutive invocations take consecutive depths when the operand is stored with K contiguous
// (16 per row of the tile), consecutive tile positions when it is stored transposed, so that
// they read consecutive addresses either way.
fn slab_position(idx: u32, tile_contiguous: bool) -> vec2u {
  if (tile_contiguous) { return vec2u(idx % TILE, idx / TILE); }
  return vec2u(idx / SLAB, idx % SLAB);
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
  let n0 = wid.x * TILE;
  let m0 = wid.y * TILE;
  let x_base = wid.z * p.x_batch;
  let w_base = wid.z * p.w_batch;
  let y_base = wid.z * p.y_batch;
  let flat = lid.y * WG_SIDE + lid.x;
  var acc: array<vec4f, 4>;
  for (var k0 = 0u; k0 < p.k; k0 += SLAB) {
    for (var e = 0u; e < 4u; e++) {
      let idx = flat + e * WG_SIDE * WG_SIDE;
      // A at (row r, depth kk) and B at (column c, depth kb) of the slabs.
      let a_at = slab_position(idx, X_KM == 1u);
      let row = m0 + a_at.x;
      let col = k0 + a_at.y;
      var a = 0.0;
      if (row < p.m && col < p.k) {
        a = x[select(x_base + row * p.k + col, x_base + col * p.m + row, X_KM == 1u)];
      }
      a_slab[a_at.y * TILE + a_at.x] = a;
      let b_at = slab_position(idx, W_KN == 1u);
      let n = n0 + b_at.x;
      let kw = k0 + b_at.y;
      var b = 0.0;
      if (n < p.n && kw < p.k) {
        b = weight(select(w_base + n * p.k + kw, w_base + kw * p.n + n, W_KN == 1u));
      }
      b_slab[b_at.y * TILE + b_at.x] = b;
    }
    workgroupBarrier();
    for (var kk = 0u; kk < SLAB; kk++) {
      let a_at = kk * TILE + lid.y * PER_INVOCATION;
      let b_at = kk * TILE + lid.x * PER_INVOCATION;
      let b = vec4f(b_slab[b_at], b_slab[b_at + 1u], b_slab[b_at + 2u], b_slab[b_at + 3u]);
      for (var i = 0u; i < PER_INVOCATION; i++) {
        acc[i] += a_slab[a_at + i] * b;
      }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < PER_INVOCATION; i++) {
    let row = m0 + lid.y * PER_INVOCATION + i;
    if (row >= p.m) { break; }
    for (var j = 0u; j < PER_INVOCATION; j++) {
      let col = n0 + lid.x * PER_INVOCATION + j;
      if (col < p.n) {
        let at = y_base + row * p.n + col;
        var value = p.alpha * acc[i][j];
        if (ADD_BIAS == 1u) { value += bias[col]; }
        if (ACCUMULATE == 1u) { value += y[at]; }
        y[at] = value;
      }
    }
  }
}
