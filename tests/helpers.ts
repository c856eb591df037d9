import assert from "node:assert/strict";
import { join } from "node:path";
import { Gpu, type GpuOptions } from "../src/gpu/device.ts";
import { Rng } from "../src/util/rng.ts";

let shared: Promise<Gpu> | null = null;

/**
 * One device per test process: creating devices is slow on lavapipe. Set
 * DISTILL_DISABLE=f16,subgroups to run the fallback paths on an adapter that has them.
 */
export function testGpu(): Promise<Gpu> {
  const disable = (Deno.env.get("DISTILL_DISABLE") ?? "").split(",").filter(Boolean);
  shared ??= Gpu.create({ disable: disable as GpuOptions["disable"] });
  return shared;
}

/** Deterministic normal samples so failures reproduce. */
export function randn(n: number, seed: number, std = 1): Float32Array {
  return new Rng(seed).fillNormal(new Float32Array(n), std);
}

/** ggml's test metric: mse(a, b) / mse(a, 0), with a the reference. */
export function nmse(expected: ArrayLike<number>, actual: ArrayLike<number>): number {
  assert.equal(actual.length, expected.length, "length mismatch");
  let err = 0;
  let ref = 0;
  for (let i = 0; i < expected.length; i++) {
    const d = actual[i] - expected[i];
    err += d * d;
    ref += expected[i] * expected[i];
  }
  return ref === 0 ? err : err / ref;
}

export function assertNmse(
  expected: ArrayLike<number>,
  actual: ArrayLike<number>,
  bound = 1e-7,
  what = "result",
): void {
  for (let i = 0; i < actual.length; i++) {
    if (!Number.isFinite(actual[i])) assert.fail(`${what}: non-finite value ${actual[i]} at ${i}`);
  }
  const e = nmse(expected, actual);
  assert.ok(e < bound, `${what}: NMSE ${e.toExponential(3)} over ${bound}`);
}

/** Max |a - b| under `tol`, as the fixture READMEs state their tolerances. */
export function assertMaxAbs(
  expected: ArrayLike<number>,
  actual: ArrayLike<number>,
  tol: number,
  what = "result",
): void {
  assert.equal(actual.length, expected.length, `${what}: length mismatch`);
  let worst = 0;
  let at = 0;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  assert.ok(worst <= tol, `${what}: max |diff| ${worst} at ${at} over ${tol}`);
}

/** Runs `run` in a new temp folder, removed afterwards whatever happens. */
export async function withTempDir(run: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "distill-test-" });
  try {
    await run(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Asserts that `run` rejects with a `type` error whose message contains every part. */
export async function rejectsAs(
  run: () => Promise<unknown>,
  type: new (...args: never[]) => Error,
  ...parts: string[]
): Promise<void> {
  await assert.rejects(run, (error: Error) => {
    assert.ok(error instanceof type, `${error.name}: ${error.message}`);
    for (const part of parts) {
      assert.ok(error.message.includes(part), `"${part}" not in: ${error.message}`);
    }
    return true;
  });
}

/** Asserts that `run` rejects with an error whose message contains every part. */
export function rejectsWith(run: () => Promise<unknown>, ...parts: string[]): Promise<void> {
  return rejectsAs(run, Error, ...parts);
}

/**
 * Whether the tests run as root (`id -u`; Deno.uid needs --allow-sys). Without --allow-run (as
 * `deno task test:kernels`) nothing can mount or drop root either, so it is false there.
 */
function runsAsRoot(): boolean {
  if (Deno.permissions.querySync({ name: "run", command: "id" }).state !== "granted") return false;
  const id = new Deno.Command("id", { args: ["-u"] }).outputSync();
  return new TextDecoder().decode(id.stdout).trim() === "0";
}

export const IS_ROOT = runsAsRoot();

/** Why a test that mounts a tiny disk is ignored here, or "" when it can run. */
export const TINY_DISK_IGNORED = IS_ROOT ? "" : " (ignored: mounting a tmpfs needs root)";

/** Runs `run` on a fresh tmpfs of `bytes` (a full disk to write into), unmounted afterwards. */
export async function withTinyDisk(bytes: number, run: (dir: string) => Promise<void>) {
  await withTempDir(async (dir) => {
    const mounted = new Deno.Command("mount", {
      args: ["-t", "tmpfs", "-o", `size=${bytes}`, "tmpfs", dir],
    }).outputSync();
    assert.ok(mounted.success, new TextDecoder().decode(mounted.stderr));
    try {
      await run(dir);
    } finally {
      new Deno.Command("umount", { args: [dir] }).outputSync();
    }
  });
}

/**
 * Runs `run` with a folder `allowed` (named `name`, as a task's write folder) holding `link`, a
 * symbolic link to the folder `outside`; afterwards asserts that nothing was written outside.
 */
export async function withLinkOutside(
  name: string,
  run: (paths: { root: string; allowed: string; link: string; outside: string }) => Promise<void>,
): Promise<void> {
  await withTempDir(async (root) => {
    const [allowed, outside] = [join(root, name), join(root, "outside")];
    const link = join(allowed, "link");
    await Deno.mkdir(allowed);
    await Deno.mkdir(outside);
    await Deno.symlink(outside, link);
    await run({ root, allowed, link, outside });
    assert.deepEqual([...Deno.readDirSync(outside)], [], "nothing is written outside");
  });
}

/**
 * Runs `deno <args>` (built from `withLinkOutside`'s paths) as a task writing through the link,
 * and asserts it exits 1 naming the link and its target.
 */
export async function assertLinkRefused(
  name: string,
  argsFor: (paths: { root: string; allowed: string; link: string }) => string[],
): Promise<void> {
  await withLinkOutside(name, async ({ root, allowed, link, outside }) => {
    const result = await new Deno.Command(Deno.execPath(), {
      args: argsFor({ root, allowed, link }),
      stdout: "null",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(result.stderr);
    assert.equal(result.code, 1, err);
    assert.ok(err.includes(`${link} is a symbolic link to ${outside}`), err);
  });
}

/**
 * The first line a child process prints (without its newline; "" if it ends first). Kill tests
 * wait for the child to say where it halted, then kill it there. The rest of stdout is dropped.
 */
export async function firstLine(child: Deno.ChildProcess): Promise<string> {
  const output = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let said = "";
  while (!said.includes("\n")) {
    const { value, done } = await output.read();
    if (done) break;
    said += value;
  }
  await output.cancel();
  return said.split("\n")[0];
}
