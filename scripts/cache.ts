/**
 * `deno task cache`: the `distill cache` command (src/cli/cache.ts) as its own entry, so the task
 * can grant it only what it needs: read files, write under ./cache, no network.
 */
import { main } from "../src/cli/main.ts";

Deno.exit(await main(["cache", ...Deno.args]));
