import assert from "node:assert/strict";
import { Gpu, grid1d } from "../../src/gpu/device.ts";
import { sizeClass } from "../../src/gpu/pool.ts";
import { add, addInPlace } from "../../src/ops/elementwise.ts";
import { testGpu } from "../helpers.ts";

Deno.test("upload and read round-trip every dtype, odd lengths included", async () => {
  const gpu = await testGpu();
  const f = new Float32Array([1.5, -2, 3.25]);
  const h = new Uint16Array([0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000]);
  const u = new Uint32Array([0, 1, 0xffffffff]);
  const i = new Int32Array([-5, 7]);
  const b = new Uint8Array([1, 2, 3, 4, 5, 6, 255]);
  const ts = [
    gpu.upload(f, [3], "f32"),
    gpu.upload(h, [5], "f16"),
    gpu.upload(h, [5], "bf16"),
    gpu.upload(u, [3], "u32"),
    gpu.upload(i, [2], "i32"),
    gpu.upload(b, [7], "u8"),
  ];
  const got = await gpu.readAll(ts);
  assert.deepEqual(got, [f, h, h, u, i, b]);
  for (const t of ts) t.destroy();
});

Deno.test("zeros clears pooled memory that held data", async () => {
  const gpu = await testGpu();
  const dirty = gpu.upload(new Float32Array(100).fill(7), [100], "f32");
  dirty.destroy();
  const z = gpu.zeros([100], "f32");
  assert.deepEqual(await gpu.read(z), new Float32Array(100));
  z.destroy();
});

Deno.test("a destroyed tensor's buffer is reused and using it afterwards fails clearly", async () => {
  const gpu = await testGpu();
  const a = gpu.empty([1000], "f32", "first");
  const buffer = a.buffer;
  a.destroy();
  const b = gpu.empty([900], "f32", "second");
  assert.equal(b.buffer, buffer, "same size class is reused");
  assert.throws(() => a.buffer, /tensor 'first' was used after destroy/);
  b.destroy();
});

Deno.test("many dispatches are one submission; a read flushes them", async () => {
  const gpu = await testGpu();
  const x = gpu.upload(new Float32Array([1, 2, 3]), [3], "f32");
  const before = gpu.stats;
  let acc = x;
  for (let k = 0; k < 10; k++) acc = add(gpu, acc, x);
  assert.deepEqual(await gpu.read(acc), new Float32Array([11, 22, 33]));
  const after = gpu.stats;
  assert.equal(after.dispatches - before.dispatches, 10);
  assert.equal(after.submits - before.submits, 1);
});

Deno.test("a binding over the device limit names the tensor and the limit", async () => {
  const gpu = await testGpu();
  const limit = gpu.maxBindingBytes;
  const big = gpu.empty([limit / 4 + 64], "f32", "embed_tokens");
  assert.throws(
    () => big.binding(),
    (err: Error) =>
      /embed_tokens/.test(err.message) && err.message.includes(String(limit)) &&
      /maxStorageBufferBindingSize/.test(err.message),
  );
  big.destroy();
});

Deno.test("upload checks the byte length against the shape", async () => {
  const gpu = await testGpu();
  assert.throws(
    () => gpu.upload(new Float32Array(5), [2, 3], "f32", "w"),
    /upload of 'w': 20 bytes given for \[2,3\] f32 \(24 expected\)/,
  );
});

Deno.test("a WGSL error surfaces at the next read with the compiler's message", async () => {
  const gpu = await testGpu();
  const out = gpu.empty([4], "f32");
  gpu.dispatch({
    kernel: { name: "broken", code: "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }" },
    bindings: [],
    workgroups: [1],
  });
  await assert.rejects(gpu.read(out), /WebGPU error/);
  out.destroy();
});

Deno.test("grid1d wraps onto y past 65535 workgroups", async () => {
  const gpu = await testGpu();
  assert.deepEqual(grid1d(gpu, 1000, 256), [4, 1, 1]);
  const max = gpu.limits.maxComputeWorkgroupsPerDimension;
  const [x, y] = grid1d(gpu, max * 256 + 1, 256);
  assert.equal(x, max);
  assert.equal(y, 2);
});

Deno.test("size classes never undershoot; small ones are 2^k or 3·2^(k-2), large ones whole MiB", () => {
  for (const n of [1, 16, 17, 100, 4096, 5000, 6144, 6145, 1e6]) {
    const c = sizeClass(n);
    assert.ok(c >= n && c < 1.5 * Math.max(n, 16) + 1, `${n} -> ${c}`);
  }
  for (const n of [4 << 20, 13_107_200, 778_000_000]) {
    const c = sizeClass(n);
    assert.ok(c >= n && c - n < 1 << 20 && c % (1 << 20) === 0, `${n} -> ${c}`);
  }
});

Deno.test("a buffer freed past the pool's cap outlives the recorded work that reads it", async () => {
  const gpu = await Gpu.create({ maxPooledBytes: 0 });
  try {
    const x = gpu.upload(new Float32Array([1, 2, 3]), [3], "f32", "x");
    const y = gpu.upload(new Float32Array([10, 20, 30]), [3], "f32", "y");
    const sum = add(gpu, x, y);
    x.destroy();
    y.destroy();
    const twice = add(gpu, sum, sum);
    assert.deepEqual(await gpu.read(twice), new Float32Array([22, 44, 66]));
    assert.equal(gpu.stats.pooledBytes, 0);
  } finally {
    gpu.destroy();
  }
});

Deno.test("buffers freed past the pool's cap are kept until the next submission, then the stalest go", async () => {
  const gpu = await Gpu.create({ maxPooledBytes: 4096 });
  try {
    const [a, b] = [gpu.empty([1024], "f32", "a"), gpu.empty([1024], "f32", "b")];
    const created = gpu.stats.buffersCreated;
    a.destroy();
    b.destroy();
    assert.equal(gpu.stats.pooledBytes, 8192, "both kept within the pass");
    const c = gpu.zeros([1024], "f32", "c");
    const d = gpu.zeros([1024], "f32", "d");
    assert.equal(gpu.stats.buffersCreated, created, "and reused");
    const lastFreed = c.buffer;
    d.destroy();
    c.destroy();
    await gpu.sync();
    assert.equal(gpu.stats.pooledBytes, 4096, "trimmed to the cap after the submission");
    const e = gpu.empty([1024], "f32", "e");
    assert.equal(e.buffer, lastFreed, "the one freed last stayed");
    e.destroy();
  } finally {
    gpu.destroy();
  }
});

Deno.test("many host writes without GPU work are submitted as they pile up", async () => {
  const gpu = await testGpu();
  const t = gpu.empty([1 << 20], "f32", "target");
  const chunk = new Float32Array(1 << 20).fill(3);
  const before = gpu.stats.submits;
  for (let i = 0; i < 20; i++) gpu.write(t, chunk);
  await gpu.sync();
  assert.ok(gpu.stats.submits === before, "empty submissions are not counted as work");
  assert.equal((await gpu.read(t) as Float32Array)[12345], 3);
  t.destroy();
});

Deno.test("freed buffers of a size class come back oldest first, whatever order they were freed in", async () => {
  const gpu = await testGpu();
  const [a, b, c] = [0, 1, 2].map((i) => gpu.empty([777], "f32", `t${i}`));
  const buffers = [a.buffer, b.buffer, c.buffer];
  const created = gpu.stats.buffersCreated;
  for (const t of [b, c, a]) t.destroy();
  const again = [0, 1, 2].map(() => gpu.empty([777], "f32"));
  const order = again.map((t) => buffers.indexOf(t.buffer));
  assert.ok(order.every((i) => i >= 0), "every buffer is reused");
  assert.deepEqual(order, [...order].sort((x, y) => x - y), "in creation order");
  assert.equal(gpu.stats.buffersCreated, created);
  for (const t of again) t.destroy();
});

Deno.test("a repeated dispatch reuses its bind group; other buffers or params slots get their own", async () => {
  const gpu = await testGpu();
  const x = gpu.upload(new Float32Array([1, 2, 3]), [3], "f32");
  const y = gpu.upload(new Float32Array([4, 5, 6]), [3], "f32");
  const created = () => gpu.stats.bindGroupsCreated;
  const sums = [];
  const start = created();
  sums.push(add(gpu, x, y)); // first use of this pipeline, ring slot 0 and buffers
  await gpu.sync();
  const afterFirst = created();
  sums.push(add(gpu, x, y)); // a new output buffer (and the next params slot)
  sums.push(add(gpu, y, x)); // and the inputs swapped
  const results = await gpu.readAll(sums);
  assert.deepEqual(results, Array(3).fill(new Float32Array([5, 7, 9])));
  assert.equal(afterFirst - start, 1);
  assert.equal(created() - afterFirst, 2, "other bindings, other slots");
  for (const t of sums) t.destroy();
  sums.length = 0;
  const again = created();
  const sum = add(gpu, x, y); // the first output's buffer again, in ring slot 0
  assert.deepEqual(await gpu.read(sum), new Float32Array([5, 7, 9]));
  assert.equal(created(), again, "same pipeline, slot and buffers: cached");
  for (const t of [x, y, sum]) t.destroy();
});

Deno.test("readback staging is kept for small reads and not for one past the cap", async () => {
  const gpu = await testGpu();
  const small = gpu.upload(new Float32Array([1, 2, 3]), [3], "f32");
  const large = gpu.zeros([5 << 20], "f32"); // 20 MiB, over the 16 MiB kept
  const createdBy = async (t: typeof small) => {
    const before = gpu.stats.buffersCreated;
    await gpu.read(t);
    return gpu.stats.buffersCreated - before;
  };
  await createdBy(small);
  assert.equal(await createdBy(small), 0, "the small read's staging buffer is reused");
  assert.equal(await createdBy(large), 1);
  assert.equal(await createdBy(large), 1, "the large one is made for each read");
  assert.deepEqual(await gpu.read(small), new Float32Array([1, 2, 3]));
  small.destroy();
  large.destroy();
});

Deno.test("leading views the first rows in place: writes through it land in the original", async () => {
  const gpu = await testGpu();
  const t = gpu.upload(new Float32Array([1, 2, 3, 4, 5, 6]), [3, 2], "f32", "t");
  const head = t.leading([2, 2]);
  assert.deepStrictEqual([...(await gpu.read(head))], [1, 2, 3, 4]);
  const ones = gpu.upload(new Float32Array(4).fill(1), [2, 2], "f32", "ones");
  addInPlace(gpu, head, ones);
  assert.deepStrictEqual([...(await gpu.read(t))], [2, 3, 4, 5, 5, 6]);
  assert.throws(() => t.leading([4, 2]), /'t' \[3,2\] has no leading \[4,2\]/);
  ones.destroy();
  t.destroy();
});

{
  const gpu = await testGpu();
  const reason = gpu.features.timestampQuery
    ? ""
    : " (ignored: this adapter has no timestamp-query, e.g. llvmpipe through OpenGL)";
  Deno.test({
    name: "startProfile/stopProfile time each dispatch by kernel and change no result" + reason,
    ignore: !gpu.features.timestampQuery,
    async fn() {
      const a = gpu.upload(new Float32Array(1001).fill(1.5), [1001], "f32", "a");
      const b = gpu.upload(new Float32Array(1001).fill(2), [1001], "f32", "b");
      const before = gpu.stats;
      gpu.startProfile();
      assert.throws(() => gpu.startProfile(), /already running/);
      addInPlace(gpu, a, b);
      addInPlace(gpu, a, b);
      const sum = add(gpu, a, b);
      const profile = await gpu.stopProfile();
      const kernels = new Map(profile.kernels.map((k) => [k.kernel, k]));
      assert.equal(kernels.get("elementwise:add_in_place")?.calls, 2);
      assert.equal(kernels.get("elementwise:add")?.calls, 1);
      assert.equal(profile.kernels.reduce((n, k) => n + k.calls, 0), 3);
      assert.equal(profile.untimed, 0);
      for (const k of profile.kernels) assert.ok(k.seconds >= 0 && k.seconds < 10, k.kernel);
      assert.ok(profile.seconds > 0, `${profile.seconds}`);
      assert.equal(gpu.stats.dispatches - before.dispatches, 3);
      assert.deepEqual(await gpu.readF32(sum), new Float32Array(1001).fill(7.5));
      await assert.rejects(() => gpu.stopProfile(), /no profile is running/);
      for (const t of [a, b, sum]) t.destroy();
    },
  });
}
