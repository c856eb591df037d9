import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { explainPermission } from "../../src/cli/progress.ts";

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const TASKS: Record<string, string> = JSON.parse(
  await Deno.readTextFile(`${ROOT}deno.json`),
).tasks;

/** Whether `strace` runs here (it needs ptrace, which some containers forbid). */
function straceWorks(): boolean {
  try {
    return new Deno.Command("strace", { args: ["-o", "/dev/null", "true"] }).outputSync().success;
  } catch {
    return false;
  }
}

Deno.test("tasks: every deno.json task turns off Deno's update check (a network lookup)", () => {
  // `VAR=value cmd` sets it for that command only; a chain of commands exports it first.
  const without = Object.entries(TASKS).filter(([, line]) =>
    !line.startsWith("export DENO_NO_UPDATE_CHECK=1 && ") &&
    !line.split("&&").every((command) => command.trim().startsWith("DENO_NO_UPDATE_CHECK=1 "))
  );
  assert.deepEqual(without.map(([name]) => name), []);
});

Deno.test({
  name: "tasks: cache, train, encode, demo and info open no network socket and skip the update " +
    "check" + (straceWorks() ? "" : " (ignored: strace is missing or ptrace is not allowed)"),
  ignore: !straceWorks(),
  async fn() {
    for (
      const args of [["info"], ["cache", "--help"], ["train", "--help"], ["encode", "--help"], [
        "demo",
        "--help",
      ]]
    ) {
      const trace = await Deno.makeTempFile({ prefix: "distill-strace-" });
      try {
        // The test's own environment must not hide the check: only the task may turn it off.
        const env = { ...Deno.env.toObject() };
        delete env.DENO_NO_UPDATE_CHECK;
        const result = await new Deno.Command("strace", {
          args: ["-f", "-e", "trace=openat,socket", "-o", trace, Deno.execPath(), "task", ...args],
          cwd: ROOT,
          env,
          clearEnv: true,
          stdout: "null",
          stderr: "piped",
        }).output();
        assert.ok(result.success, new TextDecoder().decode(result.stderr));
        const calls = (await Deno.readTextFile(trace)).split("\n");
        const network = calls.filter((l) => /socket\(AF_INET6?,/.test(l));
        const updateCheck = calls.filter((l) => l.includes("latest.txt"));
        assert.deepEqual(
          { network, updateCheck },
          { network: [], updateCheck: [] },
          args.join(" "),
        );
      } finally {
        await Deno.remove(trace);
      }
    }
  },
});

Deno.test("tasks: a sandbox denial names the task's folder; an OS permission refusal does not", () => {
  const task = { name: "train", writeFolder: "runs", allowEnv: "--allow-env" };
  const sandbox = explainPermission(
    new Deno.errors.NotCapable('Requires write access to "elsewhere/run"'),
    task,
  ) as Error;
  assert.match(sandbox.message, /may write only under \.\/runs\. Fix: use --out runs\/<name>/);
  const os = new Deno.errors.PermissionDenied("Permission denied (os error 13): mkdir 'runs/r'");
  const explained = explainPermission(os, task) as Error;
  assert.ok(explained instanceof Deno.errors.PermissionDenied);
  assert.doesNotMatch(explained.message, /may write only under/);
  assert.match(explained.message, /mkdir 'runs\/r'.*the operating system refused it/);
});

Deno.test("tasks: bench refuses an unwritable --json before timing anything", async () => {
  const outside = await Deno.makeTempDir({ prefix: "distill-bench-json-" });
  try {
    for (
      const [json, expected] of [
        [`${outside}/bench.json`, "may only write under the current folder"],
        ["tests", "is a folder"],
      ]
    ) {
      const out = await new Deno.Command("deno", {
        args: ["task", "-q", "bench", "--only", "round_trip", "--json", json],
        cwd: ROOT,
        stdout: "piped",
        stderr: "piped",
      }).output();
      const stdout = new TextDecoder().decode(out.stdout);
      const stderr = new TextDecoder().decode(out.stderr);
      assert.equal(out.code, 2, stderr);
      assert.match(stderr, new RegExp(`--json ${json}: .*${expected}`));
      // No adapter line: the check ran before the GPU was opened.
      assert.doesNotMatch(stdout, /adapter:/);
    }
  } finally {
    await Deno.remove(outside, { recursive: true });
  }
});
