import assert from "node:assert/strict";
import { join } from "node:path";
import { encodeLittleEndian } from "../../src/io/dtype.ts";
import { SafetensorsFile, type TensorToWrite, writeSafetensors } from "../../src/io/safetensors.ts";

const FIXTURES = new URL("../fixtures/", import.meta.url).pathname;
const QWEN3_SHARD1 = join(FIXTURES, "qwen3/model-00001-of-00002.safetensors");
const CLIP_L = join(FIXTURES, "clip/text_encoder/model.safetensors");

/** bf16 value from its fields, by hand: (-1)^s * 2^(e-127) * (1 + m/128); no bit tricks. */
function bf16ByFormula(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 7) & 0xff;
  const mantissa = bits & 0x7f;
  if (exponent === 0) return sign * mantissa * 2 ** -133;
  return sign * (1 + mantissa / 128) * 2 ** (exponent - 127);
}

function f16ByFormula(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

/** A file from a raw header (object or text) and `dataBytes` data bytes, for bad-file tests. */
async function writeRaw(
  path: string,
  header: unknown,
  dataBytes: number,
  headerLength?: bigint,
): Promise<string> {
  const json = new TextEncoder().encode(
    typeof header === "string" ? header : JSON.stringify(header),
  );
  const bytes = new Uint8Array(8 + json.byteLength + dataBytes);
  new DataView(bytes.buffer).setBigUint64(0, headerLength ?? BigInt(json.byteLength), true);
  bytes.set(json, 8);
  await Deno.writeFile(path, bytes);
  return path;
}

/** Asserts that opening `path` fails with a message naming the file and matching `pattern`. */
async function assertOpenFails(path: string, pattern: RegExp): Promise<void> {
  await assert.rejects(SafetensorsFile.open(path), (error: Error) => {
    assert.ok(error.message.includes(path), `message does not name the file: ${error.message}`);
    assert.match(error.message, pattern);
    return true;
  });
}

async function tmpFiles(dir: string): Promise<string[]> {
  return (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).filter((n) =>
    n.includes(".tmp-")
  );
}

const EVERY_DTYPE: TensorToWrite[] = [
  { name: "f64", dtype: "F64", shape: [3], data: new Float64Array([1.5, -1e300, 2 ** -1074]) },
  { name: "f32", dtype: "F32", shape: [2, 2], data: new Float32Array([1, -2.5, 3e-39, Infinity]) },
  { name: "f16", dtype: "F16", shape: [3], data: new Uint16Array([0x3c00, 0x8001, 0x7bff]) },
  { name: "bf16", dtype: "BF16", shape: [1, 3], data: new Uint16Array([0x3f80, 0x4049, 0xc2f7]) },
  { name: "i64", dtype: "I64", shape: [3], data: new BigInt64Array([-1n, 151935n, 2n ** 40n]) },
  { name: "i32", dtype: "I32", shape: [2], data: new Int32Array([-7, 2 ** 31 - 1]) },
  { name: "i16", dtype: "I16", shape: [2], data: new Int16Array([-32768, 12]) },
  { name: "i8", dtype: "I8", shape: [2], data: new Int8Array([-128, 127]) },
  { name: "u8", dtype: "U8", shape: [4], data: new Uint8Array([0, 7, 0x77, 255]) },
  { name: "bool", dtype: "BOOL", shape: [2], data: new Uint8Array([1, 0]) },
  { name: "scalar", dtype: "F32", shape: [], data: new Float32Array([42]) },
  { name: "empty", dtype: "F32", shape: [0, 5], data: new Float32Array(0) },
  // Already little-endian bytes of two F32 values (1.0, 2.0).
  {
    name: "raw",
    dtype: "F32",
    shape: [2],
    data: new Uint8Array([0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]),
  },
];

Deno.test("write then read round-trips every dtype, metadata and packing order", async () => {
  const dir = await Deno.makeTempDir();
  const path = join(dir, "all.safetensors");
  await writeSafetensors(path, EVERY_DTYPE, { format: "pt", note: "ünïcode" });

  const bytes = await Deno.readFile(path);
  const headerLength = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal(headerLength % 8, 0);
  const headerText = new TextDecoder().decode(bytes.subarray(8, 8 + headerLength));
  assert.match(headerText, /^\{.*\} {0,7}$/s, "JSON padded with at most 7 spaces");
  const header = JSON.parse(headerText);
  assert.deepEqual(Object.keys(header), ["__metadata__", ...EVERY_DTYPE.map((t) => t.name)]);
  let offset = 0;
  for (const tensor of EVERY_DTYPE) {
    assert.deepEqual(header[tensor.name].data_offsets, [offset, offset + tensor.data.byteLength]);
    offset += tensor.data.byteLength;
  }
  assert.equal(bytes.byteLength, 8 + headerLength + offset);

  const file = await SafetensorsFile.open(path);
  try {
    assert.deepEqual(file.metadata, { format: "pt", note: "ünïcode" });
    assert.deepEqual(file.names(), EVERY_DTYPE.map((t) => t.name));
    for (const tensor of EVERY_DTYPE) {
      const info = file.info(tensor.name);
      assert.equal(info.dtype, tensor.dtype);
      assert.deepEqual(info.shape, tensor.shape);
      assert.deepEqual(
        await file.readBytes(tensor.name),
        encodeLittleEndian(tensor.data, tensor.dtype),
      );
    }
    assert.deepEqual([...await file.readF32("f64")], [1.5, -Infinity, 0]); // rounded to f32
    assert.deepEqual([...await file.readF32("f32")], [1, -2.5, Math.fround(3e-39), Infinity]);
    assert.deepEqual([...await file.readF32("f16")], [1, -(2 ** -24), 65504]);
    assert.deepEqual([...await file.readF32("bf16")], [1, 3.140625, -123.5]);
    assert.deepEqual([...await file.readF32("raw")], [1, 2]);
    assert.deepEqual([...await file.readF32("scalar")], [42]);
    assert.deepEqual([...await file.readF32("empty")], []);
    assert.deepEqual(await file.readIntegers("i64"), [-1, 151935, 2 ** 40]);
    assert.deepEqual(await file.readIntegers("i32"), [-7, 2 ** 31 - 1]);
    assert.deepEqual(await file.readIntegers("i16"), [-32768, 12]);
    assert.deepEqual(await file.readIntegers("i8"), [-128, 127]);
    assert.deepEqual(await file.readIntegers("u8"), [0, 7, 0x77, 255]);
    assert.deepEqual(await file.readIntegers("bool"), [1, 0]);
    assert.deepEqual([...await file.readF32("i64")], [-1, 151935, 2 ** 40]);
    await assert.rejects(
      file.readIntegers("f32"),
      /all\.safetensors: tensor "f32" is F32, not an integer dtype/,
    );
  } finally {
    file.close();
  }
  await Deno.remove(dir, { recursive: true });
});

Deno.test("concurrent reads on one handle, and reads after close() reopen the file", async () => {
  const file = await SafetensorsFile.open(QWEN3_SHARD1);
  const names = file.names();
  const together = await Promise.all(names.map((n) => file.readBytes(n)));
  file.close();
  for (let i = 0; i < names.length; i++) {
    assert.equal(together[i].byteLength, file.info(names[i]).byteLength);
    assert.deepEqual(await file.readBytes(names[i]), together[i]);
  }
  file.close();
});

Deno.test("readRange reads a byte range of one tensor and refuses ranges outside it", async () => {
  const file = await SafetensorsFile.open(QWEN3_SHARD1);
  try {
    for (const name of file.names()) {
      const whole = await file.readBytes(name);
      const n = whole.byteLength;
      // Pieces of an odd size tile the tensor, as a loader streaming it in chunks reads it.
      const pieces: Uint8Array[] = [];
      for (let offset = 0; offset < n; offset += 37) {
        pieces.push(await file.readRange(name, offset, Math.min(37, n - offset)));
      }
      assert.deepEqual(new Uint8Array(pieces.flatMap((p) => [...p])), whole, name);
      assert.deepEqual(await file.readRange(name, 0, n), whole);
      assert.deepEqual(await file.readRange(name, n, 0), new Uint8Array(0), "empty at the end");
    }
    const name = "model.embed_tokens.weight";
    const n = file.info(name).byteLength;
    for (const [offset, length] of [[0, n + 1], [n - 2, 3], [-1, 2], [1.5, 2], [0, -1]]) {
      await assert.rejects(file.readRange(name, offset, length), (error: Error) => {
        assert.ok(error.message.includes(QWEN3_SHARD1), error.message);
        assert.ok(error.message.includes(`tensor "${name}" holds ${n} bytes`), error.message);
        assert.match(error.message, /is not inside it/);
        return true;
      });
    }
    await assert.rejects(file.readRange("nope", 0, 1), /no tensor "nope"/);
  } finally {
    file.close();
  }
});

Deno.test("readF32 into a scratch array returns its prefix and refuses a short one", async () => {
  const file = await SafetensorsFile.open(QWEN3_SHARD1);
  try {
    const scratch = new Float32Array(512 * 64 + 3).fill(NaN);
    const name = "model.layers.0.input_layernorm.weight";
    const values = await file.readF32(name, scratch);
    assert.equal(values.buffer, scratch.buffer, "decoded in place");
    assert.equal(values.byteOffset, 0);
    assert.deepEqual(values, await file.readF32(name));
    assert.ok(Number.isNaN(scratch[values.length]), "nothing past the tensor is written");
    await assert.rejects(
      file.readF32("model.embed_tokens.weight", new Float32Array(10)),
      /model-00001-of-00002\.safetensors: tensor "model\.embed_tokens\.weight": 32768 BF16 values do not fit the 10-element output array/,
    );
  } finally {
    file.close();
  }
});

Deno.test("reads the BF16 Qwen3 shard: header, layout and values decoded by hand", async () => {
  const file = await SafetensorsFile.open(QWEN3_SHARD1);
  try {
    assert.deepEqual(file.metadata, { format: "pt" });
    assert.equal(file.names().length, 12);
    const info = file.info("model.embed_tokens.weight");
    assert.deepEqual(
      { dtype: info.dtype, shape: info.shape, byteLength: info.byteLength },
      { dtype: "BF16", shape: [512, 64], byteLength: 512 * 64 * 2 },
    );
    // The first tensor starts right after the 8-byte length and the header.
    const raw = await Deno.readFile(QWEN3_SHARD1);
    const headerLength = Number(new DataView(raw.buffer).getBigUint64(0, true));
    assert.equal(info.byteOffset, 8 + headerLength);

    for (const name of ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]) {
      const { byteOffset, byteLength } = file.info(name);
      const values = await file.readF32(name);
      for (let i = 0; i < byteLength / 2; i++) {
        const bits = raw[byteOffset + 2 * i] | (raw[byteOffset + 2 * i + 1] << 8);
        assert.equal(values[i], bf16ByFormula(bits), `${name}[${i}]`);
      }
    }
    const norm = await file.readF32("model.layers.0.input_layernorm.weight");
    assert.ok(norm.every((v) => v > 0.5 && v < 1.5), "norm weights are random around 1 (README)");
  } finally {
    file.close();
  }
});

Deno.test("reads the F16 CLIP encoder and the I64 ids of cases.safetensors", async () => {
  const clip = await SafetensorsFile.open(CLIP_L);
  try {
    const name = "text_model.embeddings.token_embedding.weight";
    assert.equal(clip.info(name).dtype, "F16");
    assert.deepEqual(clip.info(name).shape, [512, 32]);
    const bytes = await clip.readBytes(name);
    const values = await clip.readF32(name);
    for (let i = 0; i < values.length; i++) {
      assert.equal(values[i], f16ByFormula(bytes[2 * i] | (bytes[2 * i + 1] << 8)));
    }
  } finally {
    clip.close();
  }
  const cases = await SafetensorsFile.open(join(FIXTURES, "clip/cases.safetensors"));
  try {
    assert.deepEqual(cases.metadata, { case: "clip", variant: "public", seed: "0" });
    const ids = await cases.readIntegers("input_ids_l");
    const lengths = await cases.readIntegers("content_lengths");
    assert.equal(ids.length, 3 * 77);
    assert.deepEqual(lengths, [5, 23, 75]);
    // README: [510] + content + [511], padded with 511.
    assert.equal(ids[0], 510);
    assert.equal(ids[1 + lengths[0]], 511);
    assert.equal(ids[76], 511);
  } finally {
    cases.close();
  }
});

Deno.test("header keys in any order are accepted; names() lists file order", async () => {
  const dir = await Deno.makeTempDir();
  const header = {
    second: { dtype: "U8", shape: [2], data_offsets: [1, 3] },
    first: { dtype: "U8", shape: [1], data_offsets: [0, 1] },
  };
  const file = await SafetensorsFile.open(
    await writeRaw(join(dir, "unordered.safetensors"), header, 3),
  );
  assert.deepEqual(file.names(), ["first", "second"]);
  file.close();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("bad files: each error names the file and the key", async (t) => {
  const dir = await Deno.makeTempDir();
  const good: TensorToWrite[] = [
    { name: "alpha", dtype: "F32", shape: [2], data: new Float32Array([1, 2]) },
    { name: "beta", dtype: "F32", shape: [3], data: new Float32Array([3, 4, 5]) },
  ];
  const f32 = (begin: number, end: number, shape = [(end - begin) / 4]) => ({
    dtype: "F32",
    shape,
    data_offsets: [begin, end],
  });

  await t.step("truncated file", async () => {
    const path = join(dir, "truncated.safetensors");
    await writeSafetensors(path, good);
    const bytes = await Deno.readFile(path);
    await Deno.writeFile(path, bytes.subarray(0, bytes.byteLength - 4));
    await assertOpenFails(
      path,
      /tensor "beta": data_offsets \[8, 20\] run past the end of the data area \(16 bytes\)/,
    );
    await Deno.writeFile(path, bytes.subarray(0, 5));
    await assertOpenFails(path, /only 5 bytes long/);
  });

  await t.step("truncated after open: the read names the tensor", async () => {
    const path = join(dir, "shrinks.safetensors");
    await writeSafetensors(path, good);
    const file = await SafetensorsFile.open(path);
    const bytes = await Deno.readFile(path);
    await Deno.writeFile(path, bytes.subarray(0, bytes.byteLength - 4));
    await assert.rejects(
      file.readBytes("beta"),
      /shrinks\.safetensors: the file ends at byte \d+, inside tensor "beta"/,
    );
    file.close();
    await assert.rejects(file.readBytes("alpha"), /shrinks\.safetensors: the file changed size/);
  });

  await t.step("header length past the end of the file", async () => {
    const path = await writeRaw(
      join(dir, "long-header.safetensors"),
      { alpha: f32(0, 8) },
      8,
      1n << 40n,
    );
    await assertOpenFails(path, /header length 1099511627776 runs past the end of the file/);
  });

  await t.step("invalid JSON", async () => {
    const path = await writeRaw(join(dir, "bad-json.safetensors"), '{"alpha": {"dtype": "F32",', 0);
    await assertOpenFails(path, /header is not valid JSON/);
  });

  await t.step("offsets outside the data area", async () => {
    const path = await writeRaw(join(dir, "outside.safetensors"), {
      alpha: f32(0, 8),
      beta: f32(8, 24),
    }, 16);
    await assertOpenFails(
      path,
      /tensor "beta": data_offsets \[8, 24\] run past the end of the data area/,
    );
  });

  await t.step("overlapping offsets", async () => {
    const path = await writeRaw(join(dir, "overlap.safetensors"), {
      alpha: f32(0, 8),
      beta: f32(4, 12),
    }, 12);
    await assertOpenFails(path, /tensor "beta" data_offsets \[4, 12\] overlap tensor "alpha"/);
  });

  await t.step("gap and trailing bytes that belong to no tensor", async () => {
    const gap = await writeRaw(join(dir, "gap.safetensors"), {
      alpha: f32(0, 8),
      beta: f32(12, 20),
    }, 20);
    await assertOpenFails(gap, /data bytes \[8, 12\) before tensor "beta" belong to no tensor/);
    const tail = await writeRaw(join(dir, "tail.safetensors"), { alpha: f32(0, 8) }, 12);
    await assertOpenFails(tail, /4 trailing data bytes after the last tensor "alpha"/);
  });

  await t.step("shape, dtype and byte length disagree", async () => {
    const path = await writeRaw(join(dir, "mismatch.safetensors"), { alpha: f32(0, 8, [3]) }, 8);
    await assertOpenFails(
      path,
      /tensor "alpha": shape \[3\] of F32 needs 12 bytes, but data_offsets \[0, 8\] span 8/,
    );
  });

  await t.step("unknown dtype", async () => {
    const header = { alpha: { dtype: "F8_E5M2", shape: [8], data_offsets: [0, 8] } };
    const path = await writeRaw(join(dir, "fp8.safetensors"), header, 8);
    await assertOpenFails(path, /tensor "alpha" has unknown dtype "F8_E5M2"; supported: F64, F32/);
  });

  await t.step("malformed shape, offsets and metadata", async () => {
    const shape = await writeRaw(join(dir, "shape.safetensors"), { alpha: f32(0, 8, [-2]) }, 8);
    await assertOpenFails(
      shape,
      /tensor "alpha": shape \[-2\] is not a list of non-negative integers/,
    );
    const offsets = await writeRaw(join(dir, "offsets.safetensors"), {
      alpha: { dtype: "F32", shape: [2], data_offsets: [8] },
    }, 8);
    await assertOpenFails(offsets, /tensor "alpha": data_offsets \[8\] is not \[begin, end\]/);
    const metadata = await writeRaw(
      join(dir, "meta.safetensors"),
      { __metadata__: { step: 3 } },
      0,
    );
    await assertOpenFails(
      metadata,
      /"__metadata__" key "step" holds 3; metadata values must be strings/,
    );
  });

  await t.step("missing key lists the closest keys", async () => {
    const file = await SafetensorsFile.open(QWEN3_SHARD1);
    try {
      assert.throws(() => file.info("model.embed_token.weight"), (error: Error) => {
        assert.ok(error.message.includes(QWEN3_SHARD1));
        assert.match(
          error.message,
          /no tensor "model\.embed_token\.weight"\. Closest keys: "model\.embed_tokens\.weight"/,
        );
        return true;
      });
      assert.equal(file.has("model.embed_token.weight"), false);
      await assert.rejects(file.readF32("lm_head.weight"), /no tensor "lm_head\.weight"/);
    } finally {
      file.close();
    }
  });

  await t.step("missing file", async () => {
    await assertOpenFails(join(dir, "absent.safetensors"), /no such file/);
  });

  await Deno.remove(dir, { recursive: true });
});

Deno.test("writeSafetensors rejects bad input before touching the disk", async () => {
  const dir = await Deno.makeTempDir();
  const path = join(dir, "out.safetensors");
  const cases: Array<[TensorToWrite[], RegExp]> = [
    [
      [{ name: "w", dtype: "F32", shape: [3], data: new Float32Array(2) }],
      /tensor "w": shape \[3\] of F32 needs 12 bytes, but its data has 8/,
    ],
    [
      [{ name: "w", dtype: "BF16", shape: [2], data: new Float32Array(2) }],
      /tensor "w": dtype BF16 takes a Uint16Array/,
    ],
    [
      [{ name: "w", dtype: "F32", shape: [1.5], data: new Float32Array(1) }],
      /tensor "w": shape \[1\.5\]/,
    ],
    [
      [{ name: "w", dtype: "Q4" as "U8", shape: [1], data: new Uint8Array(1) }],
      /tensor "w" has unknown dtype "Q4"/,
    ],
    [[{ name: "w", dtype: "U8", shape: [1], data: new Uint8Array(1) }, {
      name: "w",
      dtype: "U8",
      shape: [1],
      data: new Uint8Array(1),
    }], /tensor "w": names must be non-empty, unique/],
  ];
  for (const [tensors, pattern] of cases) {
    await assert.rejects(writeSafetensors(path, tensors), (error: Error) => {
      assert.ok(error.message.includes(path));
      assert.match(error.message, pattern);
      return true;
    });
  }
  await assert.rejects(
    writeSafetensors(path, [], { step: 3 as unknown as string }),
    /"__metadata__" key "step"/,
  );
  assert.deepEqual(await Array.fromAsync(Deno.readDir(dir)), []);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("writes are atomic: the old file survives until the new one is complete", async () => {
  const dir = await Deno.makeTempDir();
  const path = join(dir, "model.safetensors");
  await writeSafetensors(path, [{
    name: "w",
    dtype: "F32",
    shape: [1],
    data: new Float32Array([1]),
  }]);
  const old = await Deno.readFile(path);

  // `data` is read once to build the header and again while writing: on that second read the
  // write is in progress, so the target must still hold the old file and a temp file must exist.
  let reads = 0;
  let seenMidWrite = false;
  const watched = (fail: boolean): TensorToWrite => ({
    name: "w",
    dtype: "F32",
    shape: [2],
    get data() {
      if (++reads % 2 === 0) {
        assert.deepEqual(Deno.readFileSync(path), old);
        assert.equal([...Deno.readDirSync(dir)].filter((e) => e.name.includes(".tmp-")).length, 1);
        seenMidWrite = true;
        if (fail) throw new Error("disk full (simulated)");
      }
      return new Float32Array([2, 3]);
    },
  });

  await assert.rejects(writeSafetensors(path, [watched(true)]), /disk full \(simulated\)/);
  assert.ok(seenMidWrite);
  assert.deepEqual(await Deno.readFile(path), old);
  assert.deepEqual(await tmpFiles(dir), []);

  seenMidWrite = false;
  await writeSafetensors(path, [watched(false)]);
  assert.ok(seenMidWrite);
  assert.deepEqual(await tmpFiles(dir), []);
  const file = await SafetensorsFile.open(path);
  assert.deepEqual([...await file.readF32("w")], [2, 3]);
  file.close();

  // A failing rename (the target is a folder) also cleans up and leaves the folder alone.
  const folder = join(dir, "folder.safetensors");
  await Deno.mkdir(folder);
  await assert.rejects(writeSafetensors(folder, []));
  assert.ok((await Deno.stat(folder)).isDirectory);
  assert.deepEqual(await tmpFiles(dir), []);
  await Deno.remove(dir, { recursive: true });
});
