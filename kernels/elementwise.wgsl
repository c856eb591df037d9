// Elementwise ops on f32 arrays. One invocation per element; the grid wraps x into y
// because large tensors exceed 65535 workgroups on x.

struct Params {
  n: u32,
  scale: f32,
  seed: u32,
  // dropout: 1 / (1 - p) rounded to f32 on the host.
  keep_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override WG: u32 = 256u;

fn index(gid: vec3u, nwg: vec3u) -> u32 {
  return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(WG)
fn add(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = a[i] + b[i]; }
}

@compute @workgroup_size(WG)
fn mul(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = a[i] * b[i]; }
}

@compute @workgroup_size(WG)
fn scale(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = a[i] * p.scale; }
}

@compute @workgroup_size(WG)
fn add_in_place(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = out[i] + b[i]; }
}

// Inverted dropout with a mask derived from (seed, index) by a PCG hash, so the backward
// pass regenerates the same mask instead of storing it. `scale` holds the drop probability.
// Kept values are multiplied by keep_scale, as PyTorch's dropout multiplies by 1 / (1 - p):
// a product is correctly rounded on every GPU, a quotient need not be (WGSL allows 2.5 ULP, and
// NVIDIA's is off by one ULP where lavapipe's is exact).
fn pcg_hash(v: u32) -> u32 {
  let state = v * 747796405u + 2891336453u;
  let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
  return (word >> 22u) ^ word;
}

@compute @workgroup_size(WG)
fn dropout(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) {
    let r = f32(pcg_hash(pcg_hash(i) ^ p.seed) >> 8u) * (1.0 / 16777216.0);
    out[i] = select(0.0, a[i] * p.keep_scale, r >= p.scale);
  }
}
