/**
 * Output paths checked before slow work, and I/O errors that name the file.
 *
 * Deno's `--allow-write=<folder>` checks the path as written, then the OS follows symbolic
 * links: a link inside the task's folder pointing elsewhere would let a task write outside it.
 * So before writing, the real path of the destination is resolved and must itself be writable
 * under the process's permissions; when it is not, the link is named.
 */

import { dirname, join, relative, resolve, sep } from "node:path";

/** An output path refused before any work; the message names the path and the fix. */
export class OutputPathError extends Error {}

/** Whether Deno's permissions let this process write `path` (an absolute path). */
function writeGranted(path: string): boolean {
  return Deno.permissions.querySync({ name: "write", path }).state === "granted";
}

/** The OS error code (`ENOSPC`, `EACCES`, …) Deno attaches to file system errors. */
function codeOf(error: Error): string | undefined {
  const code = (error as { code?: unknown }).code;
  return typeof code === "string" ? code : undefined;
}

/**
 * `error`, thrown while writing `path`, reworded to name `path` and what to do. Deno's sandbox
 * denial (`NotCapable`) is returned as it is (it names the path; the CLI adds which folder its
 * task may write); an OS refusal keeps its class (`PermissionDenied`) but says it is the OS.
 */
export function ioErrorAt(error: unknown, path: string): unknown {
  if (!(error instanceof Error) || error instanceof Deno.errors.NotCapable) return error;
  if (error instanceof OutputPathError) return error;
  const code = codeOf(error);
  const options = { cause: error };
  if (error instanceof Deno.errors.PermissionDenied) {
    return new Deno.errors.PermissionDenied(
      `${path}: the operating system refused to write it (${error.message}); this is the ` +
        `file or folder's owner or mode, not Deno's permissions. Fix: make ${dirname(path)} ` +
        `writable for this user (ls -ld ${dirname(path)}), or write somewhere else`,
      options,
    );
  }
  if (code === "ENOSPC" || code === "EDQUOT") {
    return new Error(
      `${path}: the disk is full (${error.message}). Fix: free space on that disk or write ` +
        `somewhere else, then run the command again (the files already finished are kept)`,
      options,
    );
  }
  if (code === "EROFS") {
    return new Error(
      `${path}: the file system is read-only (${error.message}). Fix: write somewhere else`,
      options,
    );
  }
  if (code && !error.message.includes(path)) {
    return new Error(`${path}: ${error.message}`, options);
  }
  return error;
}

/** The real path `path` would have: the deepest existing ancestor resolved, the rest appended. */
async function realDestination(path: string): Promise<{ existing: string; real: string }> {
  let existing = resolve(path);
  for (;;) {
    try {
      const real = await Deno.realPath(existing);
      return { existing, real: join(real, relative(existing, resolve(path))) };
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound) || dirname(existing) === existing) throw error;
      existing = dirname(existing);
    }
  }
}

/** The first symbolic link on the way from the file system root to `path`. */
async function firstLink(path: string): Promise<string | undefined> {
  const parts = resolve(path).split(sep);
  for (let i = 2; i <= parts.length; i++) {
    const prefix = parts.slice(0, i).join(sep) || sep;
    const info = await Deno.lstat(prefix).catch(() => undefined);
    if (info?.isSymlink) return prefix;
  }
  return undefined;
}

/** Refuses `path` when its real path (through links) is outside what this process may write. */
async function refuseEscape(path: string): Promise<void> {
  const { existing, real } = await realDestination(path);
  if (real === resolve(path) || writeGranted(real)) return;
  const link = await firstLink(existing) ?? existing;
  throw new OutputPathError(
    `${path}: ${link} is a symbolic link to ${await Deno.realPath(link)}, outside the ` +
      `folders this task may write, so writing through it is refused. Fix: remove the link, ` +
      `or give a folder that is not reached through one`,
  );
}

/** Refuses `path` when it or one of its ancestors exists but is not a folder. */
async function refuseFileOnTheWay(path: string): Promise<void> {
  for (let at = resolve(path);; at = dirname(at)) {
    const info = await Deno.stat(at).catch(() => undefined);
    if (info) {
      if (info.isDirectory) return;
      throw new OutputPathError(
        `${path}: ${at} is a file, not a folder. Fix: give another output folder, or move ` +
          `the file away`,
      );
    }
    if (dirname(at) === at) return;
  }
}

/** Refuses a symbolic link inside `dir` (at any depth) whose target this process may not write. */
async function refuseEscapingLinksInside(dir: string): Promise<void> {
  for await (const entry of Deno.readDir(dir)) {
    const path = join(dir, entry.name);
    if (entry.isSymlink) await refuseEscape(path);
    else if (entry.isDirectory) await refuseEscapingLinksInside(path);
  }
}

/**
 * Makes `dir` (and its missing parents) an output folder, after refusing a file on the way, a
 * link (to `dir`, an ancestor, or anything inside it) that leads outside what this process may
 * write; I/O errors name the path.
 */
export async function prepareOutputFolder(dir: string): Promise<void> {
  await refuseFileOnTheWay(dir);
  await refuseEscape(dir);
  try {
    await Deno.mkdir(dir, { recursive: true });
  } catch (error) {
    throw ioErrorAt(error, dir);
  }
  await refuseEscapingLinksInside(dir);
}

/**
 * Checks an output file before slow work: its folder is made (`prepareOutputFolder`), an existing
 * `path` is refused unless `force`, and a probe file shows the folder can be written.
 */
export async function prepareOutputFile(
  path: string,
  options: { force?: boolean; flag?: string } = {},
): Promise<void> {
  const { force = false, flag = "--out" } = options;
  await prepareOutputFolder(dirname(path));
  const info = await Deno.lstat(path).catch(() => undefined);
  if (info?.isDirectory) {
    throw new OutputPathError(`${flag} ${path}: is a folder. Fix: give a file name`);
  }
  if (info && !force) {
    throw new OutputPathError(
      `${flag} ${path}: the file exists. Fix: pass --force to replace it, or give another name`,
    );
  }
  if (info?.isSymlink) await refuseEscape(path);
  const probe = `${path}.tmp-probe-${Deno.pid}`;
  try {
    (await Deno.open(probe, { write: true, createNew: true })).close();
    await Deno.remove(probe);
  } catch (error) {
    throw ioErrorAt(error, path);
  }
}
