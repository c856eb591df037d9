/** Shortest gap between two progress lines of a long command, so logs stay readable. */
export const PROGRESS_INTERVAL_MS = 2000;

/** A duration for progress lines: `42s`, `3m07s`, `2h05m`; `-` when unknown (no rate yet). */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "-";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
}

/**
 * Returns a function telling whether a progress line is due now: the first call, then at most
 * one every `intervalMs`, and always when `force` is set (the final line, so a run ends on it).
 */
export function progressThrottle(intervalMs = PROGRESS_INTERVAL_MS): (force?: boolean) => boolean {
  let last = -Infinity;
  return (force = false) => {
    const now = performance.now();
    if (!force && now - last < intervalMs) return false;
    last = now;
    return true;
  };
}

/** A CLI task whose write permission (deno.json task) is scoped to one folder. */
export interface ScopedTask {
  /** The task and its script: `deno task <name>`, `scripts/<name>.ts`. */
  name: string;
  /** The folder (relative to the repository) the task may write under. */
  writeFolder: string;
  /** The env permission flag the script needs when run by hand. */
  allowEnv: string;
}

/**
 * Adds the fix to a file access Deno's sandbox denied (`NotCapable`: the task may write only
 * under its folder). An OS refusal (`PermissionDenied`: file mode or owner) is said to be one;
 * other errors are returned as they are.
 */
export function explainPermission(error: unknown, task: ScopedTask): unknown {
  if (error instanceof Deno.errors.PermissionDenied) {
    if (error.message.includes("the operating system refused")) return error;
    return new Deno.errors.PermissionDenied(
      `${error.message}: the operating system refused it (the file or folder's owner or mode, ` +
        `not Deno's permissions). Fix: make the folder writable for this user, or write ` +
        `somewhere else`,
      { cause: error },
    );
  }
  if (!(error instanceof Deno.errors.NotCapable)) return error;
  const { name, writeFolder, allowEnv } = task;
  return new Error(
    `${error.message}. The '${name}' task may write only under ./${writeFolder}. Fix: use ` +
      `--out ${writeFolder}/<name>, or run deno run --allow-read --allow-write=<out> ` +
      `${allowEnv} scripts/${name}.ts ... (see --help)`,
  );
}
