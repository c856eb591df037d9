// Row softmax over the last axis of scores [batch, heads, Tq, Tk], one workgroup per row
// (the workgroup reductions of workgroup_reduce.wgsl fill the marker below). A key is visible when the causal rule
// (j <= i + offset) and the key-padding mask both allow it; hidden keys get probability 0,
// and a row with no visible key is all zeros (the max stays at -FLT_MAX, no exp is summed,
// and every entry is hidden), where torch's -inf masking would give NaN.
//
// softmax_backward: d scores = scale * P * (dP - sum_j dP_j P_j) per row. Hidden keys have
// P = 0, so they get a zero gradient without the masks.

$WORKGROUP_REDUCE

struct Params {
  rows: u32,
  heads: u32,
  tq: u32,
  tk: u32,
  scale: f32,
  flags: u32,
  causal_offset: i32,
}

const CAUSAL: u32 = 1u;
// key_mask holds [batch, Tk] flags, nonzero = visible.
const KEY_MASK: u32 = 2u;
// key_mask holds [batch] lengths: keys j < length are visible.
const KEY_LENGTHS: u32 = 4u;
const LOWEST: f32 = -3.40282347e38;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
// Without a mask any read-only buffer is bound here; it is then never read.
@group(0) @binding(2) var<storage, read> key_mask: array<i32>;
@group(0) @binding(3) var<storage, read_write> probs: array<f32>;
// Backward only: the forward's probabilities, their gradient and the scores' gradient.
@group(0) @binding(4) var<storage, read> saved_probs: array<f32>;
@group(0) @binding(5) var<storage, read> d_probs: array<f32>;
@group(0) @binding(6) var<storage, read_write> d_scores: array<f32>;

fn visible(batch: u32, query: u32, key: u32) -> bool {
  if ((p.flags & CAUSAL) != 0u && i32(key) > i32(query) + p.causal_offset) { return false; }
  if ((p.flags & KEY_MASK) != 0u && key_mask[batch * p.tk + key] == 0) { return false; }
  if ((p.flags & KEY_LENGTHS) != 0u && i32(key) >= key_mask[batch]) { return false; }
  return true;
}

@compute @workgroup_size(WG)
fn softmax(
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let row = row_of(wid, nwg);
  if (row >= p.rows) { return; }
  let batch = row / (p.heads * p.tq);
  let query = row % p.tq;
  let base = row * p.tk;

  var m = LOWEST;
  for (var j = lid; j < p.tk; j += WG) {
    if (visible(batch, query, j)) { m = max(m, scores[base + j] * p.scale); }
  }
  m = workgroup_max(m, lid);

  var sum = 0.0;
  for (var j = lid; j < p.tk; j += WG) {
    if (visible(batch, query, j)) { sum += exp(scores[base + j] * p.scale - m); }
  }
  sum = workgroup_sum(sum, lid);

  for (var j = lid; j < p.tk; j += WG) {
    var prob = 0.0;
    if (visible(batch, query, j)) { prob = exp(scores[base + j] * p.scale - m) / sum; }
    probs[base + j] = prob;
  }
}

@compute @workgroup_size(WG)
fn softmax_backward(
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let row = row_of(wid, nwg);
  if (row >= p.rows) { return; }
  let base = row * p.tk;
  var row_dot = 0.0;
  for (var j = lid; j < p.tk; j += WG) { row_dot += d_probs[base + j] * saved_probs[base + j]; }
  row_dot = workgroup_sum(row_dot, lid);
  for (var j = lid; j < p.tk; j += WG) {
    d_scores[base + j] = p.scale * saved_probs[base + j] * (d_probs[base + j] - row_dot);
  }
}
