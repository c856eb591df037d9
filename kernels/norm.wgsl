// LayerNorm and RMSNorm over the last axis, one workgroup per row (prefixed with
// workgroup_reduce.wgsl). Statistics are two-pass in f32: the mean first, then the
// centred sum of squares, so a large mean does not cancel the variance.
// The *_stats entries also store per-row mean / rstd for the backward pass.

struct Params {
  rows: u32,
  d: u32,
  eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;

// Returns (mean, rstd) of the row after writing y = (x - mean) * rstd * w + b.
fn layer_norm_row(row: u32, lid: u32) -> vec2f {
  let base = row * p.d;
  var sum = 0.0;
  for (var j = lid; j < p.d; j += WG) { sum += x[base + j]; }
  let mean = workgroup_sum(sum, lid) / f32(p.d);
  var sq = 0.0;
  for (var j = lid; j < p.d; j += WG) {
    let c = x[base + j] - mean;
    sq += c * c;
  }
  let rstd = 1.0 / sqrt(workgroup_sum(sq, lid) / f32(p.d) + p.eps);
  for (var j = lid; j < p.d; j += WG) {
    y[base + j] = (x[base + j] - mean) * rstd * weight[j] + bias[j];
  }
  return vec2f(mean, rstd);
}

// Returns rstd after writing y = w * (x * rstd), the order of transformers' Qwen3RMSNorm.
fn rms_norm_row(row: u32, lid: u32) -> f32 {
  let base = row * p.d;
  var sq = 0.0;
  for (var j = lid; j < p.d; j += WG) {
    let v = x[base + j];
    sq += v * v;
  }
  let rstd = 1.0 / sqrt(workgroup_sum(sq, lid) / f32(p.d) + p.eps);
  for (var j = lid; j < p.d; j += WG) {
    y[base + j] = weight[j] * (x[base + j] * rstd);
  }
  return rstd;
}

@compute @workgroup_size(WG)
fn layer_norm(
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let row = row_of(wid, nwg);
  if (row >= p.rows) { return; }
  layer_norm_row(row, lid);
}

@compute @workgroup_size(WG)
fn layer_norm_stats(
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let row = row_of(wid, nwg);
  if (row >= p.rows) { return; }
  let stats = layer_norm_row(row, lid);
  if (lid == 0u) {
    mean_out[row] = stats.x;
    rstd_out[row] = stats.y;
  }
}

@compute @workgroup_size(WG)
fn rms_norm(
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let row = row_of(wid, nwg);
  if (row >= p.rows) { return; }
  rms_norm_row(row, lid);
}

@compute @workgroup_size(WG)
fn rms_norm_stats(
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let row = row_of(wid, nwg);
  if (row >= p.rows) { return; }
  let rstd = rms_norm_row(row, lid);
  if (lid == 0u) { rstd_out[row] = rstd; }
}
