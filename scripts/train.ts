/**
 * `deno task train`: the `distill train` command (src/cli/train.ts) as its own entry, so the task
 * can grant it only what it needs: read files, write under ./runs, no network.
 */
import { main } from "../src/cli/main.ts";

Deno.exit(await main(["train", ...Deno.args]));
