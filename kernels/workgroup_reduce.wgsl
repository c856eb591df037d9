// Workgroup reductions shared by the row kernels (norm, softmax, optim): the text of their
// WORKGROUP_REDUCE marker (src/ops/row_reduce.ts).
// One workgroup owns one row: each invocation folds a strided slice, then a tree over
// shared memory combines the partials. WG may be any power of two up to MAX_WG.

override WG: u32 = 256u;
const MAX_WG: u32 = 256u;

var<workgroup> reduce_scratch: array<f32, MAX_WG>;

// Must be called from uniform control flow by every invocation of the workgroup.
fn workgroup_sum(value: f32, lid: u32) -> f32 {
  reduce_scratch[lid] = value;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
    if (lid < stride) { reduce_scratch[lid] += reduce_scratch[lid + stride]; }
    workgroupBarrier();
  }
  let total = reduce_scratch[0];
  // The next reduction overwrites the scratch: everyone must have read the result first.
  workgroupBarrier();
  return total;
}

fn workgroup_max(value: f32, lid: u32) -> f32 {
  reduce_scratch[lid] = value;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
    if (lid < stride) { reduce_scratch[lid] = max(reduce_scratch[lid], reduce_scratch[lid + stride]); }
    workgroupBarrier();
  }
  let total = reduce_scratch[0];
  workgroupBarrier();
  return total;
}

// Rows are workgroups; more than 65535 rows wrap onto y.
fn row_of(wid: vec3u, nwg: vec3u) -> u32 {
  return wid.x + wid.y * nwg.x;
}
