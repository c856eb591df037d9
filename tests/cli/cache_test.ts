import assert from "node:assert/strict";
import { join } from "node:path";
import { UsageError } from "../../src/cli/args.ts";
import { makeCacheCommand, type OpenedTeacher } from "../../src/cli/cache.ts";
import { runCache } from "../../src/data/cache_job.ts";
import { DataError } from "../../src/data/captions.ts";
import { type CacheManifest, MANIFEST_FILE } from "../../src/data/cache_format.ts";
import {
  fakeTeacher,
  type FakeTeacherOptions,
  readTree,
  writeSampleJsonl,
} from "../data/fake_teacher.ts";
import {
  assertLinkRefused,
  firstLine,
  IS_ROOT,
  rejectsAs,
  TINY_DISK_IGNORED,
  withTempDir,
  withTinyDisk,
} from "../helpers.ts";

const FAKE_RUN = new URL("./cache_fake_run.ts", import.meta.url).pathname;

/** `deno` arguments running the cache command in a subprocess that may write only `writable`. */
function fakeRunArgs(writable: string, haltAfterBatches: number, cacheArgs: string[]): string[] {
  return [
    "run",
    "--allow-read",
    `--allow-write=${writable}`,
    FAKE_RUN,
    String(haltAfterBatches),
    ...cacheArgs,
  ];
}

function commandWith(options: FakeTeacherOptions = {}) {
  const opened: string[] = [];
  const command = makeCacheCommand((sdxl): Promise<OpenedTeacher> => {
    opened.push(sdxl);
    return Promise.resolve({ teacher: fakeTeacher(options), close() {} });
  });
  return { command, opened };
}

/** Runs `run` with console.log and console.error collected instead of printed. */
async function captureConsole(
  run: () => Promise<void>,
): Promise<{ out: string; err: string; error?: Error }> {
  const { log, error } = console;
  const out: string[] = [];
  const err: string[] = [];
  console.log = (...parts: unknown[]) => out.push(parts.join(" "));
  console.error = (...parts: unknown[]) => err.push(parts.join(" "));
  try {
    await run();
    return { out: out.join("\n"), err: err.join("\n") };
  } catch (thrown) {
    return { out: out.join("\n"), err: err.join("\n"), error: thrown as Error };
  } finally {
    console.log = log;
    console.error = error;
  }
}

/** `captureConsole`, failing the test if `run` throws. */
async function quietly(run: () => Promise<void>): Promise<{ out: string; err: string }> {
  const result = await captureConsole(run);
  if (result.error) throw result.error;
  return result;
}

async function readManifest(dir: string): Promise<CacheManifest> {
  return JSON.parse(await Deno.readTextFile(join(dir, MANIFEST_FILE)));
}

async function assertSameTree(actual: string, expected: string): Promise<void> {
  const [a, b] = [await readTree(actual), await readTree(expected)];
  assert.deepEqual([...a.keys()], [...b.keys()], "file names differ");
  for (const [name, bytes] of b) assert.deepEqual(a.get(name), bytes, `${name} differs`);
}

Deno.test("cache --help names every option and gives an example", async () => {
  const { out } = await quietly(() => commandWith().command.run(["--help"]));
  for (
    const flag of [
      "--data",
      "--format",
      "--caption-field",
      "--spright",
      "--dedupe",
      "--limit",
      "--sdxl",
      "--out",
      "--batch-size",
      "--rows-per-shard",
      "--shard",
      "--merge",
      "--verify",
      "Example",
      "--allow-write=<out>",
    ]
  ) assert.ok(out.includes(flag), `${flag} missing from --help`);
});

Deno.test("cache: computes, reports progress, verifies and resumes through the command", async () => {
  await withTempDir(async (dir) => {
    const data = await writeSampleJsonl(dir, 22);
    const out = join(dir, "out");
    const lines: string[] = [];
    const teacher = fakeTeacher();
    const options = { data, out, batchSize: 4, rowsPerShard: 4, limit: 18 };
    const manifest = await runCache(options, teacher, (line) => lines.push(line));
    assert.equal(teacher.encoded, 18);
    assert.deepEqual([manifest.rows, manifest.shardCount, manifest.complete], [18, 5, true]);
    assert.deepEqual(manifest.source, { data, dedupe: false, format: "jsonl", limit: 18 });
    assert.equal(lines[0], `cache: 18 captions (the first 18 of 22) from ${data} (jsonl)`);
    assert.match(lines[1], /^cache: 0\/18 rows \(0\.0%\), 0\/5 shards, 0\.0 rows\/s, ETA -$/);
    assert.match(
      lines.at(-2)!,
      /^cache: 18\/18 rows \(100\.0%\), 5\/5 shards, [\d.]+ rows\/s, ETA 0s$/,
    );
    assert.equal(lines.at(-1), `cache: 18 rows in 5 shards, complete: ${out}`);

    const { command, opened } = commandWith();
    const args = ["--data", data, "--sdxl", "sdxl", "--out", out, "--limit", "18"];
    const { err } = await quietly(() => command.run(args));
    assert.deepEqual(opened, ["sdxl"]);
    assert.match(err, /cache: 18\/18 rows \(100\.0%\), 5\/5 shards, 0\.0 rows\/s/);

    const verified = await quietly(() => command.run(["--verify", "--out", out]));
    assert.equal(verified.out, `${out}: 18 rows, 5 shards, 5 checked\nOK`);
    const shard = join(out, "targets-00003.safetensors");
    const bytes = await Deno.readFile(shard);
    bytes[100] ^= 1;
    await Deno.writeFile(shard, bytes);
    const failed = await captureConsole(() => command.run(["--verify", "--out", out]));
    assert.equal(failed.error?.message, `${out}: 1 problem(s), 0 missing shard(s)`);
    assert.match(failed.out, /^problem: .*targets-00003\.safetensors: SHA-256 /m);
    assert.match(failed.out, /\nFAILED$/);
  });
});

Deno.test("cache --shard 0/2 and 1/2, then --merge, equal one run", async () => {
  await withTempDir(async (dir) => {
    const data = await writeSampleJsonl(dir, 13);
    const [whole, split] = [join(dir, "whole"), join(dir, "split")];
    const { command } = commandWith();
    const common = ["--data", data, "--sdxl", "m", "--rows-per-shard", "3", "--batch-size", "2"];
    await quietly(() => command.run([...common, "--out", whole]));
    const lines: string[] = [];
    await runCache(
      { data, out: split, batchSize: 2, rowsPerShard: 3, worker: { index: 1, count: 2 } },
      fakeTeacher(),
      (line) => lines.push(line),
    );
    assert.match(lines.at(-1)!, /worker 1\/2 finished its 2 shards .* --merge --out <folder>$/);
    await quietly(() => command.run([...common, "--out", split, "--shard", "0/2"]));
    const merged = await quietly(() => command.run(["--merge", "--out", split]));
    assert.equal(merged.out, `${split}: merged 5 shards, 13 rows`);
    await assertSameTree(split, whole);
  });
});

Deno.test("cache: bad data, another teacher's cache and bad options fail with the fix", async () => {
  await withTempDir(async (dir) => {
    const { command, opened } = commandWith();
    const empty = await writeSampleJsonl(dir, 0);
    const out = join(dir, "out");
    await rejectsAs(
      () => command.run(["--data", empty, "--sdxl", "m", "--out", out]),
      DataError,
      `${empty}: no captions found`,
      "Fix:",
    );
    assert.deepEqual(opened, [], "the teacher was loaded before the captions were read");

    const data = await writeSampleJsonl(dir, 5);
    await quietly(() => command.run(["--data", data, "--sdxl", "m", "--out", out]));
    const other = commandWith({ identity: { "text_encoder/model.safetensors": "sha256:v2" } });
    await rejectsAs(
      () => other.command.run(["--data", data, "--sdxl", "m2", "--out", out]),
      Error,
      `${join(out, MANIFEST_FILE)} holds targets of another teacher`,
      'identity["text_encoder/model.safetensors"]: cache "sha256:fake-l", this run "sha256:v2"',
      "Fix: use a new --out folder",
    );
    assert.equal(
      (await readManifest(out)).teacher.identity["text_encoder/model.safetensors"],
      "sha256:fake-l",
    );

    const base = ["--data", data, "--sdxl", "m", "--out", out];
    const usage: [string[], string][] = [
      [["--data", data, "--sdxl", "m"], "--out <folder> is required"],
      [["--out", out, "--sdxl", "m"], "--data <path> is required"],
      [["--out", out, "--data", data], "--sdxl <folder> is required"],
      [[...base, "--shard", "2/2"], '--shard "2/2" is not i/n with 0 <= i < n'],
      [[...base, "--shard", "1"], '--shard "1" is not i/n'],
      [[...base, "--batch-size", "0"], '--batch-size "0" is not a positive integer'],
      [[...base, "--limit", "1.5"], '--limit "1.5" is not a positive integer'],
      [[...base, "--format", "yaml"], '--format "yaml": expected kohya, lines'],
      [["--verify", "--out", out, "--data", data], "--verify takes only --out (got --data)"],
      [["--verify", "--merge", "--out", out], "give --verify or --merge, not both"],
      [[...base, "--bogus"], "cache: Unknown option '--bogus'"],
    ];
    for (const [args, message] of usage) {
      await rejectsAs(() => command.run(args), UsageError, message);
    }
  });
});

Deno.test("cache: a run killed with SIGKILL resumes to the bytes of an uninterrupted run", async () => {
  await withTempDir(async (dir) => {
    const data = await writeSampleJsonl(dir, 40);
    const [whole, killed] = [join(dir, "whole"), join(dir, "killed")];
    const common = ["--data", data, "--sdxl", "m", "--batch-size", "2", "--rows-per-shard", "4"];
    const { command } = commandWith();
    await quietly(() => command.run([...common, "--out", whole]));

    // 10 shards of 2 batches: the child halts as it starts batch 7 (shard 3) and is killed there.
    const child = new Deno.Command(Deno.execPath(), {
      args: fakeRunArgs(dir, 6, [...common, "--out", killed]),
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const said = await firstLine(child);
    assert.equal(said, "ready 6", "the cache process ended before it could be killed");
    child.kill("SIGKILL");
    const status = await child.status;
    assert.equal(status.signal, "SIGKILL");
    const partial = await readManifest(killed);
    assert.equal(partial.complete, false, "the run finished before it was killed");
    const done = partial.shards.length;
    assert.ok(done >= 1 && done < 10, `${done} shards recorded`);

    const resumed = await new Deno.Command(Deno.execPath(), {
      args: fakeRunArgs(dir, 0, [...common, "--out", killed]),
      stdout: "null",
      stderr: "piped",
    }).output();
    const log = new TextDecoder().decode(resumed.stderr);
    assert.equal(resumed.code, 0, log);
    const first = /cache: (\d+)\/40 rows/.exec(log);
    assert.ok(first && Number(first[1]) >= 4 * done, `finished shards were not kept:\n${log}`);
    await assertSameTree(killed, whole);
  });
});

Deno.test("cache: a write outside the permitted folder names the fix", async () => {
  await withTempDir(async (dir) => {
    const data = await writeSampleJsonl(dir, 3);
    const allowed = join(dir, "cache");
    await Deno.mkdir(allowed);
    const out = join(dir, "elsewhere");
    const result = await new Deno.Command(Deno.execPath(), {
      args: fakeRunArgs(allowed, 0, ["--data", data, "--sdxl", "m", "--out", out]),
      stdout: "null",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(result.stderr);
    assert.equal(result.code, 1, err);
    assert.match(err, /may write only under \.\/cache\. Fix: use --out cache\/<name>/);
  });
});

Deno.test("cache: a link in the permitted folder leading outside is refused before reading captions", async () => {
  // No captions file: the output check must come first.
  await assertLinkRefused("cache", ({ root, allowed, link }) =>
    fakeRunArgs(allowed, 0, [
      ...["--data", join(root, "missing.jsonl"), "--sdxl", "m"],
      ...["--out", join(link, "c")],
    ]));
});

Deno.test({
  name: "cache: a full disk names the file being written and the fix" + TINY_DISK_IGNORED,
  ignore: !IS_ROOT,
  async fn() {
    await withTempDir(async (dir) => {
      const data = await writeSampleJsonl(dir, 40);
      await withTinyDisk(16 << 10, async (disk) => {
        const { command } = commandWith();
        const out = join(disk, "c");
        const { error } = await captureConsole(() =>
          command.run(["--data", data, "--sdxl", "m", "--out", out])
        );
        assert.match(
          error?.message ?? "",
          new RegExp(`^${out}/targets-00000\\.safetensors: the disk is full .*free space`),
        );
      });
    });
  },
});
