/** Shared pieces of the one-workgroup-per-row kernels (norms, softmax, optimizer reductions). */
import reduceCode from "../../kernels/workgroup_reduce.wgsl" with { type: "text" };
import type { Markers } from "../gpu/shader.ts";

/** `Kernel.markers` of a source with a `$WORKGROUP_REDUCE` marker: the workgroup reductions
 * (`workgroup_sum`, `workgroup_max`, `row_of`, override WG). */
export const WORKGROUP_REDUCE: Markers = { WORKGROUP_REDUCE: reduceCode };

/** Short rows waste fewer idle invocations and barrier steps with a smaller workgroup. */
export function rowWorkgroupSize(rowLength: number): number {
  if (rowLength <= 64) return 64;
  if (rowLength <= 128) return 128;
  return 256;
}
