import assert from "node:assert/strict";
import { sameMarkers, specialise } from "../../src/gpu/shader.ts";
import { testGpu } from "../helpers.ts";

Deno.test("specialise fills every marker once and leaves the values' own text alone", () => {
  const code = "var<storage> a: array<$ELEM>; var<storage> b: array<$ELEM>; $PIECE";
  const source = specialise("k", code, { ELEM: "vec4f", PIECE: "fn f() -> u32 { return $X; }" });
  assert.equal(
    source,
    "var<storage> a: array<vec4f>; var<storage> b: array<vec4f>; fn f() -> u32 { return $X; }",
  );
  assert.equal(specialise("plain", "fn main() {}"), "fn main() {}");
});

Deno.test("specialise names the kernel and the marker that has no value or no place", () => {
  assert.throws(
    () => specialise("matmul_x", "array<$X_ELEM>", {}),
    /kernel 'matmul_x': no value for marker \$X_ELEM/,
  );
  assert.throws(
    () => specialise("norm", "fn main() {}", { WORKGROUP_REDUCE: "" }),
    /kernel 'norm': its source has no marker \$WORKGROUP_REDUCE/,
  );
});

Deno.test("sameMarkers compares values, not objects", () => {
  assert.ok(sameMarkers(undefined, {}));
  assert.ok(sameMarkers({ A: "f32", B: "u32" }, { B: "u32", A: "f32" }));
  assert.ok(!sameMarkers({ A: "f32" }, { A: "vec4f" }));
  assert.ok(!sameMarkers({ A: "f32" }, { A: "f32", B: "u32" }));
});

const SCALE_CODE = `
override FACTOR: f32 = 1.0;
@group(0) @binding(0) var<storage, read_write> data: array<$ELEM>;
@compute @workgroup_size(1) fn main(@builtin(global_invocation_id) id: vec3u) {
  data[id.x] = data[id.x] * FACTOR;
}`;

Deno.test("a dispatch takes its element type from markers and its numbers from overrides", async () => {
  const gpu = await testGpu();
  const data = gpu.upload(new Float32Array([1, 2, 3, 4, 5, 6, 7, 8]), [8], "f32", "data");
  gpu.dispatch({
    kernel: {
      name: "scale_vec4",
      code: SCALE_CODE,
      markers: { ELEM: "vec4f" },
      constants: { FACTOR: 3 },
    },
    bindings: [data],
    workgroups: [1],
  });
  gpu.dispatch({
    kernel: {
      name: "scale_f32",
      code: SCALE_CODE,
      markers: { ELEM: "f32" },
      constants: { FACTOR: -1 },
    },
    bindings: [data],
    workgroups: [3],
  });
  assert.deepEqual(await gpu.readF32(data), new Float32Array([-3, -6, -9, 12, 5, 6, 7, 8]));
  assert.throws(
    () =>
      gpu.dispatch({
        kernel: {
          name: "scale_f32",
          code: SCALE_CODE,
          markers: { ELEM: "vec4f" },
          constants: { FACTOR: -1 },
        },
        bindings: [data],
        workgroups: [1],
      }),
    /kernel name 'scale_f32' is used for two different WGSL sources/,
  );
  data.destroy();
});
