/**
 * `deno task demo`: the `distill demo` command (src/cli/demo.ts) as its own entry, so the task
 * can grant it only what it needs: read files, write under ./demo-out, no network.
 */
import { main } from "../src/cli/main.ts";

Deno.exit(await main(["demo", ...Deno.args]));
