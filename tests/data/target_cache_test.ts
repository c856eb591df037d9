import assert from "node:assert/strict";
import { join } from "node:path";
import { captionHash } from "../../src/data/captions.ts";
import { f16ToF32, f32ToF16Bits } from "../../src/io/dtype.ts";
import { SafetensorsFile } from "../../src/io/safetensors.ts";
import { buildTargetCache, type BuildTargetCacheOptions } from "../../src/data/cache_build.ts";
import { CacheError, type CacheManifest, MANIFEST_FILE } from "../../src/data/cache_format.ts";
import { mergeCacheManifests, verifyCache } from "../../src/data/cache_merge.ts";
import { openTargetCache } from "../../src/data/target_cache.ts";
import { sha256File } from "../../src/util/hash.ts";
import { rejectsWith, withTempDir } from "../helpers.ts";
import { fakeTeacher, readTree, sampleRows } from "./fake_teacher.ts";

const ROWS = sampleRows(22);
const SOURCE = { data: "captions.jsonl", format: "jsonl", dedupe: false };

/** 22 rows in shards of 5 (the last one short), batches of 2 that do not divide a shard. */
function build(dir: string, extra: Partial<BuildTargetCacheOptions> = {}) {
  return buildTargetCache({
    dir,
    rows: ROWS,
    source: SOURCE,
    teacher: fakeTeacher(),
    batchSize: 2,
    rowsPerShard: 5,
    ...extra,
  });
}

async function assertSameTree(actual: string, expected: string): Promise<void> {
  const [a, b] = [await readTree(actual), await readTree(expected)];
  assert.deepEqual([...a.keys()], [...b.keys()], "file names differ");
  for (const [name, bytes] of b) assert.deepEqual(a.get(name), bytes, `${name} differs`);
}

async function readManifest(dir: string): Promise<CacheManifest> {
  return JSON.parse(await Deno.readTextFile(join(dir, MANIFEST_FILE)));
}

Deno.test("cache: shards, manifest and reader hold the teacher's F16 targets", async () => {
  await withTempDir(async (dir) => {
    const manifest = await build(dir);
    assert.equal(manifest.rows, 22);
    assert.equal(manifest.shardCount, 5);
    assert.equal(manifest.complete, true);
    assert.deepEqual(manifest.shards.map((s) => s.rows), [[0, 5], [5, 10], [10, 15], [15, 20], [
      20,
      22,
    ]]);
    assert.deepEqual(await readManifest(dir), manifest);
    assert.deepEqual([...(await readTree(dir)).keys()], [
      MANIFEST_FILE,
      ...[0, 1, 2, 3, 4].map((k) => `targets-0000${k}.safetensors`),
    ]);
    for (const shard of manifest.shards) {
      assert.equal(shard.sha256, await sha256File(join(dir, shard.file)));
    }

    const last = await SafetensorsFile.open(join(dir, "targets-00004.safetensors"));
    assert.deepEqual(last.info("prompt_embeds").shape, [2, 77, 16]);
    assert.equal(last.info("prompt_embeds").dtype, "F16");
    assert.deepEqual(last.info("pooled").shape, [2, 8]);
    assert.deepEqual(last.info("caption_sha256").shape, [2, 32]);
    assert.deepEqual(JSON.parse(last.metadata.ids), ["captions.jsonl:21", "captions.jsonl:22"]);
    assert.equal(last.metadata.first_row, "20");
    const hashBytes = await last.readBytes("caption_sha256");
    assert.equal(
      Array.from(hashBytes.subarray(32), (b) => b.toString(16).padStart(2, "0")).join(""),
      captionHash(ROWS[21].caption),
    );
    last.close();

    const cache = await openTargetCache(dir);
    assert.deepEqual([cache.rows, cache.seqLen, cache.seqDim, cache.pooledDim], [22, 77, 16, 8]);
    assert.deepEqual(cache.ids, ROWS.map((r) => r.id));
    assert.deepEqual(cache.captions, ROWS.map((r) => r.caption));
    assert.equal(cache.teacher.identity["text_encoder/model.safetensors"], "sha256:fake-l");
    const wanted = [21, 3, 3, 10];
    const { seq, pooled } = await cache.readRows(wanted);
    const reference = await fakeTeacher().encode(wanted.map((i) => ROWS[i].caption));
    const f16 = (values: Float32Array) => values.map((v) => f16ToF32(f32ToF16Bits(v)));
    assert.deepEqual(seq, f16(reference.seq));
    assert.deepEqual(pooled, f16(reference.pooled));
    await rejectsWith(() => cache.readRows([22]), "row 22 is out of range", "22 rows");
  });
});

Deno.test("cache: resuming after a crash gives the bytes of an uninterrupted run", async () => {
  await withTempDir(async (root) => {
    const [whole, resumed] = [join(root, "whole"), join(root, "resumed")];
    await build(whole);
    // Shards take 3 batches (2 + 2 + 1 rows): shards 0 and 1 finish, shard 2 is cut mid-way.
    await rejectsWith(
      () => build(resumed, { teacher: fakeTeacher({ failAfterBatches: 7 }) }),
      "device lost",
    );
    assert.equal((await readManifest(resumed)).shards.length, 2);
    const teacher = fakeTeacher();
    await build(resumed, { teacher });
    assert.equal(teacher.encoded, 22 - 10, "finished shards were computed again");
    await assertSameTree(resumed, whole);

    const again = fakeTeacher();
    await build(resumed, { teacher: again });
    assert.equal(again.encoded, 0);
    await assertSameTree(resumed, whole);
  });
});

Deno.test("cache: a shard renamed but not yet recorded is kept; damaged ones are recomputed", async () => {
  await withTempDir(async (root) => {
    const [whole, dir] = [join(root, "whole"), join(root, "dir")];
    await build(whole);
    await build(dir);
    // Killed after renaming shard 4 but before recording it, and while writing a temp file.
    const manifest = await readManifest(dir);
    manifest.shards.pop();
    manifest.complete = false;
    await Deno.writeTextFile(join(dir, MANIFEST_FILE), JSON.stringify(manifest, null, 2) + "\n");
    await Deno.writeFile(join(dir, "targets-00003.safetensors.tmp-1-abcd1234"), new Uint8Array(9));
    await Deno.writeFile(join(dir, `${MANIFEST_FILE}.tmp-1-abcd1234`), new Uint8Array(3));
    const notes: string[] = [];
    const teacher = fakeTeacher();
    await build(dir, { teacher, log: (line) => notes.push(line) });
    assert.equal(teacher.encoded, 0);
    assert.match(notes.join("\n"), /removed 2 temp file/);
    await assertSameTree(dir, whole);

    // A recorded shard whose bytes changed, and an unrecorded file that is not a shard.
    const shard1 = join(dir, "targets-00001.safetensors");
    const bytes = await Deno.readFile(shard1);
    bytes[bytes.length - 1] ^= 1;
    await Deno.writeFile(shard1, bytes);
    manifest.shards.pop();
    await Deno.writeTextFile(join(dir, MANIFEST_FILE), JSON.stringify(manifest));
    await Deno.writeTextFile(join(dir, "targets-00003.safetensors"), "garbage");
    notes.length = 0;
    const again = fakeTeacher();
    await build(dir, { teacher: again, log: (line) => notes.push(line) });
    assert.equal(again.encoded, 5 + 5);
    assert.match(notes.join("\n"), /targets-00001.safetensors: its size or SHA-256 does not match/);
    assert.match(notes.join("\n"), /targets-00003.safetensors: not a finished shard of this cache/);
    await assertSameTree(dir, whole);
  });
});

Deno.test("cache: refuses a folder holding another teacher's or other captions' targets", async () => {
  await withTempDir(async (dir) => {
    await build(dir, { teacher: fakeTeacher({ failAfterBatches: 1 }) }).catch(() => undefined);
    const other = fakeTeacher({
      identity: { "text_encoder_2/model.safetensors": "sha256:other-g" },
    });
    await rejectsWith(
      () => build(dir, { teacher: other }),
      `${join(dir, MANIFEST_FILE)} holds targets of another teacher`,
      'identity["text_encoder_2/model.safetensors"]: cache "sha256:fake-g", this run "sha256:other-g"',
      "Fix: use a new --out folder",
    );
    await assert.rejects(() => build(dir, { teacher: other }), CacheError);
    await rejectsWith(
      () => build(dir, { teacher: fakeTeacher({ seqDim: 32 }) }),
      '["seqDim"]: cache 16, this run 32',
    );
    await rejectsWith(
      () => build(dir, { rows: ROWS.slice(1) }),
      "holds targets of other captions: 22 rows",
      "this run reads 21 rows",
      "Fix: use a new --out folder",
    );
    await rejectsWith(
      () => build(dir, { rowsPerShard: 6 }),
      "shards of 5, but this run asks for 6",
    );
    // Without --rows-per-shard, a resumed cache keeps its own.
    assert.equal((await build(dir, { rowsPerShard: undefined })).rowsPerShard, 5);
  });
});

Deno.test("cache: refuses teacher output that F16 cannot hold or of the wrong size", async () => {
  await withTempDir(async (dir) => {
    const row = ROWS[7];
    await rejectsWith(
      () => build(dir, { teacher: fakeTeacher({ poison: { caption: row.caption, value: NaN } }) }),
      `prompt_embeds for row 7 (id ${row.id}) holds NaN at element 5`,
      JSON.stringify(row.caption),
    );
    await rejectsWith(
      () => build(dir, { teacher: fakeTeacher({ poison: { caption: row.caption, value: 7e4 } }) }),
      "holds 70000 at element 5, beyond the F16 range",
    );
    const short = {
      ...fakeTeacher(),
      encode: () => Promise.resolve({ seq: new Float32Array(3), pooled: new Float32Array(16) }),
    };
    await rejectsWith(
      () => build(join(dir, "short"), { teacher: short }),
      "returned seq of 3 values for 2 captions",
    );
    await rejectsWith(() => build(join(dir, "none"), { rows: [] }), "no captions");
  });
});

Deno.test("cache: two workers' shards merge into the cache of one run", async () => {
  await withTempDir(async (root) => {
    const [whole, split] = [join(root, "whole"), join(root, "split")];
    await build(whole);
    const first = await build(split, { worker: { index: 0, count: 2 } });
    assert.deepEqual(first.shards.map((s) => s.index), [0, 2, 4]);
    assert.deepEqual(first.worker, { index: 0, count: 2 });
    await rejectsWith(
      () => mergeCacheManifests(split),
      "2 of 5 shards are not finished: 1, 3 (workers 1 of 2)",
    );
    // The other machine, killed once and resumed.
    await build(split, {
      worker: { index: 1, count: 2 },
      teacher: fakeTeacher({ failAfterBatches: 4 }),
    })
      .catch(() => undefined);
    await build(split, { worker: { index: 1, count: 2 } });
    assert.ok((await readTree(split)).has("manifest.part-1-of-2.json"));
    const merged = await mergeCacheManifests(split);
    assert.equal(merged.complete, true);
    await assertSameTree(split, whole);
  });
});

Deno.test("cache: verify finds a flipped byte, NaN and missing shards; the reader refuses NaN", async () => {
  await withTempDir(async (dir) => {
    await build(dir);
    const report = await verifyCache(dir);
    assert.deepEqual(
      {
        ok: report.ok,
        checked: report.shardsChecked,
        problems: report.problems,
        missing: report.missingShards,
      },
      { ok: true, checked: 5, problems: [], missing: [] },
    );

    const path = join(dir, "targets-00002.safetensors");
    const original = await Deno.readFile(path);
    const flipped = original.slice();
    flipped[flipped.length - 40] ^= 0x10;
    await Deno.writeFile(path, flipped);
    const damaged = await verifyCache(dir);
    assert.equal(damaged.ok, false);
    assert.equal(damaged.problems.length, 1);
    assert.match(
      damaged.problems[0],
      /targets-00002\.safetensors: SHA-256 [0-9a-f]{64}, the manifest says/,
    );

    // A NaN in row 12 (local row 2) that the manifest vouches for: only the value scan sees it.
    const file = await SafetensorsFile.open(path);
    const { byteOffset } = file.info("prompt_embeds");
    file.close();
    const poisoned = original.slice();
    const at = byteOffset + 2 * (2 * 77 * 16 + 3);
    new DataView(poisoned.buffer).setUint16(at, 0x7e00, true);
    await Deno.writeFile(path, poisoned);
    const manifest = await readManifest(dir);
    manifest.shards[2].sha256 = await sha256File(path);
    await Deno.writeTextFile(join(dir, MANIFEST_FILE), JSON.stringify(manifest, null, 2));
    const nan = await verifyCache(dir);
    assert.deepEqual(nan.problems, [
      `${path}: prompt_embeds row 12 (id captions.jsonl:13) holds NaN or infinity. Fix: delete ` +
      "the file and rerun the cache to compute it again",
    ]);
    const cache = await openTargetCache(dir);
    await cache.readRows([11, 13]);
    await rejectsWith(
      () => cache.readRows([0, 12]),
      `${path}: prompt_embeds of row 12 (id captions.jsonl:13) holds NaN or infinity`,
    );

    await Deno.remove(path);
    await Deno.writeFile(join(dir, "targets-00001.safetensors.tmp-9-x"), new Uint8Array(1));
    const missing = await verifyCache(dir);
    assert.match(missing.problems[0], /targets-00002\.safetensors: missing/);
    assert.match(missing.warnings[0], /targets-00001\.safetensors\.tmp-9-x: a temp file/);
    await rejectsWith(() => openTargetCache(dir), "targets-00002.safetensors: missing", "--verify");
  });
});

Deno.test("cache: an incomplete cache is refused by the reader and reported by verify", async () => {
  await withTempDir(async (dir) => {
    await build(dir, { teacher: fakeTeacher({ failAfterBatches: 3 }) }).catch(() => undefined);
    await rejectsWith(() => openTargetCache(dir), "the cache is incomplete (1 of 5 shards)");
    const report = await verifyCache(dir);
    assert.deepEqual([report.ok, report.problems, report.missingShards], [false, [], [1, 2, 3, 4]]);
    // A worker's folder only misses that worker's shards.
    await withTempDir(async (part) => {
      await build(part, { worker: { index: 1, count: 2 } });
      const worker = await verifyCache(part);
      assert.deepEqual([worker.ok, worker.shardsChecked, worker.missingShards], [true, 2, []]);
      await rejectsWith(() => openTargetCache(part), "merge the worker manifests first");
    });
  });
  await rejectsWith(() => openTargetCache("/nonexistent-distill-cache"), "compute the cache first");
});
