/** Shared pieces of the one-workgroup-per-row kernels (norms, softmax). */
import reduceCode from "../../kernels/workgroup_reduce.wgsl" with { type: "text" };

/** Prepends the workgroup reductions (`workgroup_sum`, `workgroup_max`, `row_of`) to a kernel. */
export function withWorkgroupReduce(code: string): string {
  return `${reduceCode}\n${code}`;
}

/** Short rows waste fewer idle invocations and barrier steps with a smaller workgroup. */
export function rowWorkgroupSize(rowLength: number): number {
  if (rowLength <= 64) return 64;
  if (rowLength <= 128) return 128;
  return 256;
}
