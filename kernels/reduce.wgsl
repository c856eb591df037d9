// Column sums of a row-major [rows, cols] f32 array, without atomics so the bits are
// reproducible: invocation (column j, chunk c) adds rows [c * chunk_rows, (c + 1) * chunk_rows)
// of column j in order and writes out[c * cols + j]. One pass with a single chunk is the whole
// sum; a long column is split into chunks first and the [chunks, cols] partial sums are then
// summed by the same entry point. Neighbouring invocations read neighbouring columns.

struct Params {
  rows: u32,
  cols: u32,
  chunk_rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn column_sum(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  // x wraps into y for more than 65535 workgroups of columns; z is the chunk.
  let j = gid.x + gid.y * nwg.x * WG;
  if (j >= p.cols) { return; }
  let first = gid.z * p.chunk_rows;
  let end = min(first + p.chunk_rows, p.rows);
  var total = 0.0;
  for (var r = first; r < end; r++) { total += x[r * p.cols + j]; }
  out[gid.z * p.cols + j] = total;
}
