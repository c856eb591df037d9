/**
 * Every op × shape × dtype in one table (tests/ops/table/*.ts), one Deno.test per case, on the
 * adapter DENO_WEBGPU_BACKEND selects. Error messages and special behaviours stay in the per-op
 * files.
 */
import { testGpu } from "../helpers.ts";
import { registerOpChecks } from "./harness.ts";
import { ATTENTION_CHECKS } from "./table/attention.ts";
import { LAYOUT_CHECKS } from "./table/layout.ts";
import { MATMUL_CHECKS } from "./table/matmul.ts";
import { NORM_CHECKS } from "./table/norm.ts";
import { POINTWISE_CHECKS } from "./table/pointwise.ts";

registerOpChecks(await testGpu(), [
  ...MATMUL_CHECKS,
  ...ATTENTION_CHECKS,
  ...NORM_CHECKS,
  ...POINTWISE_CHECKS,
  ...LAYOUT_CHECKS,
]);
