// Pointwise activations on f32, one invocation per element (the grid wraps x into y), and
// their backward entries (*_backward): dx = dy * f'(x), from the forward's input x.
//
// erf/erfc are the single-precision rational approximations of fdlibm's s_erff.c
// (float conversion by Ian Lance Taylor, Cygnus Support), whose notice follows:
// ====================================================
// Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
//
// Developed at SunPro, a Sun Microsystems, Inc. business.
// Permission to use, copy, modify, and distribute this
// software is freely granted, provided that this notice
// is preserved.
// ====================================================

struct Params {
  n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// Backward only: the gradient of the output, and swiglu's second gradient (d up).
@group(0) @binding(4) var<storage, read> grad: array<f32>;
@group(0) @binding(5) var<storage, read_write> out2: array<f32>;

override WG: u32 = 256u;

// fdlibm's erx: a short-mantissa constant near erf(1); erf = ERX + P/Q on [0.84375, 1.25),
// and 1 - ERX is exact in f32.
const ERX: f32 = 8.4506291151e-01;

fn index(gid: vec3u, nwg: vec3u) -> u32 {
  return gid.x + gid.y * nwg.x * WG;
}

// exp(-|x|) never overflows, whereas exp(-x) for x = -100 would (and WGSL leaves the
// value of an overflowing exp undefined).
// (sigmoid(x), sigmoid(-x)), each accurate on its own (1 - sigmoid(x) would cancel).
fn sigmoid_pair(x: f32) -> vec2f {
  let e = exp(-abs(x));
  let r = 1.0 / (1.0 + e);
  return select(vec2f(e * r, r), vec2f(r, e * r), x >= 0.0);
}

fn sigmoid(x: f32) -> f32 {
  return sigmoid_pair(x).x;
}

fn silu_f(x: f32) -> f32 {
  return x * sigmoid(x);
}

// d/dx x sigmoid(x) = sigmoid(x) (1 + x sigmoid(-x)).
fn silu_grad(x: f32) -> f32 {
  let s = sigmoid_pair(x);
  return s.x * (1.0 + x * s.y);
}

// (erf(a), erfc(a)) for a >= 0, each to about an ulp in absolute terms; erfc is also
// accurate relative to itself in the tail, which GELU's negative side needs.
fn erf_erfc_nonneg(a: f32) -> vec2f {
  if (a < 0.84375) {
    let z = a * a;
    let r = 1.2837916613e-01 + z * (-3.2504209876e-01 + z * (-2.8481749818e-02 +
      z * (-5.7702702470e-03 + z * -2.3763017452e-05)));
    let s = 1.0 + z * (3.9791721106e-01 + z * (6.5022252500e-02 + z * (5.0813062117e-03 +
      z * (1.3249473704e-04 + z * -3.9602282413e-06))));
    let e = a + a * (r / s);
    return vec2f(e, 1.0 - e);
  }
  if (a < 1.25) {
    let s = a - 1.0;
    let pp = -2.3621185683e-03 + s * (4.1485610604e-01 + s * (-3.7220788002e-01 +
      s * (3.1834661961e-01 + s * (-1.1089469492e-01 + s * (3.5478305072e-02 +
      s * -2.1663755178e-03)))));
    let qq = 1.0 + s * (1.0642088205e-01 + s * (5.4039794207e-01 + s * (7.1828655899e-02 +
      s * (1.2617121637e-01 + s * (1.3637083583e-02 + s * 1.1984500103e-02)))));
    let pq = pp / qq;
    return vec2f(ERX + pq, (1.0 - ERX) - pq);
  }
  // erfc(10) ~ 2e-45 is below the f32 range.
  if (a >= 10.0) {
    return vec2f(1.0, 0.0);
  }
  let s = 1.0 / (a * a);
  var rr: f32;
  var ss: f32;
  if (a < 2.857142857) {
    rr = -9.8649440333e-03 + s * (-6.9385856390e-01 + s * (-1.0558626175e+01 +
      s * (-6.2375331879e+01 + s * (-1.6239666748e+02 + s * (-1.8460508728e+02 +
      s * (-8.1287437439e+01 + s * -9.8143291473e+00))))));
    ss = 1.0 + s * (1.9651271820e+01 + s * (1.3765776062e+02 + s * (4.3456588745e+02 +
      s * (6.4538726807e+02 + s * (4.2900814819e+02 + s * (1.0863500214e+02 +
      s * (6.5702495575e+00 + s * -6.0424413532e-02)))))));
  } else {
    rr = -9.8649431020e-03 + s * (-7.9928326607e-01 + s * (-1.7757955551e+01 +
      s * (-1.6063638306e+02 + s * (-6.3756646729e+02 + s * (-1.0250950928e+03 +
      s * -4.8351919556e+02)))));
    ss = 1.0 + s * (3.0338060379e+01 + s * (3.2579251099e+02 + s * (1.5367296143e+03 +
      s * (3.1998581543e+03 + s * (2.5530502930e+03 + s * (4.7452853394e+02 +
      s * -2.2440952301e+01))))));
  }
  // exp(-a^2) split as exp(-z^2) * exp((z - a)(z + a)) with z = a cut to 12 mantissa
  // bits, so z^2 is exact and the rounding of a^2 does not enter the exponent.
  let z = bitcast<f32>(bitcast<u32>(a) & 0xfffff000u);
  let c = exp(-z * z - 0.5625) * exp((z - a) * (z + a) + rr / ss) / a;
  return vec2f(1.0 - c, c);
}

fn erf_f(x: f32) -> f32 {
  let e = erf_erfc_nonneg(abs(x)).x;
  return select(e, -e, x < 0.0);
}

// The standard normal CDF, 0.5 (1 + erf(x / sqrt 2)); for x < 0, 1 + erf(u) = erfc(|u|)
// avoids the cancellation.
fn normal_cdf(x: f32) -> f32 {
  let u = x * 0.70710678118654752;
  let parts = erf_erfc_nonneg(abs(u));
  return 0.5 * select(1.0 + parts.x, parts.y, u < 0.0);
}

fn gelu_f(x: f32) -> f32 {
  return x * normal_cdf(x);
}

// d/dx x Phi(x) = Phi(x) + x phi(x), phi the standard normal density.
fn gelu_grad(x: f32) -> f32 {
  return normal_cdf(x) + x * 0.39894228040143268 * exp(-0.5 * x * x);
}

fn quick_gelu_f(x: f32) -> f32 {
  return x * sigmoid(1.702 * x);
}

// d/dx x sigmoid(k x) = silu'(k x) with k = 1.702.
fn quick_gelu_grad(x: f32) -> f32 {
  return silu_grad(1.702 * x);
}

@compute @workgroup_size(WG)
fn silu(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = silu_f(a[i]); }
}

@compute @workgroup_size(WG)
fn gelu(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = gelu_f(a[i]); }
}

@compute @workgroup_size(WG)
fn quick_gelu(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = quick_gelu_f(a[i]); }
}

@compute @workgroup_size(WG)
fn erf(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = erf_f(a[i]); }
}

// silu(gate) * up, the Qwen3 MLP's gated activation.
@compute @workgroup_size(WG)
fn swiglu(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = silu_f(a[i]) * b[i]; }
}

@compute @workgroup_size(WG)
fn silu_backward(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = grad[i] * silu_grad(a[i]); }
}

@compute @workgroup_size(WG)
fn gelu_backward(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = grad[i] * gelu_grad(a[i]); }
}

@compute @workgroup_size(WG)
fn quick_gelu_backward(
  @builtin(global_invocation_id) gid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
) {
  let i = index(gid, nwg);
  if (i < p.n) { out[i] = grad[i] * quick_gelu_grad(a[i]); }
}

// d gate = d out * up * silu'(gate) into out, d up = d out * silu(gate) into out2.
@compute @workgroup_size(WG)
fn swiglu_backward(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = index(gid, nwg);
  if (i < p.n) {
    let g = a[i];
    out[i] = grad[i] * b[i] * silu_grad(g);
    out2[i] = grad[i] * silu_f(g);
  }
}
