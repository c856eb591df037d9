// LayerNorm and RMSNorm over the last axis, one workgroup per row (the
// workgroup reductions of workgroup_reduce.wgsl fill the marker below). Statistics are two-pass in f32: the mean first, then the
// centred sum of squares, so a large mean does not cancel the variance.
// The *_stats entries also store per-row mean / rstd for the backward pass.
//
// Backward (norm_backward, norm_weight_grad_partial), with xhat the normalised row (centred
// for LayerNorm), g = dy * weight and everything per row:
//   dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))    (RMSNorm: no mean(g) term)
//   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy (columnSum of dy).
// dweight is summed without atomics, so it is bitwise reproducible: each invocation owns one
// column of one chunk of rows and writes its partial sum, then reduce.wgsl's column_sum adds
// the chunks in order.

$WORKGROUP_REDUCE

struct Params {
  rows: u32,
  d: u32,
  eps: f32,
  // Backward only from here on.
  flags: u32,
  chunk_rows: u32,
}

// Centred with a bias (LayerNorm); otherwise RMSNorm, and saved_mean is never read.
const LAYER_NORM: u32 = 1u;
// norm_backward adds into dx instead of overwriting it.
const ACCUMULATE: u32 = 2u;
const COLUMN_WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(7) var<storage, read> dy: array<f32>;
@group(0) @binding(8) var<storage, read> saved_mean: array<f32>;
@group(0) @binding(9) var<storage, read> saved_rstd: array<f32>;
@group(0) @binding(10) var<storage, read_write> dx: array<f32>;
// [chunks, d]: per chunk of rows, the partial dweight of every column.
@group(0) @binding(11) var<storage, read_write> partial: array<f32>;

// Returns (mean, rstd) of the row after writing y = (x - mean) * rstd * w + b. The sums are
// taken of x - x[0] (the shifted-data algorithm): values near the row's first one subtract
// exactly, so a mean far from zero adds no rounding to the centred values. Centring on the f32
// mean instead left its rounding in every y (NMSE 1.1e-10 at 3x1000 around 300 on an NVIDIA H200).
fn layer_norm_row(row: u32, lid: u32) -> vec2f {
  let base = row * p.d;
  let shift = x[base];
  var sum = 0.0;
  for (var j = lid; j < p.d; j += WG) { sum += x[base + j] - shift; }
  let offset = workgroup_sum(sum, lid) / f32(p.d);
  var sq = 0.0;
  for (var j = lid; j < p.d; j += WG) {
    let c = (x[base + j] - shift) - offset;
    sq += c * c;
  }
  let rstd = 1.0 / sqrt(workgroup_sum(sq, lid) / f32(p.d) + p.eps);
  for (var j = lid; j < p.d; j += WG) {
    y[base + j] = ((x[base + j] - shift) - offset) * rstd * weight[j] + bias[j];
  }
  return vec2f(shift + offset, rstd);
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

@compute @workgroup_size(WG)
fn norm_backward(
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let row = row_of(wid, nwg);
  if (row >= p.rows) { return; }
  let base = row * p.d;
  let centred = (p.flags & LAYER_NORM) != 0u;
  var m = 0.0;
  if (centred) { m = saved_mean[row]; }
  let s = saved_rstd[row];
  var sum_g = 0.0;
  var sum_gx = 0.0;
  for (var j = lid; j < p.d; j += WG) {
    let g = dy[base + j] * weight[j];
    sum_g += g;
    sum_gx += g * ((x[base + j] - m) * s);
  }
  let n = f32(p.d);
  var mean_g = 0.0;
  if (centred) { mean_g = workgroup_sum(sum_g, lid) / n; }
  let mean_gx = workgroup_sum(sum_gx, lid) / n;
  let accumulate = (p.flags & ACCUMULATE) != 0u;
  for (var j = lid; j < p.d; j += WG) {
    let g = dy[base + j] * weight[j];
    let xhat = (x[base + j] - m) * s;
    var v = s * (g - mean_g - xhat * mean_gx);
    if (accumulate) { v += dx[base + j]; }
    dx[base + j] = v;
  }
}

// Invocation (column j, chunk) sums dy * xhat over the chunk's rows.
@compute @workgroup_size(COLUMN_WG)
fn norm_weight_grad_partial(@builtin(global_invocation_id) gid: vec3u) {
  let j = gid.x;
  let chunk = gid.y;
  if (j >= p.d) { return; }
  let centred = (p.flags & LAYER_NORM) != 0u;
  let first = chunk * p.chunk_rows;
  let end = min(first + p.chunk_rows, p.rows);
  var dw = 0.0;
  for (var r = first; r < end; r++) {
    var m = 0.0;
    if (centred) { m = saved_mean[r]; }
    dw += dy[r * p.d + j] * ((x[r * p.d + j] - m) * saved_rstd[r]);
  }
  partial[chunk * p.d + j] = dw;
}
