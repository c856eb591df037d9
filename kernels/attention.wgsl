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

// ---- Backward (flash-attention-2 style): P = exp(scale * q.k - lse) is recomputed from the
// forward's lse, dP = dO v^T, dS = P * (dP - D) with D = rowsum(dO * O), and
// dq = scale * dS k, dk = scale * dS^T q, dv = P^T dO. Three passes, each writing every
// element it owns once, so the result is deterministic (no atomics):
//   attention_backward_stats  (lse, D) per query row;
//   attention_backward_dq     per (query block, head, batch), like the forward;
//   attention_backward_dkv    per (key block, KV head, batch): BQ key rows, the queries of
//                             every head of the group go by in tiles of BK (roles swapped).
// Rows with no visible key have lse = EMPTY_LSE and O = 0, so P = 0 and they add nothing.
// `out` and `lse` are read through the forward's writable declarations; `stats` is written by
// the first pass and read by the other two.

@group(0) @binding(7) var<storage, read> dout: array<vec4f>;
// (lse, D) per row [B, nq, Tq]: one binding for both keeps every pass within 8 storage buffers.
@group(0) @binding(8) var<storage, read_write> stats: array<vec2f>;
@group(0) @binding(9) var<storage, read_write> dq: array<vec4f>;
@group(0) @binding(10) var<storage, read_write> dk: array<vec4f>;
@group(0) @binding(11) var<storage, read_write> dv: array<vec4f>;

// dS of the current tile (and P, in attention_backward_dkv), one vec4 per lane.
var<workgroup> dscores: array<vec4f, BQ * TILE4>;

const STATS_WG: u32 = 64u;

// One invocation per query row; grid [ceil(Tq / STATS_WG), nq, B].
@compute @workgroup_size(STATS_WG)
fn attention_backward_stats(@builtin(global_invocation_id) gid: vec3u) {
  let i = gid.x;
  if (i >= p.tq) {
    return;
  }
  let h = gid.y;
  let b = gid.z;
  let row = (b * p.nq + h) * p.tq + i;
  let o_row = (b * p.tq + i) * p.nq * p.hd4 + h * p.hd4;
  var d_acc = 0.0;
  for (var d = 0u; d < p.hd4; d++) {
    d_acc += dot(dout[o_row + d], out[o_row + d]);
  }
  stats[row] = vec2f(lse[row], d_acc);
}

// (P, dS) of query i < Tq against key j (masked past Tk), from the dot products q.k and dO.v.
fn grad_score(b: u32, h: u32, i: u32, j: u32, qk: f32, dov: f32) -> vec2f {
  let st = stats[(b * p.nq + h) * p.tq + i];
  let prob = exp(select(MASKED, qk * p.scale - st.x, key_visible(b, i, j)));
  return vec2f(prob, prob * (dov - st.y));
}

@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) t: u32) {
  let b = wid.z;
  let h = wid.y;
  let q0 = wid.x * BQ;
  let kvh = h / (p.nq / p.nkv);
  let row = t / LANES;
  let lane = t % LANES;
  let hd4 = p.hd4;
  let kv_stride = p.nkv * hd4;
  // Rows past Tq in the last block compute on row Tq - 1 and write nothing.
  let i = min(q0 + row, p.tq - 1u);
  let q_row = (b * p.tq + i) * p.nq * hd4 + h * hd4;
  let kv_base = b * p.tk * kv_stride + kvh * hd4;

  var acc0 = vec4f(0.0);
  var acc1 = vec4f(0.0);
  var acc2 = vec4f(0.0);
  var acc3 = vec4f(0.0);
  var k_end = p.tk;
  if (p.causal != 0u) {
    k_end = min(p.tk, q0 + BQ);
  }
  for (var k0 = 0u; k0 < k_end; k0 += BK) {
    // This lane's keys j0 .. j0 + 3; those past Tk read key Tk - 1 and are masked.
    let j = vec4u(k0 + 4u * lane) + vec4u(0u, 1u, 2u, 3u);
    let r = vec4u(kv_base) + min(j, vec4u(p.tk - 1u)) * kv_stride;
    var qk = vec4f(0.0);
    var dov = vec4f(0.0);
    for (var d = 0u; d < hd4; d++) {
      let qd = q[q_row + d];
      let od = dout[q_row + d];
      qk += vec4f(dot(qd, k[r.x + d]), dot(qd, k[r.y + d]), dot(qd, k[r.z + d]), dot(qd, k[r.w + d]));
      dov += vec4f(dot(od, v[r.x + d]), dot(od, v[r.y + d]), dot(od, v[r.z + d]), dot(od, v[r.w + d]));
    }
    dscores[row * TILE4 + lane] = vec4f(
      grad_score(b, h, i, j.x, qk.x, dov.x).y,
      grad_score(b, h, i, j.y, qk.y, dov.y).y,
      grad_score(b, h, i, j.z, qk.z, dov.z).y,
      grad_score(b, h, i, j.w, qk.w, dov.w).y,
    );
    workgroupBarrier();

    let tile_keys = min(BK, p.tk - k0);
    for (var c = 0u; c < tile_keys; c++) {
      let ds = dscores[row * TILE4 + c / 4u][c % 4u];
      let k_row = kv_base + (k0 + c) * kv_stride;
      if (lane < hd4) {
        acc0 += ds * k[k_row + lane];
      }
      if (lane + LANES < hd4) {
        acc1 += ds * k[k_row + lane + LANES];
      }
      if (lane + 2u * LANES < hd4) {
        acc2 += ds * k[k_row + lane + 2u * LANES];
      }
      if (lane + 3u * LANES < hd4) {
        acc3 += ds * k[k_row + lane + 3u * LANES];
      }
    }
    // The next tile overwrites dscores.
    workgroupBarrier();
  }

  if (q0 + row >= p.tq) {
    return;
  }
  if (lane < hd4) {
    dq[q_row + lane] = acc0 * p.scale;
  }
  if (lane + LANES < hd4) {
    dq[q_row + lane + LANES] = acc1 * p.scale;
  }
  if (lane + 2u * LANES < hd4) {
    dq[q_row + lane + 2u * LANES] = acc2 * p.scale;
  }
  if (lane + 3u * LANES < hd4) {
    dq[q_row + lane + 3u * LANES] = acc3 * p.scale;
  }
}

@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) t: u32) {
  let b = wid.z;
  let kvh = wid.y;
  let k0 = wid.x * BQ;
  let group = p.nq / p.nkv;
  let row = t / LANES;
  let lane = t % LANES;
  let hd4 = p.hd4;
  let q_stride = p.nq * hd4;
  // Rows past Tk in the last block compute on key Tk - 1 and write nothing.
  let j = min(k0 + row, p.tk - 1u);
  let kv_row = (b * p.tk + j) * p.nkv * hd4 + kvh * hd4;

  var dk0 = vec4f(0.0);
  var dk1 = vec4f(0.0);
  var dk2 = vec4f(0.0);
  var dk3 = vec4f(0.0);
  var dv0 = vec4f(0.0);
  var dv1 = vec4f(0.0);
  var dv2 = vec4f(0.0);
  var dv3 = vec4f(0.0);
  // Under the causal mask no query before this block's first key sees any of its keys.
  var i_start = 0u;
  if (p.causal != 0u) {
    i_start = k0;
  }
  for (var h = kvh * group; h < (kvh + 1u) * group; h++) {
    let q_base = b * p.tq * q_stride + h * hd4;
    for (var i0 = i_start; i0 < p.tq; i0 += BK) {
      // This lane's queries i .. i + 3; those past Tq read query Tq - 1 and are masked.
      let i = vec4u(i0 + 4u * lane) + vec4u(0u, 1u, 2u, 3u);
      let r = vec4u(q_base) + min(i, vec4u(p.tq - 1u)) * q_stride;
      var qk = vec4f(0.0);
      var dov = vec4f(0.0);
      for (var d = 0u; d < hd4; d++) {
        let kd = k[kv_row + d];
        let vd = v[kv_row + d];
        qk += vec4f(dot(kd, q[r.x + d]), dot(kd, q[r.y + d]), dot(kd, q[r.z + d]), dot(kd, q[r.w + d]));
        dov += vec4f(
          dot(vd, dout[r.x + d]),
          dot(vd, dout[r.y + d]),
          dot(vd, dout[r.z + d]),
          dot(vd, dout[r.w + d]),
        );
      }
      var prob = vec4f(0.0);
      var ds = vec4f(0.0);
      for (var c = 0u; c < 4u; c++) {
        if (i[c] < p.tq) {
          let g = grad_score(b, h, i[c], j, qk[c], dov[c]);
          prob[c] = g.x;
          ds[c] = g.y;
        }
      }
      probs[row * TILE4 + lane] = prob;
      dscores[row * TILE4 + lane] = ds;
      workgroupBarrier();

      let tile_queries = min(BK, p.tq - i0);
      for (var c = 0u; c < tile_queries; c++) {
        let pc = probs[row * TILE4 + c / 4u][c % 4u];
        let dsc = dscores[row * TILE4 + c / 4u][c % 4u];
        let o_row = q_base + (i0 + c) * q_stride;
        if (lane < hd4) {
          dv0 += pc * dout[o_row + lane];
          dk0 += dsc * q[o_row + lane];
        }
        if (lane + LANES < hd4) {
          dv1 += pc * dout[o_row + lane + LANES];
          dk1 += dsc * q[o_row + lane + LANES];
        }
        if (lane + 2u * LANES < hd4) {
          dv2 += pc * dout[o_row + lane + 2u * LANES];
          dk2 += dsc * q[o_row + lane + 2u * LANES];
        }
        if (lane + 3u * LANES < hd4) {
          dv3 += pc * dout[o_row + lane + 3u * LANES];
          dk3 += dsc * q[o_row + lane + 3u * LANES];
        }
      }
      // The next tile overwrites probs and dscores.
      workgroupBarrier();
    }
  }

  if (k0 + row >= p.tk) {
    return;
  }
  if (lane < hd4) {
    dk[kv_row + lane] = dk0 * p.scale;
    dv[kv_row + lane] = dv0;
  }
  if (lane + LANES < hd4) {
    dk[kv_row + lane + LANES] = dk1 * p.scale;
    dv[kv_row + lane + LANES] = dv1;
  }
  if (lane + 2u * LANES < hd4) {
    dk[kv_row + lane + 2u * LANES] = dk2 * p.scale;
    dv[kv_row + lane + 2u * LANES] = dv2;
  }
  if (lane + 3u * LANES < hd4) {
    dk[kv_row + lane + 3u * LANES] = dk3 * p.scale;
    dv[kv_row + lane + 3u * LANES] = dv3;
  }
}
