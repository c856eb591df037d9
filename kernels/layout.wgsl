// Layout ops: strided block copies (concatenation and splitting along an axis), their
// summing variant (the gradient of a broadcast), and the masked mean over the sequence axis
// and its backward. One invocation per output element; the grid wraps x into y.

// copy_block copies a block of n0 x n1 x n2 elements (n2 contiguous) between 4-byte arrays:
// dst[dst_offset + i0 * dst_s0 + i1 * dst_s1 + c] = src[src_offset + i0 * src_s0 + i1 * src_s1 + c].
// A zero source stride repeats the source along that axis (broadcast).
// sum_block is its reverse for a broadcast axis 0: dst[dst_offset + i1 * dst_s1 + c] = the sum
// over i0 < n0, in order, of the same source element (f32; dst_s0 is not used).
struct CopyParams {
  n0: u32,
  n1: u32,
  n2: u32,
  src_offset: u32,
  src_s0: u32,
  src_s1: u32,
  dst_offset: u32,
  dst_s0: u32,
  dst_s1: u32,
}

// mean_rows: out[b, d] = mean of x[b, t, d] over t < len_b, where len_b = lengths[b] (capped
// at t) when use_lengths is set, else t; 0 when len_b is 0. mean_rows_backward reads dy [B, D]
// through `x` and writes dx [B, T, D] to `out`: dy[b, d] / len_b for t < len_b, else 0.
struct MeanParams {
  batch: u32,
  t: u32,
  dim: u32,
  use_lengths: u32,
}

@group(0) @binding(0) var<uniform> cp: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@group(0) @binding(1) var<storage, read> src_f32: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst_f32: array<f32>;

@group(0) @binding(0) var<uniform> mp: MeanParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> lengths: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override WG: u32 = 256u;

fn index(gid: vec3u, nwg: vec3u) -> u32 {
  return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(WG)
fn copy_block(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let e = index(gid, nwg);
  if (e >= cp.n0 * cp.n1 * cp.n2) {
    return;
  }
  let c = e % cp.n2;
  let r = e / cp.n2;
  let i1 = r % cp.n1;
  let i0 = r / cp.n1;
  dst[cp.dst_offset + i0 * cp.dst_s0 + i1 * cp.dst_s1 + c] =
    src[cp.src_offset + i0 * cp.src_s0 + i1 * cp.src_s1 + c];
}

@compute @workgroup_size(WG)
fn sum_block(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let e = index(gid, nwg);
  if (e >= cp.n1 * cp.n2) {
    return;
  }
  let c = e % cp.n2;
  let i1 = e / cp.n2;
  let src_at = cp.src_offset + i1 * cp.src_s1 + c;
  var sum = 0.0;
  for (var i0 = 0u; i0 < cp.n0; i0++) {
    sum += src_f32[src_at + i0 * cp.src_s0];
  }
  dst_f32[cp.dst_offset + i1 * cp.dst_s1 + c] = sum;
}

fn sequence_length(b: u32) -> u32 {
  if (mp.use_lengths != 0u) {
    return min(lengths[b], mp.t);
  }
  return mp.t;
}

@compute @workgroup_size(WG)
fn mean_rows(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let e = index(gid, nwg);
  if (e >= mp.batch * mp.dim) {
    return;
  }
  let b = e / mp.dim;
  let d = e % mp.dim;
  let len = sequence_length(b);
  var sum = 0.0;
  for (var t = 0u; t < len; t++) {
    sum += x[(b * mp.t + t) * mp.dim + d];
  }
  out[e] = select(0.0, sum / f32(len), len > 0u);
}

@compute @workgroup_size(WG)
fn mean_rows_backward(
  @builtin(global_invocation_id) gid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
) {
  let e = index(gid, nwg);
  if (e >= mp.batch * mp.t * mp.dim) {
    return;
  }
  let d = e % mp.dim;
  let row = e / mp.dim;
  let t = row % mp.t;
  let b = row / mp.t;
  let len = sequence_length(b);
  out[e] = select(0.0, x[b * mp.dim + d] / f32(len), t < len);
}
