/**
 * Every op × shape × dtype in one table (tests/ops/table/*.ts), one Deno.test per case, on the
 * adapter DENO_WEBGPU_BACKEND selects. Error messages and special behaviours stay in the per-op
 * files.
 */
import { testGpu } from "../helpers.ts";
import { registerOpChecks } from "./harness.ts";
import { ATTENTION_CHECKS } from "./table/attention.ts";
import { MATMUL_CHECKS } from "./table/matmul.ts";

registerOpChecks(await testGpu(), [
  ...MATMUL_CHECKS,
  ...ATTENTION_CHECKS,
]);
