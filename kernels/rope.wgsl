// Rotary position embedding, rotate-half form (transformers' apply_rotary_pos_emb):
//   out[i]        = x[i] * cos - x[i + hd/2] * sin
//   out[i + hd/2] = x[i + hd/2] * cos + x[i] * sin      for i < hd/2,
// x laid out [tokens, heads, hd]. One invocation per (token, head, i) pair. cos/sin come
// from a host-built table [positions, hd/2] because WGSL only promises sin/cos to 2^-11.
// The backward is the inverse rotation (the transpose of a rotation): the same entries with
// the INVERSE flag, which negates sin.

struct Params {
  pairs: u32,
  heads: u32,
  half: u32,
  seq_len: u32,
  flags: u32,
}

// positions[token] gives the position instead of token % seq_len.
const POSITIONS: u32 = 1u;
// Rotate by -angle: dx from dy.
const INVERSE: u32 = 2u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cos_sin: array<vec2f>;
// Without a positions tensor any read-only buffer is bound here; it is then never read.
@group(0) @binding(3) var<storage, read> positions: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> x_in_out: array<f32>;

override WG: u32 = 256u;

fn pair_index(gid: vec3u, nwg: vec3u) -> u32 {
  return gid.x + gid.y * nwg.x * WG;
}

// (index of the first element of the pair, index into the cos/sin table)
fn locate(pair: u32) -> vec2u {
  let per_token = p.heads * p.half;
  let token = pair / per_token;
  let head = (pair % per_token) / p.half;
  let i = pair % p.half;
  var pos = token % p.seq_len;
  if ((p.flags & POSITIONS) != 0u) { pos = u32(positions[token]); }
  return vec2u((token * p.heads + head) * 2u * p.half + i, pos * p.half + i);
}

fn rotate(first: f32, second: f32, cs: vec2f) -> vec2f {
  let sin = select(cs.y, -cs.y, (p.flags & INVERSE) != 0u);
  return vec2f(first * cs.x - second * sin, second * cs.x + first * sin);
}

@compute @workgroup_size(WG)
fn rope(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let pair = pair_index(gid, nwg);
  if (pair >= p.pairs) { return; }
  let at = locate(pair);
  let r = rotate(x[at.x], x[at.x + p.half], cos_sin[at.y]);
  out[at.x] = r.x;
  out[at.x + p.half] = r.y;
}

// Same as rope, writing back into x (each invocation reads its pair before writing it).
@compute @workgroup_size(WG)
fn rope_in_place(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let pair = pair_index(gid, nwg);
  if (pair >= p.pairs) { return; }
  let at = locate(pair);
  let r = rotate(x_in_out[at.x], x_in_out[at.x + p.half], cos_sin[at.y]);
  x_in_out[at.x] = r.x;
  x_in_out[at.x + p.half] = r.y;
}
