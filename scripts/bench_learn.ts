/**
 * `deno task bench:learn`: the learning benchmark (src/cli/bench_learn.ts) as its own entry, so
 * the task can grant it only what it needs: read files, write under ./bench-out, no network.
 */
import { main } from "../src/cli/main.ts";

Deno.exit(await main(["bench:learn", ...Deno.args]));
