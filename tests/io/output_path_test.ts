import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { writeFileAtomic } from "../../src/io/atomic.ts";
import {
  ioErrorAt,
  OutputPathError,
  prepareOutputFile,
  prepareOutputFolder,
} from "../../src/io/output_path.ts";
import { METRICS_FILE, MetricsLog } from "../../src/train/metrics.ts";
import {
  IS_ROOT,
  rejectsAs,
  rejectsWith,
  TINY_DISK_IGNORED,
  withLinkOutside,
  withTempDir,
  withTinyDisk,
} from "../helpers.ts";

const FIXTURE = fileURLToPath(new URL("./write_into.ts", import.meta.url));

function works(command: string, args: string[]): boolean {
  try {
    return new Deno.Command(command, { args, stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
}

/** Runs the fixture on `out` with `--allow-write` scoped to `allowed`; returns its stderr. */
async function writeInto(out: string, allowed: string, prefix: string[] = [], env = {}) {
  const result = await new Deno.Command(prefix[0] ?? Deno.execPath(), {
    args: [
      ...(prefix.length ? [...prefix.slice(1), Deno.execPath()] : []),
      "run",
      "--no-config",
      "--allow-read",
      `--allow-write=${allowed}`,
      FIXTURE,
      out,
    ],
    env,
    stdout: "null",
    stderr: "piped",
  }).output();
  return { ok: result.success, stderr: new TextDecoder().decode(result.stderr) };
}

Deno.test("output folder: missing parents are made; a file on the way is refused with its path", async () => {
  await withTempDir(async (dir) => {
    await prepareOutputFolder(join(dir, "a", "b", "c"));
    assert.ok((await Deno.stat(join(dir, "a", "b", "c"))).isDirectory);
    await Deno.writeTextFile(join(dir, "file"), "x");
    await rejectsAs(
      () => prepareOutputFolder(join(dir, "file", "run")),
      OutputPathError,
      `${join(dir, "file")} is a file, not a folder`,
    );
  });
});

Deno.test("output file: parent made, an existing file refused unless --force, a folder refused", async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, "out", "cond.safetensors");
    await prepareOutputFile(out);
    assert.deepEqual([...Deno.readDirSync(join(dir, "out"))], [], "the write probe is removed");
    await Deno.writeTextFile(out, "old");
    await rejectsAs(() => prepareOutputFile(out), OutputPathError, `--out ${out}: the file exists`);
    await prepareOutputFile(out, { force: true });
    await rejectsWith(
      () => prepareOutputFile(join(dir, "out")),
      `--out ${join(dir, "out")}: is a folder`,
    );
  });
});

Deno.test("output folder: a link leading outside the allowed folder is refused, naming the link", async () => {
  await withLinkOutside("runs", async ({ allowed, link, outside }) => {
    const through = await writeInto(join(link, "run1"), allowed);
    assert.equal(through.ok, false);
    assert.ok(through.stderr.includes(`${link} is a symbolic link to ${outside}, outside`));
    // A link inside the output folder (e.g. its checkpoints folder) is refused too.
    await Deno.mkdir(join(allowed, "run2"));
    await Deno.symlink(outside, join(allowed, "run2", "checkpoints"));
    const inside = await writeInto(join(allowed, "run2"), allowed);
    assert.equal(inside.ok, false);
    assert.ok(inside.stderr.includes(`${join(allowed, "run2", "checkpoints")} is a symbolic link`));
    // A link that stays inside the allowed folder is fine.
    await Deno.mkdir(join(allowed, "real"));
    await Deno.symlink(join(allowed, "real"), join(allowed, "alias"));
    assert.deepEqual(await writeInto(join(allowed, "alias"), allowed), { ok: true, stderr: "" });
    assert.equal(await Deno.readTextFile(join(allowed, "real", "note.txt")), "written\n");
  });
});

Deno.test("I/O errors: disk full names the file being written; a sandbox denial stays as it is", () => {
  // Deno's shape of the error a write to a full disk raises (no path in the message).
  const full = Object.assign(new Error("No space left on device (os error 28)"), {
    code: "ENOSPC",
  });
  const named = ioErrorAt(full, "cache/c/targets-00001.safetensors") as Error;
  assert.match(
    named.message,
    /^cache\/c\/targets-00001\.safetensors: the disk is full .*free space/,
  );
  assert.equal(named.cause, full);
  const denied = new Deno.errors.NotCapable('Requires write access to "x"');
  assert.equal(ioErrorAt(denied, "x"), denied);
});

Deno.test({
  name: "I/O errors: a full disk (64 KiB tmpfs) during an atomic write or a metrics append names " +
    "the file; no temp file stays" + TINY_DISK_IGNORED,
  ignore: !IS_ROOT,
  async fn() {
    await withTinyDisk(64 << 10, async (dir) => {
      const path = join(dir, "shard.safetensors");
      await rejectsWith(
        () => writeFileAtomic(path, new Uint8Array(1 << 20)),
        `${path}: the disk is full`,
        "free space",
      );
      assert.deepEqual([...Deno.readDirSync(dir)], []);
      const log = await MetricsLog.open(dir);
      try {
        await rejectsWith(
          () => log.logRun({ filler: "x".repeat(1 << 20) }),
          `${join(dir, METRICS_FILE)}: the disk is full`,
        );
      } finally {
        log.close();
      }
    });
  },
});

const canDropRoot = IS_ROOT &&
  works("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "true"]);
Deno.test({
  name: "I/O errors: an OS permission refusal (EACCES) names the path and says it is the OS, not " +
    "Deno's sandbox" + (canDropRoot ? "" : " (ignored: needs root to run as another user)"),
  ignore: !canDropRoot,
  async fn() {
    await withTempDir(async (dir) => {
      await Deno.chmod(dir, 0o755);
      const locked = join(dir, "locked");
      await Deno.mkdir(locked, { mode: 0o755 });
      const denoDir = join(dir, "deno-dir");
      await Deno.mkdir(denoDir);
      await Deno.chmod(denoDir, 0o777);
      const result = await writeInto(
        locked,
        dir,
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        { DENO_DIR: denoDir, NO_COLOR: "1" },
      );
      assert.equal(result.ok, false);
      assert.ok(
        result.stderr.includes(
          `PermissionDenied: ${join(locked, "note.txt")}: the operating system refused`,
        ),
        result.stderr,
      );
      assert.ok(result.stderr.includes("not Deno's permissions"), result.stderr);
    });
  },
});
