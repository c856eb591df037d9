import { type Command, UsageError } from "./args.ts";
import { cacheCommand } from "./cache.ts";
import { benchLearnCommand } from "./bench_learn.ts";
import { demoCommand } from "./demo.ts";
import { encodeCommand } from "./encode.ts";
import { infoCommand } from "./info.ts";
import { serveCommand } from "./serve.ts";
import { trainCommand } from "./train.ts";
import { wandbSyncCommand } from "./wandb_sync.ts";

const COMMANDS: Command[] = [
  infoCommand,
  cacheCommand,
  trainCommand,
  encodeCommand,
  serveCommand,
  demoCommand,
  benchLearnCommand,
  wandbSyncCommand,
];

function usage(): string {
  const lines = COMMANDS.map((c) => `  ${c.name.padEnd(10)} ${c.summary}`);
  return `distill: condition SDXL on a 4-bit Qwen3 student instead of its CLIP text encoders.

Usage: distill <command> [options]     (distill <command> --help for its options)

Commands:
${lines.join("\n")}`;
}

/** Runs the CLI; returns the process exit code. */
export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    console.log(usage());
    return name ? 0 : 2;
  }
  const command = COMMANDS.find((c) => c.name === name);
  if (!command) {
    console.error(`distill: unknown command '${name}'\n\n${usage()}`);
    return 2;
  }
  try {
    await command.run(rest);
    return 0;
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`${err.message}\n(run 'distill ${name} --help' for usage)`);
      return 2;
    }
    console.error(`distill ${name}: ${(err as Error).message}`);
    if (Deno.env.get("DISTILL_DEBUG")) console.error((err as Error).stack);
    return 1;
  }
}
