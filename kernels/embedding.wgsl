// Embedding gather: out[n, :] = f32(table[ids[n], :]) for ids in one window of table rows.
//
// A table may be larger than one storage binding (Qwen3-4B's is 778 MB of bf16), so the host
// binds it in windows of rows and dispatches once per window; each dispatch writes only the
// output rows whose id falls in [row_begin, row_end). The window binding starts at table
// element elem_offset (an aligned byte offset, so a 2-byte row may start mid-word). The table
// is read as u32 words for every dtype; f16/bf16 hold two elements per word, low half first.
// One invocation per output element; the grid wraps x into y.

struct Params {
  count: u32, // ids * dim
  dim: u32,
  row_begin: u32,
  row_end: u32,
  elem_offset: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override WG: u32 = 256u;

fn out_index(gid: vec3u, nwg: vec3u) -> u32 {
  return gid.x + gid.y * nwg.x * WG;
}

// The window-relative table element that output element e copies, or -1 when e is past the
// end or its id lies outside this window.
fn window_element(e: u32) -> i32 {
  if (e >= p.count) {
    return -1;
  }
  let id = ids[e / p.dim];
  if (id < p.row_begin || id >= p.row_end) {
    return -1;
  }
  return i32(id * p.dim + e % p.dim - p.elem_offset);
}

fn half_of(element: i32) -> u32 {
  let i = u32(element);
  return (table[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
}

@compute @workgroup_size(WG)
fn gather_f32(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let e = out_index(gid, nwg);
  let w = window_element(e);
  if (w >= 0) {
    out[e] = bitcast<f32>(table[w]);
  }
}

@compute @workgroup_size(WG)
fn gather_bf16(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let e = out_index(gid, nwg);
  let w = window_element(e);
  if (w >= 0) {
    out[e] = bitcast<f32>(half_of(w) << 16u);
  }
}

@compute @workgroup_size(WG)
fn gather_f16(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let e = out_index(gid, nwg);
  let w = window_element(e);
  if (w >= 0) {
    out[e] = unpack2x16float(half_of(w)).x;
  }
}
