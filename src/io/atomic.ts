/**
 * Atomic file writes: data goes to a temp file in the same folder (so the rename stays on one
 * file system), which replaces the target only after a complete, synced write. A crash or error
 * midway leaves the old file intact and removes the temp file.
 */

import { ioErrorAt } from "./output_path.ts";

/** Writes every byte of `bytes`: `FsFile.write` may write fewer than asked. */
export async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.byteLength) done += await file.write(bytes.subarray(done));
}

/**
 * Runs `write` on a fresh temp file next to `path`, then renames it over `path`. I/O errors
 * (disk full, an OS permission refusal) name `path` and the fix.
 */
export async function writeAtomic(
  path: string,
  write: (file: Deno.FsFile) => Promise<void>,
): Promise<void> {
  const tmp = `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  let file: Deno.FsFile;
  try {
    file = await Deno.open(tmp, { write: true, createNew: true });
  } catch (error) {
    throw ioErrorAt(error, path);
  }
  try {
    try {
      await write(file);
      await file.syncData();
    } finally {
      file.close();
    }
    await Deno.rename(tmp, path);
  } catch (error) {
    await Deno.remove(tmp).catch(() => undefined);
    throw ioErrorAt(error, path);
  }
}

/** Atomically writes `data` (a string is written as UTF-8) to `path`. */
export function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  return writeAtomic(path, (file) => writeAll(file, bytes));
}
