// The uniform of both matmul kernels (kernels/matmul.wgsl and kernels/matmul_shared.wgsl), which
// src/ops/matmul.ts writes the same way for either; each takes it through its MATMUL_PARAMS marker.
struct Params {
  m: u32,
  n: u32,
  k: u32,
  // Element offsets between consecutive batches (0 for a weight shared by all batches).
  x_batch: u32,
  w_batch: u32,
  y_batch: u32,
  alpha: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
