import assert from "node:assert/strict";
import { join } from "node:path";
import type { Gpu } from "../../src/gpu/device.ts";
import { f16ArrayToF32, f32ArrayToBf16, f32ArrayToF16 } from "../../src/io/dtype.ts";
import { ModelFolder } from "../../src/io/hf.ts";
import { SafetensorsFile, type TensorToWrite, writeSafetensors } from "../../src/io/safetensors.ts";
import { nf4Quantize } from "../../src/ops/nf4.ts";
import { loadWeights, perLayer, type WeightSchema } from "../../src/models/weight_schema.ts";
import { randn, rejectsWith, testGpu, withTempDir } from "../helpers.ts";

/**
 * A two-layer model with every placement: a BF16 table of odd width kept 16-bit (so pieces
 * must pair rows), NF4 linears of an odd size read from F32, F16 norms decoded to f32, an
 * optional head that is never read, and a saved buffer that is ignored.
 */
const SCHEMA: WeightSchema = {
  model: "a test model with 2 layers",
  config: "test_config.json",
  tensors: [
    { name: "embed", shape: [5, 3], placement: "stored" },
    ...perLayer(2, (i) => `layers.${i}.`, () => [
      { name: "linear.weight", shape: [6, 70], placement: "nf4" },
      { name: "norm.weight", shape: [3], placement: "f32" },
    ]),
    { name: "head.weight", shape: [2, 3], placement: "unread", optional: true },
  ],
  ignore: (name) => name === "position_ids",
};

/** The file's tensors, with data of each one's dtype; `edit` may drop, add or change any. */
function goodTensors(): TensorToWrite[] {
  const tensors: TensorToWrite[] = [
    { name: "embed", dtype: "BF16", shape: [5, 3], data: f32ArrayToBf16(randn(15, 1)) },
    { name: "position_ids", dtype: "I64", shape: [2], data: new BigInt64Array([0n, 1n]) },
  ];
  for (const i of [0, 1]) {
    tensors.push(
      { name: `layers.${i}.linear.weight`, dtype: "F32", shape: [6, 70], data: randn(420, 2 + i) },
      {
        name: `layers.${i}.norm.weight`,
        dtype: "F16",
        shape: [3],
        data: f32ArrayToF16(randn(3, 4 + i)),
      },
    );
  }
  return tensors;
}

/** A Gpu that fails the test if the loader touches it: errors must come before any upload. */
const UNTOUCHABLE_GPU = new Proxy({}, {
  get(_, key) {
    throw new Error(`the loader used gpu.${String(key)} before checking the file`);
  },
}) as Gpu;

/** Writes `goodTensors()` changed by `edit` and expects `loadWeights` to reject naming `parts`. */
async function rejectsFile(
  edit: (tensors: TensorToWrite[]) => void,
  ...parts: (string | ((path: string) => string))[]
): Promise<void> {
  await withTempDir(async (dir) => {
    const path = join(dir, "weights.safetensors");
    const tensors = goodTensors();
    edit(tensors);
    await writeSafetensors(path, tensors);
    const file = await SafetensorsFile.open(path);
    let uploads = 0;
    try {
      await rejectsWith(
        () => loadWeights(UNTOUCHABLE_GPU, file, SCHEMA, { onTensor: () => uploads++ }),
        ...parts.map((part) => typeof part === "string" ? part : part(path)),
      );
    } finally {
      file.close();
    }
    assert.equal(uploads, 0);
  });
}

function replace(tensors: TensorToWrite[], name: string, change: Partial<TensorToWrite>): void {
  const i = tensors.findIndex((t) => t.name === name);
  tensors[i] = { ...tensors[i], ...change };
}

Deno.test("weight schema: a good file loads with each placement, in file order", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "weights.safetensors");
    const tensors = goodTensors();
    await writeSafetensors(path, tensors);
    const gpu = await testGpu();
    const file = await SafetensorsFile.open(path);
    const seen: string[] = [];
    // 8-byte pieces of 6-byte rows: pairs of rows, so the 5-row table goes in three writes.
    const loaded = await loadWeights(gpu, file, SCHEMA, {
      storedChunkBytes: 8,
      onTensor: (name, done, total) => seen.push(`${name} ${done}/${total}`),
    });
    file.close();
    assert.deepEqual(seen, [
      "embed 1/5",
      "layers.0.linear.weight 2/5",
      "layers.0.norm.weight 3/5",
      "layers.1.linear.weight 4/5",
      "layers.1.norm.weight 5/5",
    ]);
    const data = new Map(tensors.map((t) => [t.name, t.data]));
    const embed = loaded.tensor("embed");
    assert.equal(embed.dtype, "bf16");
    assert.deepEqual((await gpu.readAll([embed]))[0], data.get("embed"));
    let bytes = embed.byteLength;
    for (const i of [0, 1]) {
      const linear = loaded.nf4(`layers.${i}.linear.weight`);
      const want = nf4Quantize(data.get(`layers.${i}.linear.weight`) as Float32Array);
      const [packed, absmax] = await gpu.readAll([linear.packed, linear.absmax]);
      assert.deepEqual(packed, want.packed);
      assert.deepEqual(absmax, want.absmax);
      const norm = loaded.tensor(`layers.${i}.norm.weight`);
      assert.equal(norm.dtype, "f32");
      const normBits = data.get(`layers.${i}.norm.weight`) as Uint16Array;
      assert.deepEqual((await gpu.readAll([norm]))[0], f16ArrayToF32(normBits));
      bytes += linear.packed.byteLength + linear.absmax.byteLength + norm.byteLength;
    }
    assert.equal(loaded.gpuBytes, bytes);
    assert.throws(() => loaded.tensor("head.weight"), /no tensor "head.weight" was loaded/);
    assert.throws(() => loaded.tensor("layers.0.linear.weight"), /no tensor/);
  });
});

Deno.test("weight schema: a missing tensor names the file, the tensor, what is expected and the fix", () =>
  rejectsFile(
    (t) => t.splice(t.findIndex((x) => x.name === "layers.1.linear.weight"), 1),
    (path) => `${path}: tensor "layers.1.linear.weight" is missing`,
    "but a test model with 2 layers per test_config.json needs it (F32, F16 or BF16, shape [6,70])",
    "the config and the weights disagree, or the download is incomplete",
  ));

Deno.test("weight schema: a wrong shape names the shape found and the one the config implies", () =>
  rejectsFile(
    (t) => replace(t, "layers.0.norm.weight", { shape: [1, 3] }),
    (path) => `${path}: tensor "layers.0.norm.weight" has shape [1,3]`,
    "but test_config.json implies [3] for a test model with 2 layers",
    "the config and the weights disagree",
  ));

Deno.test("weight schema: a wrong dtype names the dtype found and those accepted", () =>
  rejectsFile(
    (t) => replace(t, "layers.0.norm.weight", { dtype: "I16", data: new Int16Array(3) }),
    (path) => `${path}: tensor "layers.0.norm.weight" is I16`,
    "but a test model with 2 layers reads it as F32, F16 or BF16",
    "save the weights in one of those dtypes",
  ));

Deno.test("weight schema: an unexpected tensor is refused; optional ones are still checked", async () => {
  await rejectsFile(
    (t) => t.push({ name: "layers.2.norm.weight", dtype: "F32", shape: [3], data: randn(3, 9) }),
    (path) => `${path}: unexpected tensor "layers.2.norm.weight"`,
    "a test model with 2 layers per test_config.json has no such tensor",
  );
  await rejectsFile(
    (t) => t.push({ name: "head.weight", dtype: "F32", shape: [3, 2], data: randn(6, 9) }),
    'tensor "head.weight" has shape [3,2] but test_config.json implies [2,3]',
  );
  await rejectsFile(
    (t) => {
      replace(t, "embed", { shape: [3, 5] });
      t.push({ name: "extra", dtype: "F32", shape: [1], data: randn(1, 9) });
    },
    'tensor "embed" has shape [3,5]',
    "(and 1 more problem)",
  );
});

Deno.test("weight schema: a sharded folder names the shard or the index, and loads shard by shard", async () => {
  await withTempDir(async (dir) => {
    const tensors = goodTensors().filter((t) => t.name !== "position_ids");
    const shards = ["a.safetensors", "b.safetensors"];
    await writeSafetensors(join(dir, shards[0]), tensors.slice(0, 3));
    await writeSafetensors(join(dir, shards[1]), tensors.slice(3));
    const weightMap = Object.fromEntries(tensors.map((t, i) => [t.name, shards[i < 3 ? 0 : 1]]));
    await Deno.writeTextFile(join(dir, "config.json"), "{}");
    await Deno.writeTextFile(
      join(dir, "model.safetensors.index.json"),
      JSON.stringify({ weight_map: weightMap }),
    );
    const folder = await ModelFolder.open(dir);
    const wrongShape: WeightSchema = {
      ...SCHEMA,
      tensors: SCHEMA.tensors.map((s) => s.name === "embed" ? { ...s, shape: [5, 4] } : s),
    };
    await rejectsWith(
      () => loadWeights(UNTOUCHABLE_GPU, folder, wrongShape),
      `${join(dir, "a.safetensors")}: tensor "embed" has shape [5,3]`,
    );
    const withHead: WeightSchema = {
      ...SCHEMA,
      tensors: SCHEMA.tensors.map((s) => ({ ...s, optional: false })),
    };
    await rejectsWith(
      () => loadWeights(UNTOUCHABLE_GPU, folder, withHead),
      `${join(dir, "model.safetensors.index.json")}: tensor "head.weight" is missing`,
    );
    const gpu = await testGpu();
    const loaded = await loadWeights(gpu, folder, SCHEMA);
    folder.close();
    const norm = tensors.find((t) => t.name === "layers.1.norm.weight")!.data as Uint16Array;
    const [read] = await gpu.readAll([loaded.tensor("layers.1.norm.weight")]);
    assert.deepEqual(read, f16ArrayToF32(norm));
  });
});
