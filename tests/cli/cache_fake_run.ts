/**
 * `distill cache` with the fake teacher, run as a subprocess by tests/cli/cache_test.ts so it can
 * be killed for real. Usage: cache_fake_run.ts <delay ms per batch> <cache options...>
 */
import { makeCacheCommand } from "../../src/cli/cache.ts";
import { fakeTeacher } from "../data/fake_teacher.ts";

const [delayMs, ...args] = Deno.args;
const command = makeCacheCommand(() =>
  Promise.resolve({ teacher: fakeTeacher({ delayMs: Number(delayMs) }), close() {} })
);
await command.run(args);
