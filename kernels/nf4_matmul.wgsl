// Matmuls through an NF4 weight W [N, K] (SPEC 3.1): y = x W^T and the input gradient
// dx = dy W. W is stored as 4-bit code indices, two per byte with the first element of each
// pair in the high nibble, and one f32 absmax per block of `block` consecutive elements of the
// flattened weight. The fused entries dequantise weights in registers; for many activation
// rows `dequantize_f32` or `dequantize_f16` (whole packed words) or `dequantize` (any element
// count) writes W out once per call for the plain matmul to use.
//
// The tiled entries read the activation operand (x or dy) from a uniform buffer that `stage`
// has cut into 64 KiB tiles of TM rows x PITCH columns. On lavapipe every load inside a loop
// is emitted lane by lane, and a uniform-buffer load costs about a third of a storage load,
// so the operand that all invocations share goes through the uniform path; each invocation
// then keeps TM x 8 accumulators so every loaded value and every dequantised weight feeds
// many FMAs (spilled accumulators are cheap next to those loads). The general entries take
// any shape, blocks straddling rows included, one output per invocation.

struct Params {
  code: array<vec4f, 4>, // the NF4 table: a uniform table indexes far faster than a const array
  m: u32, // rows of the activation operand (x or dy)
  n: u32, // out features (rows of W)
  k: u32, // in features (columns of W)
  row0: u32, // tiled entries and stage: first activation row of this dispatch
  c0: u32, // tiled entries: first reduction index of this chunk
  count: u32, // tiled entries: columns in this chunk (the last may be short); stage: row tiles
  flags: u32, // ACCUMULATE: add to the output; ADD_BIAS: start from the bias
  width: u32, // stage: row length of the operand being staged
}

const ACCUMULATE = 1u;
const ADD_BIAS = 2u;
const TILE_VEC4S = 4096u; // 64 KiB, the smallest maxUniformBufferBindingSize WebGPU allows
const MAX_TM = 32u;

// Activation rows per tile; the TS side picks the smallest power of two >= M up to MAX_TM.
override TM: u32 = MAX_TM;
// Columns per tile row, i.e. per chunk of the reduction. As pipeline constants, this and the
// block size let the compiler fold the tile and block arithmetic out of the inner loops.
override PITCH: u32 = TILE_VEC4S * 4u / TM;
// Elements per absmax block.
override BLOCK: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> tile: array<vec4f, TILE_VEC4S>;
@group(0) @binding(2) var<storage, read> packed: array<u32>;
@group(0) @binding(3) var<storage, read> absmax: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> act: array<f32>;
@group(0) @binding(7) var<storage, read_write> staged: array<f32>; // also dequantize's output
@group(0) @binding(8) var<storage, read_write> decoded_f16: array<vec4u>;
@group(0) @binding(9) var<storage, read_write> decoded_f32: array<vec4f>;

fn code(i: u32) -> f32 {
  return p.code[i >> 2u][i & 3u];
}

// Element t of a packed word sits at bit ((t ^ 1) * 4): bytes are little-endian and the
// even element of each byte is its high nibble.
fn nibble_shift(t: u32) -> u32 {
  return (t ^ 1u) * 4u;
}

// Element `t` of four packed words, each times its block scale.
fn weights4(q: vec4u, t: u32, scale: vec4f) -> vec4f {
  let i = (q >> vec4u(nibble_shift(t))) & vec4u(15u);
  return vec4f(code(i.x), code(i.y), code(i.z), code(i.w)) * scale;
}

// Elements 4h .. 4h + 3 of one packed word, times its block scale.
fn word_half(q: u32, h: u32, scale: f32) -> vec4f {
  let t = 4u * h;
  return vec4f(
    code((q >> nibble_shift(t)) & 15u),
    code((q >> nibble_shift(t + 1u)) & 15u),
    code((q >> nibble_shift(t + 2u)) & 15u),
    code((q >> nibble_shift(t + 3u)) & 15u),
  ) * scale;
}

// Dequantised W at flat index e (any layout: blocks may straddle rows).
fn weight_at(e: u32) -> f32 {
  return code((packed[e >> 3u] >> nibble_shift(e & 7u)) & 15u) * absmax[e / BLOCK];
}

fn flat_index(gid: vec3u, nwg: vec3u, wg_size: u32) -> u32 {
  return gid.x + gid.y * nwg.x * wg_size;
}

// What an output element starts from before this dispatch adds its part.
fn output_base(o: u32, feature: u32) -> f32 {
  if ((p.flags & ACCUMULATE) != 0u) {
    return out[o];
  }
  if ((p.flags & ADD_BIAS) != 0u) {
    return bias[feature];
  }
  return 0.0;
}

// Copies `count` tiles of rows of the operand `act` [m, width], from row row0 on, into tiles:
// tile (r, c) holds rows row0 + r*TM .. row0 + r*TM + TM - 1 and columns c*PITCH ..
// c*PITCH + PITCH - 1, row-major, at float offset (r * chunks + c) * 16384. Rows and columns
// past the operand are zero.
@compute @workgroup_size(256)
fn stage(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let idx = flat_index(gid, nwg, 256u);
  let per_tile = TM * PITCH;
  let chunks = (p.width + PITCH - 1u) / PITCH;
  let t = idx / per_tile;
  if (t >= chunks * p.count) {
    return;
  }
  let within = idx % per_tile;
  let row = p.row0 + (t / chunks) * TM + within / PITCH;
  let col = (t % chunks) * PITCH + within % PITCH;
  var v = 0.0;
  if (row < p.m && col < p.width) {
    v = act[row * p.width + col];
  }
  staged[t * TILE_VEC4S * 4u + within] = v;
}

// y[row0 + i, n0 + j] for i < TM, j < 8 over one chunk of K. Needs K and PITCH multiples of the
// block and the block a multiple of 8, so each row's chunk is whole blocks of whole words.
@compute @workgroup_size(64)
fn forward_tiled(@builtin(global_invocation_id) gid: vec3u) {
  let words = p.k / 8u;
  let words_per_block = BLOCK / 8u;
  let n0 = gid.x * 8u;
  // First word of the chunk in each of the 8 weight rows; rows past N repeat the last one and
  // are dropped at the end, so the loop has no bounds checks.
  let last = vec4u(p.n - 1u);
  let ra = min(vec4u(n0) + vec4u(0u, 1u, 2u, 3u), last) * words + p.c0 / 8u;
  let rb = min(vec4u(n0) + vec4u(4u, 5u, 6u, 7u), last) * words + p.c0 / 8u;
  var acc_a: array<vec4f, MAX_TM>; // acc_a[i][j]: row row0 + i, feature n0 + j
  var acc_b: array<vec4f, MAX_TM>; // acc_b[i][j]: feature n0 + 4 + j
  for (var w0 = 0u; w0 < p.count / 8u; w0 += words_per_block) {
    let ba = (ra + vec4u(w0)) / words_per_block;
    let bb = (rb + vec4u(w0)) / words_per_block;
    let sa = vec4f(absmax[ba.x], absmax[ba.y], absmax[ba.z], absmax[ba.w]);
    let sb = vec4f(absmax[bb.x], absmax[bb.y], absmax[bb.z], absmax[bb.w]);
    for (var j = 0u; j < words_per_block; j++) {
      let kw = w0 + j;
      let wa = ra + vec4u(kw);
      let wb = rb + vec4u(kw);
      let qa = vec4u(packed[wa.x], packed[wa.y], packed[wa.z], packed[wa.w]);
      let qb = vec4u(packed[wb.x], packed[wb.y], packed[wb.z], packed[wb.w]);
      // aT[j]: element 8 kw + T of weight row n0 + j (bT: row n0 + 4 + j)
      let a0 = weights4(qa, 0u, sa);
      let a1 = weights4(qa, 1u, sa);
      let a2 = weights4(qa, 2u, sa);
      let a3 = weights4(qa, 3u, sa);
      let a4 = weights4(qa, 4u, sa);
      let a5 = weights4(qa, 5u, sa);
      let a6 = weights4(qa, 6u, sa);
      let a7 = weights4(qa, 7u, sa);
      let b0 = weights4(qb, 0u, sb);
      let b1 = weights4(qb, 1u, sb);
      let b2 = weights4(qb, 2u, sb);
      let b3 = weights4(qb, 3u, sb);
      let b4 = weights4(qb, 4u, sb);
      let b5 = weights4(qb, 5u, sb);
      let b6 = weights4(qb, 6u, sb);
      let b7 = weights4(qb, 7u, sb);
      for (var i = 0u; i < TM; i++) {
        let base = (i * PITCH) / 4u + 2u * kw;
        let x0 = tile[base];
        let x1 = tile[base + 1u];
        var ya = acc_a[i];
        ya = fma(vec4f(x0.x), a0, ya);
        ya = fma(vec4f(x0.y), a1, ya);
        ya = fma(vec4f(x0.z), a2, ya);
        ya = fma(vec4f(x0.w), a3, ya);
        ya = fma(vec4f(x1.x), a4, ya);
        ya = fma(vec4f(x1.y), a5, ya);
        ya = fma(vec4f(x1.z), a6, ya);
        ya = fma(vec4f(x1.w), a7, ya);
        acc_a[i] = ya;
        var yb = acc_b[i];
        yb = fma(vec4f(x0.x), b0, yb);
        yb = fma(vec4f(x0.y), b1, yb);
        yb = fma(vec4f(x0.z), b2, yb);
        yb = fma(vec4f(x0.w), b3, yb);
        yb = fma(vec4f(x1.x), b4, yb);
        yb = fma(vec4f(x1.y), b5, yb);
        yb = fma(vec4f(x1.z), b6, yb);
        yb = fma(vec4f(x1.w), b7, yb);
        acc_b[i] = yb;
      }
    }
  }
  for (var i = 0u; i < TM; i++) {
    let m = p.row0 + i;
    if (m < p.m) {
      for (var j = 0u; j < 8u; j++) {
        let n = n0 + j;
        if (n < p.n) {
          let o = m * p.n + n;
          out[o] = output_base(o, n) + select(acc_b[i][j & 3u], acc_a[i][j & 3u], j < 4u);
        }
      }
    }
  }
}

// dx[row0 + i, 8 kw + j] for i < TM, j < 8 over one chunk of N (kw = this invocation's
// word column). Needs K a multiple of 8 so rows of W start on word boundaries.
@compute @workgroup_size(64)
fn input_grad_tiled(@builtin(global_invocation_id) gid: vec3u) {
  let words = p.k / 8u;
  let kw = min(gid.x, words - 1u);
  let wpb = BLOCK / 8u; // words per block
  var acc_a: array<vec4f, MAX_TM>; // acc_a[i][j]: dx[row0 + i, 8 kw + j]
  var acc_b: array<vec4f, MAX_TM>; // acc_b[i][j]: dx[row0 + i, 8 kw + 4 + j]
  for (var j = 0u; j < p.count; j += 4u) {
    // Weight rows c0 + j + r, r < 4: wr (elements 8 kw .. 8 kw + 3) and vr (the next four).
    // Rows past N repeat the last one and meet the zero padding of the tile.
    let last = p.n - 1u;
    let i0 = min(p.c0 + j, last) * words + kw;
    let i1 = min(p.c0 + j + 1u, last) * words + kw;
    let i2 = min(p.c0 + j + 2u, last) * words + kw;
    let i3 = min(p.c0 + j + 3u, last) * words + kw;
    let q = vec4u(packed[i0], packed[i1], packed[i2], packed[i3]);
    let s = vec4f(absmax[i0 / wpb], absmax[i1 / wpb], absmax[i2 / wpb], absmax[i3 / wpb]);
    let w0 = word_half(q.x, 0u, s.x);
    let w1 = word_half(q.y, 0u, s.y);
    let w2 = word_half(q.z, 0u, s.z);
    let w3 = word_half(q.w, 0u, s.w);
    let v0 = word_half(q.x, 1u, s.x);
    let v1 = word_half(q.y, 1u, s.y);
    let v2 = word_half(q.z, 1u, s.z);
    let v3 = word_half(q.w, 1u, s.w);
    for (var i = 0u; i < TM; i++) {
      let d = tile[(i * PITCH + j) / 4u];
      var xa = acc_a[i];
      xa = fma(vec4f(d.x), w0, xa);
      xa = fma(vec4f(d.y), w1, xa);
      xa = fma(vec4f(d.z), w2, xa);
      xa = fma(vec4f(d.w), w3, xa);
      acc_a[i] = xa;
      var xb = acc_b[i];
      xb = fma(vec4f(d.x), v0, xb);
      xb = fma(vec4f(d.y), v1, xb);
      xb = fma(vec4f(d.z), v2, xb);
      xb = fma(vec4f(d.w), v3, xb);
      acc_b[i] = xb;
    }
  }
  if (gid.x < words) {
    for (var i = 0u; i < TM; i++) {
      let m = p.row0 + i;
      if (m < p.m) {
        let o = m * p.k + 8u * gid.x;
        for (var j = 0u; j < 4u; j++) {
          out[o + j] = output_base(o + j, 0u) + acc_a[i][j];
          out[o + 4u + j] = output_base(o + 4u + j, 0u) + acc_b[i][j];
        }
      }
    }
  }
}

// y[m, n] for any shape, one output per invocation.
@compute @workgroup_size(64)
fn forward_general(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let o = flat_index(gid, nwg, 64u);
  if (o >= p.m * p.n) {
    return;
  }
  let m = o / p.n;
  let n = o % p.n;
  var acc = 0.0;
  for (var c = 0u; c < p.k; c++) {
    acc = fma(act[m * p.k + c], weight_at(n * p.k + c), acc);
  }
  out[o] = output_base(o, n) + acc;
}

// dx[m, c] for any shape, one output per invocation.
@compute @workgroup_size(64)
fn input_grad_general(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let o = flat_index(gid, nwg, 64u);
  if (o >= p.m * p.k) {
    return;
  }
  let m = o / p.k;
  let c = o % p.k;
  var acc = 0.0;
  for (var n = 0u; n < p.n; n++) {
    acc = fma(act[m * p.n + n], weight_at(n * p.k + c), acc);
  }
  out[o] = output_base(o, 0u) + acc;
}

// W dequantised into `staged` as f32 [N, K] row-major, the eight elements of one packed word
// per invocation.
@compute @workgroup_size(256)
fn dequantize(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let first = flat_index(gid, nwg, 256u) * 8u;
  let total = p.n * p.k;
  for (var e = first; e < min(first + 8u, total); e++) {
    staged[e] = weight_at(e);
  }
}

// The eight elements of packed word `word` (flat elements 8 word .. 8 word + 7), each the f32
// product code * absmax: [0] holds the first four, [1] the next four.
fn decode_word(word: u32) -> array<vec4f, 2> {
  let q = packed[word];
  let e = word * 8u;
  // BLOCK is a pipeline constant, so this branch is resolved when the pipeline is built.
  if (BLOCK % 8u == 0u) {
    let scale = absmax[e / BLOCK];
    return array(word_half(q, 0u, scale), word_half(q, 1u, scale));
  }
  let first = vec4u(e) + vec4u(0u, 1u, 2u, 3u);
  let b_lo = first / BLOCK;
  let b_hi = (first + vec4u(4u)) / BLOCK;
  return array(
    word_half(q, 0u, 1.0) * vec4f(absmax[b_lo.x], absmax[b_lo.y], absmax[b_lo.z], absmax[b_lo.w]),
    word_half(q, 1u, 1.0) * vec4f(absmax[b_hi.x], absmax[b_hi.y], absmax[b_hi.z], absmax[b_hi.w]),
  );
}

// W decoded into `decoded_f32` as f32 [N, K] row-major, one packed word per invocation: one
// packed load, one absmax load (when words do not straddle blocks) and two 16-byte stores for
// eight elements. Needs N * K a multiple of 8.
@compute @workgroup_size(256)
fn dequantize_f32(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let word = flat_index(gid, nwg, 256u);
  if (word < p.n * p.k / 8u) {
    let v = decode_word(word);
    decoded_f32[2u * word] = v[0];
    decoded_f32[2u * word + 1u] = v[1];
  }
}

// W decoded transposed into `staged` as f32 [K, N] (element (n, k) at k * N + n), so that the
// input gradient dx = dy W runs as the x Wᵀ product, the fastest layout of the matmul on CPU
// adapters (1.5x faster than x W at 77 x 8192 -> 2048 on lavapipe). One packed word per
// invocation: eight scattered stores. Needs N * K a multiple of 8; where N is a multiple of 4 and
// K of 8, `dequantize_f32_transposed_vec4` below runs instead.
@compute @workgroup_size(256)
fn dequantize_f32_transposed(
  @builtin(global_invocation_id) gid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
) {
  let word = flat_index(gid, nwg, 256u);
  if (word < p.n * p.k / 8u) {
    var v = decode_word(word);
    for (var i = 0u; i < 8u; i++) {
      let e = word * 8u + i;
      let row = e / p.k;
      staged[(e - row * p.k) * p.n + row] = v[i / 4u][i % 4u];
    }
  }
}

// `dequantize_f32_transposed` for N a multiple of 4 and K of 8, into `decoded_f32` (the same
// [K, N] f32 layout): one invocation decodes the words of 4 consecutive rows at one group of 8
// columns and stores each column's 4 values as one vec4 of Wᵀ, 8 stores where the scalar entry
// makes 32 (each store is a loop over the SIMD lanes on CPU adapters: 3-4x faster on lavapipe).
@compute @workgroup_size(256)
fn dequantize_f32_transposed_vec4(
  @builtin(global_invocation_id) gid: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
) {
  let index = flat_index(gid, nwg, 256u);
  let words_per_row = p.k / 8u;
  if (index < p.n / 4u * words_per_row) {
    let column_group = index % words_per_row;
    let n0 = (index / words_per_row) * 4u;
    let first = n0 * words_per_row + column_group;
    let r0 = decode_word(first);
    let r1 = decode_word(first + words_per_row);
    let r2 = decode_word(first + 2u * words_per_row);
    let r3 = decode_word(first + 3u * words_per_row);
    let out0 = (column_group * 8u * p.n + n0) / 4u;
    let step = p.n / 4u;
    for (var i = 0u; i < 8u; i++) {
      let h = i / 4u;
      let c = i % 4u;
      decoded_f32[out0 + i * step] = vec4f(r0[h][c], r1[h][c], r2[h][c], r3[h][c]);
    }
  }
}

// W decoded into `decoded_f16` as f16 bit patterns, [N, K] row-major and two per u32 with the
// lower-index element in the low half, as the matmul unpacks them: the eight elements of one
// packed word per invocation. Each value is the f32 product code * absmax rounded once to f16,
// which is what bitsandbytes' dequantisation computes in an fp16 compute dtype. Needs N * K a
// multiple of 8.
@compute @workgroup_size(256)
fn dequantize_f16(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let word = flat_index(gid, nwg, 256u);
  if (word < p.n * p.k / 8u) {
    let v = decode_word(word);
    let lo = vec2u(pack2x16float(v[0].xy), pack2x16float(v[0].zw));
    decoded_f16[word] = vec4u(lo, pack2x16float(v[1].xy), pack2x16float(v[1].zw));
  }
}
