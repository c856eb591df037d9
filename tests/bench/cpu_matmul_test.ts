import { blockedMatmul } from "../../src/bench/cpu_matmul.ts";
import { matmulRef } from "../../src/ops/matmul_ref.ts";
import { assertNmse, randn } from "../helpers.ts";

Deno.test("blockedMatmul (the bench baseline) matches the reference across block edges", () => {
  const [m, n, k] = [70, 67, 131];
  const a = randn(m * k, 1);
  const b = randn(k * n, 2);
  const expected = matmulRef(a, b, { m, n, k, transposeW: false });
  assertNmse(expected, blockedMatmul(a, b, m, n, k), 1e-12, "blockedMatmul");
});
