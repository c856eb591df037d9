// Multi-head scaled dot-product attention, flash style (online softmax, f32 throughout).
//
// q [B, Tq, nq*hd], k and v [B, Tk, nkv*hd], out like q, all read as vec4 (hd is a multiple
// of 4, at most 128); head h of q reads KV head h / (nq / nkv). One workgroup per (block of
// BQ query rows, head, batch), LANES invocations per row. Keys go by in tiles of BK: each lane
// scores 4 keys of the tile, the row's lanes share their scores through workgroup memory, and
// each lane then accumulates its share of the output features (vec4 indices lane,
// lane + LANES, ...). The running max m and sum l of every row stay in registers, so the
// [Tq, Tk] score matrix never exists; lse = m + log(l) is kept per row for a backward pass.
//
// K and V are read straight from storage (cached) rather than staged in workgroup memory:
// WGSL zero-initialises workgroup arrays, and naga's GL backend does that with one array
// constructor that llvmpipe takes minutes to compile once the arrays hold a few thousand
// floats.
//
// Masked keys get probability 0 through a MASKED sentinel score instead of -inf (WGSL does
// not promise IEEE infinities, so every value stays finite). A row with no visible key gets
// zeros and lse = EMPTY_LSE.

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
  // head_dim / 4
  hd4: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4f>;
@group(0) @binding(2) var<storage, read> k: array<vec4f>;
@group(0) @binding(3) var<storage, read> v: array<vec4f>;
@group(0) @binding(4) var<storage, read> key_valid: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4f>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

const BQ: u32 = 16u;
const LANES: u32 = 8u;
const WG: u32 = 128u; // BQ * LANES
const BK: u32 = 32u; // LANES * 4 keys
const TILE4: u32 = 8u; // BK / 4
const MASKED: f32 = -3.4028235e38;
const EMPTY_LSE: f32 = 3.4028235e38;

// Scores of the current tile, one vec4 (4 keys) per lane, then their exponentials (a second
// array, so writing them needs no barrier after the max is read).
var<workgroup> scores: array<vec4f, BQ * TILE4>;
var<workgroup> probs: array<vec4f, BQ * TILE4>;

fn key_visible(b: u32, i: u32, j: u32) -> bool {
  if (j >= p.tk || (p.causal != 0u && j > i)) {
    return false;
  }
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

fn max4(x: vec4f) -> f32 {
  return max(max(x.x, x.y), max(x.z, x.w));
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
  let hd4 = p.hd4;
  let q_stride = p.nq * hd4;
  let kv_stride = p.nkv * hd4;
  // Rows past Tq in the last block compute on row Tq - 1 and write nothing.
  let q_row = (b * p.tq + min(i, p.tq - 1u)) * q_stride + h * hd4;
  let kv_base = b * p.tk * kv_stride + kvh * hd4;

  var m = MASKED;
  var l = 0.0;
  var acc0 = vec4f(0.0);
  var acc1 = vec4f(0.0);
  var acc2 = vec4f(0.0);
  var acc3 = vec4f(0.0);
  // Under the causal mask no row of this block sees a key past its last row.
  var k_end = p.tk;
  if (p.causal != 0u) {
    k_end = min(p.tk, q0 + BQ);
  }
  for (var k0 = 0u; k0 < k_end; k0 += BK) {
    // This lane's keys j0 .. j0 + 3; those past Tk read key Tk - 1 and are masked.
    let j0 = k0 + 4u * lane;
    let r0 = kv_base + min(j0, p.tk - 1u) * kv_stride;
    let r1 = kv_base + min(j0 + 1u, p.tk - 1u) * kv_stride;
    let r2 = kv_base + min(j0 + 2u, p.tk - 1u) * kv_stride;
    let r3 = kv_base + min(j0 + 3u, p.tk - 1u) * kv_stride;
    var dots = vec4f(0.0);
    for (var d = 0u; d < hd4; d++) {
      let qd = q[q_row + d];
      dots += vec4f(dot(qd, k[r0 + d]), dot(qd, k[r1 + d]), dot(qd, k[r2 + d]), dot(qd, k[r3 + d]));
    }
    let visible = vec4<bool>(
      key_visible(b, i, j0),
      key_visible(b, i, j0 + 1u),
      key_visible(b, i, j0 + 2u),
      key_visible(b, i, j0 + 3u),
    );
    let s = select(vec4f(MASKED), dots * p.scale, visible);
    scores[row * TILE4 + lane] = s;
    workgroupBarrier();

    var m_new = m;
    for (var c = 0u; c < TILE4; c++) {
      m_new = max(m_new, max4(scores[row * TILE4 + c]));
    }
    // Both finite: exp(MASKED - real max) underflows to 0, exp(0) = 1 while nothing is seen.
    probs[row * TILE4 + lane] = select(vec4f(0.0), exp(s - m_new), visible);
    workgroupBarrier();

    let alpha = exp(m - m_new);
    l *= alpha;
    acc0 *= alpha;
    acc1 *= alpha;
    acc2 *= alpha;
    acc3 *= alpha;
    let tile_keys = min(BK, p.tk - k0);
    for (var c = 0u; c < tile_keys; c++) {
      let pc = probs[row * TILE4 + c / 4u][c % 4u];
      l += pc;
      let v_row = kv_base + (k0 + c) * kv_stride;
      if (lane < hd4) {
        acc0 += pc * v[v_row + lane];
      }
      if (lane + LANES < hd4) {
        acc1 += pc * v[v_row + lane + LANES];
      }
      if (lane + 2u * LANES < hd4) {
        acc2 += pc * v[v_row + lane + 2u * LANES];
      }
      if (lane + 3u * LANES < hd4) {
        acc3 += pc * v[v_row + lane + 3u * LANES];
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
  let o_row = (b * p.tq + i) * q_stride + h * hd4;
  if (lane < hd4) {
    out[o_row + lane] = acc0 * inv_l;
  }
  if (lane + LANES < hd4) {
    out[o_row + lane + LANES] = acc1 * inv_l;
  }
  if (lane + 2u * LANES < hd4) {
    out[o_row + lane + 2u * LANES] = acc2 * inv_l;
  }
  if (lane + 3u * LANES < hd4) {
    out[o_row + lane + 3u * LANES] = acc3 * inv_l;
  }
  if (lane == 0u) {
    lse[(b * p.nq + h) * p.tq + i] = row_lse;
  }
}
