import assert from "node:assert/strict";
import { layerOf, modCliImports, upwardImports } from "../../scripts/check_layers.ts";

const ROOT = "file:///p/";
const dep = (specifier: string, line: number, kind: "code" | "type" = "code") => ({
  [kind]: { specifier: `${ROOT}${specifier}`, span: { start: { line } } },
});

Deno.test("check_layers: upward value and type imports are named with file and line", () => {
  const modules = [
    {
      specifier: `${ROOT}src/ops/a.ts`,
      dependencies: [dep("src/gpu/d.ts", 0), dep("src/models/m.ts", 4)],
    },
    { specifier: `${ROOT}src/models/m.ts`, dependencies: [dep("src/train/t.ts", 2, "type")] },
    {
      specifier: `${ROOT}src/cli/c.ts`,
      dependencies: [dep("src/train/t.ts", 0), dep("src/util/u.ts", 1)],
    },
    { specifier: `${ROOT}src/newlayer/x.ts`, dependencies: [dep("src/util/u.ts", 0)] },
    { specifier: `${ROOT}scripts/s.ts`, dependencies: [dep("src/cli/c.ts", 0)] },
  ];
  assert.deepEqual(upwardImports(modules, ROOT), [
    "src/models/m.ts:3 imports src/train/t.ts (models may import only layers below it: util, io, gpu, ops, text)",
    "src/newlayer/x.ts:1 imports src/util/u.ts (newlayer is not a layer: add it to LAYERS in scripts/check_layers.ts)",
    "src/ops/a.ts:5 imports src/models/m.ts (ops may import only layers below it: util, io, gpu)",
  ]);
  assert.equal(layerOf(`${ROOT}scripts/s.ts`, ROOT), undefined);
  assert.equal(layerOf(`${ROOT}src/gpu/device.ts`, ROOT), "gpu");
});

Deno.test("check_layers: mod.ts may import src/cli/main.ts only, of all src/cli", () => {
  const mod = (deps: ReturnType<typeof dep>[]) => [
    { specifier: `${ROOT}mod.ts`, dependencies: deps },
    // Only mod.ts's own imports count: the CLI entry importing commands is its business.
    { specifier: `${ROOT}src/cli/main.ts`, dependencies: [dep("src/cli/encode.ts", 0)] },
  ];
  assert.deepEqual(
    modCliImports(mod([dep("src/cli/main.ts", 9), dep("src/train/t.ts", 1)]), ROOT),
    [],
  );
  assert.deepEqual(
    modCliImports(
      mod([
        dep("src/cli/main.ts", 9),
        dep("src/cli/serve.ts", 3),
        dep("src/cli/info.ts", 1, "type"),
      ]),
      ROOT,
    ),
    [
      "mod.ts:2 imports src/cli/info.ts (mod.ts exports the library from below src/cli; of src/cli it imports only src/cli/main.ts, for main)",
      "mod.ts:4 imports src/cli/serve.ts (mod.ts exports the library from below src/cli; of src/cli it imports only src/cli/main.ts, for main)",
    ],
  );
});
