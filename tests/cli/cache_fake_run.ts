/**
 * `distill cache` with the fake teacher, run as a subprocess by tests/cli/cache_test.ts so it can
 * be killed for real. Usage: cache_fake_run.ts <halt after this many batches, or 0: never>
 * <cache options...> (see `FakeTeacherOptions.haltAfterBatches`).
 */
import { makeCacheCommand } from "../../src/cli/cache.ts";
import { fakeTeacher } from "../data/fake_teacher.ts";

const [halt, ...args] = Deno.args;
const haltAfterBatches = Number(halt) || undefined;
const command = makeCacheCommand(() =>
  Promise.resolve({ teacher: fakeTeacher({ haltAfterBatches }), close() {} })
);
await command.run(args);
