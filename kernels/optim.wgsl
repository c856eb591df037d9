// Loss, gradient norms and the AdamW update (SPEC section 5). The marker below
// takes workgroup_reduce.wgsl (`workgroup_sum`, WG).
//
// Reductions are deterministic: a fixed number of workgroups walks the array in a fixed
// strided order and each writes one partial sum (no atomics), so a result depends only on
// the data and its length, never on scheduling. The partials are then summed by one
// workgroup (`sum_partials`) or on the host.

$WORKGROUP_REDUCE

// One struct and distinct binding numbers for all entry points: WGSL forbids two resource
// variables at the same binding. Reductions only set the first three fields.
struct Params {
  n: u32,
  // Where this dispatch's partial sums start in `partials` (several tensors share it).
  partial_offset: u32,
  // mse_partials: d loss / d pred = (pred - target) * scale; sum_partials: result scale.
  scale: f32,
  // AdamW: 1 - lr * weight_decay
  decay: f32,
  one_minus_beta1: f32,
  beta2: f32,
  one_minus_beta2: f32,
  // lr / (1 - beta1^step)
  step_size: f32,
  // sqrt(1 - beta2^step)
  bias_correction2_sqrt: f32,
  eps: f32,
  // Gradient clipping coefficient (1 = no clipping).
  clip: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> target_values: array<f32>;
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad_out: array<f32>;

// `$ELEM` is f32, or vec4f for tensors whose length is a multiple of 4 (p.n then counts vec4s):
// on CPU adapters every storage access is a loop over the SIMD lanes and a vec4 access costs about
// what a scalar one does, so the vec4 variant makes a quarter of them. src/train/optim.ts picks.
@group(0) @binding(12) var<storage, read> squared: array<$ELEM>;

fn sum_of_squares(v: $ELEM) -> f32 {
$SUM_OF_SQUARES
}

// Partial sums of x^2 (of `squared`), one per workgroup.
@compute @workgroup_size(WG)
fn square_sum_partials(
  @builtin(local_invocation_index) lid: u32,
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
) {
  var acc = 0.0;
  for (var i = wid.x * WG + lid; i < p.n; i += nwg.x * WG) {
    acc += sum_of_squares(squared[i]);
  }
  let total = workgroup_sum(acc, lid);
  if (lid == 0u) { partials[p.partial_offset + wid.x] = total; }
}

// MSE forward and backward in one pass: partial sums of (pred - target)^2 and the gradient.
@compute @workgroup_size(WG)
fn mse_partials(
  @builtin(local_invocation_index) lid: u32,
  @builtin(workgroup_id) wid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
) {
  var acc = 0.0;
  for (var i = wid.x * WG + lid; i < p.n; i += nwg.x * WG) {
    let d = x[i] - target_values[i];
    grad_out[i] = d * p.scale;
    acc += d * d;
  }
  let total = workgroup_sum(acc, lid);
  if (lid == 0u) { partials[p.partial_offset + wid.x] = total; }
}

// One workgroup: grad_out[0] = scale * sum(partials[0..n)), e.g. the mean for a loss.
@compute @workgroup_size(WG)
fn sum_partials(@builtin(local_invocation_index) lid: u32) {
  var acc = 0.0;
  for (var i = lid; i < p.n; i += WG) { acc += partials[i]; }
  let total = workgroup_sum(acc, lid);
  if (lid == 0u) { grad_out[0] = total * p.scale; }
}

@group(0) @binding(5) var<storage, read_write> param: array<$ELEM>;
@group(0) @binding(6) var<storage, read> grad: array<$ELEM>;
@group(0) @binding(7) var<storage, read_write> exp_avg: array<$ELEM>;
@group(0) @binding(8) var<storage, read_write> exp_avg_sq: array<$ELEM>;

// torch.optim.AdamW's `_single_tensor_adam` (decoupled_weight_decay=True), element by element,
// after clip_grad_norm_'s `grad.mul_(clip_coef)`:
//   param.mul_(1 - lr * weight_decay)
//   exp_avg.lerp_(grad, 1 - beta1)            lerp with weight < 0.5: a + w * (b - a)
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//   denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//   param.addcdiv_(exp_avg, denom, value=-step_size)
// The vec4 variant does the same f32 operations on each element, so it gives the same bits.
@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * WG;
  if (i >= p.n) { return; }
  let g = grad[i] * p.clip;
  let m = exp_avg[i] + p.one_minus_beta1 * (g - exp_avg[i]);
  let v = exp_avg_sq[i] * p.beta2 + p.one_minus_beta2 * (g * g);
  let denom = sqrt(v) / p.bias_correction2_sqrt + p.eps;
  param[i] = param[i] * p.decay - p.step_size * (m / denom);
  exp_avg[i] = m;
  exp_avg_sq[i] = v;
}
