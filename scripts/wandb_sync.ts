/**
 * `deno task wandb-sync`: the `distill wandb-sync` command (src/cli/wandb_sync.ts) as its own
 * entry, so the task can grant it only the run folders, the two W&B variables and the W&B host.
 */
import { main } from "../src/cli/main.ts";

Deno.exit(await main(["wandb-sync", ...Deno.args]));
