// Multi-head scaled dot-product attention, flash style (online softmax, f32 throughout).
//
// q [B, Tq, nq*hd], k and v [B, Tk, nkv*hd], out like q; head h of q reads KV head
// h / (nq / nkv). One workgroup per (query block of BQ rows, head, batch): BQ rows x LANES
// lanes. Each key tile is staged in workgroup memory twice (K, then V in the same array);
// the running max m and sum l of every row stay in registers, so the [Tq, Tk] score matrix
// never exists. lse = m + log(l) is kept per row for a backward pass.
//
// Masked keys are skipped, not given -inf scores: WGSL does not promise IEEE infinities, so
// every value here stays finite. A row with no visible key gets zeros and lse = EMPTY_LSE.

struct Params {
  tq: u32,
  tk: u32,
  nq: u32,
  nkv: u32,
  scale: f32,
  causal: u32,
  // 0: every key visible; 1: key_valid holds per-batch lengths [B] and key j is visible when
  // j < length or j >= visible_from; 2: key_valid is a mask [B, Tk], nonzero = visible.
  mask_mode: u32,
  visible_from: u32,
  hd: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> key_valid: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

// Keys per tile; the host lowers it when workgroup memory is small.
override BK: u32 = 16u;
const BQ: u32 = 16u;
const LANES: u32 = 8u;
const WG: u32 = 128u; // BQ * LANES
// Output features per lane: lane owns d = lane, lane + LANES, ..., so hd <= LANES * DIMS.
const DIMS: u32 = 16u;
const HD_MAX: u32 = 128u; // LANES * DIMS
const MASKED: f32 = -3.4028235e38;
const EMPTY_LSE: f32 = 3.4028235e38;

var<workgroup> q_tile: array<f32, BQ * HD_MAX>;
// Staged key rows are hd + 1 apart: the 8 lanes of a row read 8 different keys at the same
// d, and the padding word keeps them off a single memory bank.
var<workgroup> kv_tile: array<f32, BK * (HD_MAX + 1u)>;
var<workgroup> scores: array<f32, BQ * BK>;

fn key_visible(b: u32, j: u32) -> bool {
  switch p.mask_mode {
    case 1u: {
      return j < key_valid[b] || j >= p.visible_from;
    }
    case 2u: {
      return key_valid[b * p.tk + j] != 0u;
    }
    default: {
      return true;
    }
  }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) t: u32) {
  let b = wid.z;
  let h = wid.y;
  let q0 = wid.x * BQ;
  let kvh = h / (p.nq / p.nkv);
  let row = t / LANES;
  let lane = t % LANES;
  let i = q0 + row;
  let hd = p.hd;
  let kv_row = hd + 1u;
  let q_stride = p.nq * hd;
  let kv_stride = p.nkv * hd;
  let q_base = b * p.tq * q_stride + h * hd;
  let kv_base = b * p.tk * kv_stride + kvh * hd;

  // The scale is folded into q so scores come out scaled.
  for (var e = t; e < BQ * hd; e += WG) {
    let qi = q0 + e / hd;
    var x = 0.0;
    if (qi < p.tq) {
      x = q[q_base + qi * q_stride + e % hd] * p.scale;
    }
    q_tile[e] = x;
  }

  var m = MASKED;
  var l = 0.0;
  var acc: array<f32, DIMS>;
  // Under the causal mask no row of this block sees a key past its last row.
  var k_end = p.tk;
  if (p.causal != 0u) {
    k_end = min(p.tk, q0 + BQ);
  }
  for (var k0 = 0u; k0 < k_end; k0 += BK) {
    workgroupBarrier();
    for (var e = t; e < BK * hd; e += WG) {
      let j = k0 + e / hd;
      var x = 0.0;
      if (j < p.tk) {
        x = k[kv_base + j * kv_stride + e % hd];
      }
      kv_tile[(e / hd) * kv_row + e % hd] = x;
    }
    workgroupBarrier();
    for (var c = lane; c < BK; c += LANES) {
      let j = k0 + c;
      var s = MASKED;
      if (j < p.tk && (p.causal == 0u || j <= i) && key_visible(b, j)) {
        s = 0.0;
        for (var d = 0u; d < hd; d++) {
          s += q_tile[row * hd + d] * kv_tile[c * kv_row + d];
        }
      }
      scores[row * BK + c] = s;
    }
    workgroupBarrier();
    for (var e = t; e < BK * hd; e += WG) {
      let j = k0 + e / hd;
      var x = 0.0;
      if (j < p.tk) {
        x = v[kv_base + j * kv_stride + e % hd];
      }
      kv_tile[(e / hd) * kv_row + e % hd] = x;
    }
    workgroupBarrier();

    var m_new = m;
    for (var c = 0u; c < BK; c++) {
      m_new = max(m_new, scores[row * BK + c]);
    }
    // Both finite: exp(MASKED - real max) underflows to 0, exp(0) = 1 while nothing is seen.
    let alpha = exp(m - m_new);
    l *= alpha;
    for (var x = 0u; x < DIMS; x++) {
      acc[x] *= alpha;
    }
    for (var c = 0u; c < BK; c++) {
      let s = scores[row * BK + c];
      if (s != MASKED) {
        let pc = exp(s - m_new);
        l += pc;
        for (var x = 0u; x < DIMS; x++) {
          let d = lane + x * LANES;
          if (d < hd) {
            acc[x] += pc * kv_tile[c * kv_row + d];
          }
        }
      }
    }
    m = m_new;
  }

  if (i >= p.tq) {
    return;
  }
  var inv_l = 0.0;
  var row_lse = EMPTY_LSE;
  if (l > 0.0) {
    inv_l = 1.0 / l;
    row_lse = m + log(l);
  }
  let o_base = q_base + i * q_stride;
  for (var x = 0u; x < DIMS; x++) {
    let d = lane + x * LANES;
    if (d < hd) {
      out[o_base + d] = acc[x] * inv_l;
    }
  }
  if (lane == 0u) {
    lse[(b * p.nq + h) * p.tq + i] = row_lse;
  }
}
