/**
 * Test fixture: makes the output folder `Deno.args[0]` and writes `note.txt` into it, as a task
 * does; run by the tests under scoped write permissions or as another user.
 */

import { join } from "node:path";
import { writeFileAtomic } from "../../src/io/atomic.ts";
import { prepareOutputFolder } from "../../src/io/output_path.ts";

await prepareOutputFolder(Deno.args[0]);
await writeFileAtomic(join(Deno.args[0], "note.txt"), "written\n");
