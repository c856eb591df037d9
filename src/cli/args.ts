import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "../util/usage_error.ts";

// Commands and their tests take UsageError from here, beside the parsing that throws it.
export { UsageError };

export type OptionSpec = NonNullable<ParseArgsConfig["options"]>;

/** What a subcommand is: its usage text and the function that runs it. */
export interface Command {
  name: string;
  summary: string;
  run(args: string[]): Promise<void>;
}

/**
 * Parses `args` with node:util's parseArgs (standing in for jsr:@std/cli) and turns its
 * errors into usage errors that name the command. `--help` is added to every command.
 */
export function parseCommandArgs<T extends OptionSpec>(
  command: string,
  args: string[],
  options: T,
  allowPositionals = false,
) {
  try {
    return parseArgs({
      args,
      options: { ...options, help: { type: "boolean", short: "h" } },
      allowPositionals,
      strict: true,
    });
  } catch (err) {
    throw new UsageError(`${command}: ${(err as Error).message}`);
  }
}

/** A flag's positive integer value, or `fallback` when the flag is absent. */
export function positiveInteger(
  command: string,
  name: string,
  value: string | undefined,
  fallback: number,
): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) {
    throw new UsageError(`${command}: ${name} must be a positive integer`);
  }
  return n;
}
