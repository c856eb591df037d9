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
