import assert from "node:assert/strict";
import { join } from "node:path";
import { VERIFIED_SHARDS_FILE } from "../../src/data/cache_verify.ts";
import { buildTargetCache } from "../../src/data/cache_build.ts";
import { MANIFEST_FILE, shardFileName } from "../../src/data/cache_format.ts";
import { openTargetCache } from "../../src/data/target_cache.ts";
import { rejectsWith, withTempDir } from "../helpers.ts";
import { fakeTeacher, sampleRows } from "./fake_teacher.ts";

/** 20 rows in four shards of 5: shards 0 and 1 have ids of the same length (same size). */
function build(dir: string) {
  return buildTargetCache({
    dir,
    rows: sampleRows(20),
    source: { data: "captions.jsonl", format: "jsonl", dedupe: false },
    teacher: fakeTeacher(),
    batchSize: 2,
    rowsPerShard: 5,
  });
}

Deno.test("cache open: a shard changed in place (same size) is refused, naming it and the fix", async () => {
  await withTempDir(async (dir) => {
    await build(dir);
    const path = join(dir, shardFileName(2));
    const bytes = await Deno.readFile(path);
    bytes[bytes.length - 40] ^= 0x10;
    await Deno.writeFile(path, bytes);
    await rejectsWith(
      () => openTargetCache(dir),
      `${path}: SHA-256 `,
      "the manifest says",
      `deno task cache --verify --out ${dir}`,
    );
  });
});

Deno.test("cache open: two swapped shards of the same size are refused", async () => {
  await withTempDir(async (dir) => {
    await build(dir);
    const [a, b] = [join(dir, shardFileName(0)), join(dir, shardFileName(1))];
    assert.equal((await Deno.stat(a)).size, (await Deno.stat(b)).size);
    await Deno.rename(a, `${a}.swap`);
    await Deno.rename(b, a);
    await Deno.rename(`${a}.swap`, b);
    await rejectsWith(() => openTargetCache(dir), `${a}: SHA-256 `, "the manifest says");
  });
});

Deno.test("cache open: verified shards are remembered by size, mtime and inode; a change is seen", async () => {
  await withTempDir(async (dir) => {
    await build(dir);
    const memo = join(dir, "run", VERIFIED_SHARDS_FILE);
    await Deno.mkdir(join(dir, "run"));
    await openTargetCache(dir, { verifiedShardsFile: memo });
    const manifest = JSON.parse(await Deno.readTextFile(join(dir, MANIFEST_FILE)));
    const remembered = JSON.parse(await Deno.readTextFile(memo));
    assert.deepEqual(
      remembered.shards.map((s: { file: string; sha256: string }) => [s.file, s.sha256]),
      manifest.shards.map((s: { file: string; sha256: string }) => [s.file, s.sha256]),
    );
    // A second open trusts the memo; a shard rewritten since (new mtime) is hashed again.
    await openTargetCache(dir, { verifiedShardsFile: memo });
    const path = join(dir, shardFileName(3));
    const bytes = await Deno.readFile(path);
    bytes[bytes.length - 8] ^= 0x01;
    await Deno.writeFile(path, bytes);
    await Deno.utime(path, new Date(), new Date(Date.now() + 5000));
    await rejectsWith(
      () => openTargetCache(dir, { verifiedShardsFile: memo }),
      `${path}: SHA-256 `,
    );
  });
});
