import assert from "node:assert/strict";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { DataError } from "../../src/data/collect.ts";
import { type TarMember, tarMembers } from "../../src/data/tar.ts";
import { splitSampleName } from "../../src/data/webdataset.ts";
import { withTempDir } from "../helpers.ts";
import { tarBytes, tarHeader } from "./tar_fixture.ts";

const decoder = new TextDecoder();

async function members(path: string): Promise<{ name: string; text: string }[]> {
  const out: { name: string; text: string }[] = [];
  for await (const member of tarMembers(path)) {
    out.push({ name: member.name, text: decoder.decode(await member.read()) });
  }
  return out;
}

async function tarError(bytes: Uint8Array): Promise<string> {
  let message = "";
  await withTempDir(async (dir) => {
    const path = join(dir, "shard.tar");
    await Deno.writeFile(path, bytes);
    await assert.rejects(members(path), (error: Error) => {
      assert.ok(error instanceof DataError, `expected a DataError, got ${error}`);
      assert.ok(error.message.startsWith(path), error.message);
      message = error.message;
      return true;
    });
  });
  return message;
}

Deno.test("tar: ustar members, prefix field, pax path, global pax, GNU long name, base-256 size", async () => {
  const longName = `${"deep/".repeat(30)}sample.json`;
  const paxName = `data/ünïcode/${"x".repeat(120)}.json`;
  const bytes = tarBytes([
    // `git archive` starts with a global pax header: metadata, not a member.
    {
      name: "pax_global_header",
      data: "52 comment=0123456789012345678901234567890123456789\n",
      options: { type: "g" },
    },
    { name: "0.jpg", data: "JPEG" },
    { name: "0.json", data: '{"a":1}' },
    { name: "1.json", data: "prefixed", options: { prefix: "data/9" } },
    { name: "folder/", data: "", options: { type: "5" } },
    { gnuLongName: longName },
    { name: "././@LongLink-ignored", data: "gnu" },
    { pax: { path: paxName, comment: "x" } },
    { name: "short-name-overridden", data: "pax" },
    { name: "big.json", data: "base256", options: { base256Size: true } },
  ]);
  await withTempDir(async (dir) => {
    const path = join(dir, "a.tar");
    await Deno.writeFile(path, bytes);
    assert.deepEqual(await members(path), [
      { name: "0.jpg", text: "JPEG" },
      { name: "0.json", text: '{"a":1}' },
      { name: "data/9/1.json", text: "prefixed" },
      { name: longName, text: "gnu" },
      { name: paxName, text: "pax" },
      { name: "big.json", text: "base256" },
    ]);
  });
});

Deno.test("tar: a pax size record overrides the header size", async () => {
  const data = "0123456789";
  const bytes = tarBytes([{ pax: { size: "4" } }, { name: "a.txt", data }]);
  // The header still says 10 bytes; the pax record says 4, so only "0123" is the member.
  await withTempDir(async (dir) => {
    const path = join(dir, "a.tar");
    await Deno.writeFile(path, bytes);
    const seen: TarMember[] = [];
    for await (const member of tarMembers(path)) seen.push(member);
    assert.equal(seen.length, 1);
    assert.equal(seen[0].size, 4);
  });
});

Deno.test("tar: a 3 GiB member is skipped by seeking, never read", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "sparse.tar");
    const imageSize = 3 * 1024 ** 3; // past 2^31: offsets must not wrap
    const file = await Deno.open(path, { write: true, create: true });
    await file.write(tarHeader("0.jpg", imageSize));
    await file.seek(512 + imageSize, Deno.SeekMode.Start); // a hole: the file is sparse
    const tail = tarBytes([{ name: "0.json", data: '{"caption":"far away"}' }]);
    await file.write(tail);
    file.close();
    const before = Deno.memoryUsage().rss;
    const started = performance.now();
    const out: string[] = [];
    for await (const member of tarMembers(path)) {
      if (member.name.endsWith(".json")) out.push(decoder.decode(await member.read()));
    }
    assert.deepEqual(out, ['{"caption":"far away"}']);
    assert.ok(performance.now() - started < 5000, "skipping must not read the image");
    assert.ok(Deno.memoryUsage().rss - before < 512 * 1024 ** 2, "the image must not be loaded");
  });
});

Deno.test("tar: corrupt header names the file and byte offset", async () => {
  const bytes = tarBytes([{ name: "0.jpg", data: "JPEG" }, { name: "0.json", data: "{}" }]);
  bytes[1024 + 10] ^= 0xff; // second header (after 512 header + 512 data) loses its checksum
  const message = await tarError(bytes);
  assert.match(message, /byte offset 1024: not a tar header \(checksum mismatch\)/);
  assert.match(message, /Fix: download or write the shard again/);
});

Deno.test("tar: member data cut short names the member, offset and file end", async () => {
  const bytes = tarBytes([{ name: "0.jpg", data: new Uint8Array(2000) }]);
  const message = await tarError(bytes.subarray(0, 1200));
  assert.match(
    message,
    /byte offset 0: member "0\.jpg" needs 2000 bytes but the file ends at byte 1200 \(truncated\)/,
  );
});

Deno.test("tar: a file ending inside a header is truncated", async () => {
  const bytes = tarBytes([{ name: "0.json", data: "{}" }]);
  const message = await tarError(bytes.subarray(0, 1024 + 100));
  assert.match(message, /byte offset 1024: the file ends inside a tar header \(truncated\)/);
});

Deno.test("tar: a non-tar file is rejected at offset 0, plain or gzip", async () => {
  const text = new TextEncoder().encode("caption\n".repeat(100));
  assert.match(await tarError(text), /: byte offset 0: not a tar header/);
  assert.match(await tarError(gzipSync(text)), /: inflated tar byte offset 0: not a tar header/);
});

Deno.test("tar: gzip members stream through; the inflated data cut short names the member", async () => {
  const bytes = tarBytes([
    { name: "0.jpg", data: new Uint8Array(5000).fill(7) },
    { name: "0.json", data: '{"a":1}' },
    { name: "1.jpg", data: new Uint8Array(2000) },
  ]);
  await withTempDir(async (dir) => {
    const path = join(dir, "a.tar.gz");
    await Deno.writeFile(path, gzipSync(bytes));
    const seen: { name: string; offset: number; text?: string }[] = [];
    for await (const member of tarMembers(path)) {
      const text = member.name.endsWith(".json") ? decoder.decode(await member.read()) : undefined;
      seen.push({ name: member.name, offset: member.offset, text });
    }
    assert.deepEqual(seen, [
      { name: "0.jpg", offset: 0, text: undefined },
      { name: "0.json", offset: 5632, text: '{"a":1}' },
      { name: "1.jpg", offset: 6656, text: undefined },
    ]);
  });
  assert.match(
    await tarError(gzipSync(bytes.subarray(0, 6656 + 512 + 1000))),
    /: inflated tar byte offset 6656: member "1\.jpg" needs 2000 bytes but the inflated tar ends at byte 8168 \(truncated\)/,
  );
});

Deno.test("tar: an archive without end blocks and an empty file read as complete", async () => {
  const bytes = tarBytes([{ name: "0.json", data: "{}" }]);
  await withTempDir(async (dir) => {
    const cut = join(dir, "cut.tar");
    await Deno.writeFile(cut, bytes.subarray(0, 1024));
    assert.deepEqual(await members(cut), [{ name: "0.json", text: "{}" }]);
    const empty = join(dir, "empty.tar");
    await Deno.writeFile(empty, new Uint8Array(0));
    assert.deepEqual(await members(empty), []);
  });
});

function hasGnuTar(): boolean {
  try {
    return new Deno.Command("tar", { args: ["--version"] }).outputSync().success;
  } catch {
    return false;
  }
}

Deno.test({
  name: "tar: archives written by GNU tar (gnu, pax, ustar formats) read back the same",
  ignore: !hasGnuTar(),
  fn: async () => {
    await withTempDir(async (dir) => {
      const src = join(dir, "src");
      const longDir = `${"long-folder-name/".repeat(7)}leaf`; // > 100 bytes, < 155 for ustar
      const files: Record<string, string> = {
        "0.jpg": "JPEG bytes",
        "0.json": '{"spatial_caption":"a cat left of a dog"}',
        [`${longDir}/1.json`]: '{"original_caption":"two pets"}',
        "café/2.json": '{"caption":"ünïcode name"}',
      };
      for (const [rel, text] of Object.entries(files)) {
        await Deno.mkdir(join(src, rel, ".."), { recursive: true });
        await Deno.writeTextFile(join(src, rel), text);
      }
      for (const format of ["gnu", "pax", "ustar"]) {
        const path = join(dir, `${format}.tar`);
        const result = await new Deno.Command("tar", {
          args: [`--format=${format}`, "-cf", path, "-C", src, ...Object.keys(files)],
        }).output();
        assert.ok(result.success, decoder.decode(result.stderr));
        const read = Object.fromEntries((await members(path)).map((m) => [m.name, m.text]));
        assert.deepEqual(read, files, format);
      }
    });
  },
});

Deno.test("webdataset key/extension split follows the first dot of the file name", () => {
  assert.deepEqual(splitSampleName("data/9/0.metadata.json"), {
    key: "data/9/0",
    ext: "metadata.json",
  });
  assert.deepEqual(splitSampleName("./a.b/123.json"), { key: "a.b/123", ext: "json" });
  assert.deepEqual(splitSampleName("noext"), { key: "noext", ext: "" });
});
