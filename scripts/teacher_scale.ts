/**
 * Teacher scale check (not in CI): the SDXL teacher at its real sizes on the target cache.
 *
 * Writes random CLIP ViT-L and ViT-bigG text encoders with the real SDXL shapes (F16, diffusers
 * layout, the real CLIP tokenizer files from data/clip-tokenizer) into `--dir` (kept
 * and reused by later runs), then, in a child process so that writing them does not count,
 * loads the teacher and runs the target cache over the first `--prompts` PartiPrompts. Reports
 * captions/s, peak RSS (the process's true peak, ru_maxrss), GPU memory, and appends
 * `{name: "teacher_cache", ...}` to `--json` (a JSON array, or a `deno task bench --json` report).
 *
 *   deno run --allow-read --allow-write --allow-env --allow-run scripts/teacher_scale.ts \
 *     --dir /tmp/sdxl-random --json bench-out/bench.json [--prompts 64] [--batch-size 8]
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import {
  appendBenchEntry,
  maxRssBytes,
  measureInChild,
  PeakMemory,
  scriptHelp,
} from "../src/bench/scale_report.ts";
import { runCache } from "../src/data/cache_job.ts";
import { Gpu } from "../src/gpu/device.ts";
import { loadSdxlTeacher } from "../src/models/sdxl_teacher.ts";
import { SDXL_TEXT_ENCODERS, writeRandomSdxlTeacherFolder } from "../src/models/random_sdxl.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const PROMPTS = join(ROOT, "tests/fixtures/prompts/PartiPrompts.sample300.tsv");

export interface TeacherCacheResult {
  name: "teacher_cache";
  date: string;
  adapter: string;
  prompts: number;
  batchSize: number;
  loadSeconds: number;
  cacheSeconds: number;
  captionsPerSecond: number;
  /** Highest Deno.memoryUsage().rss seen while loading and caching (sampled every 100 ms). */
  peakRssBytes: number;
  /** Deno.memoryUsage().rss right after the teacher was loaded. */
  rssAfterLoadBytes: number;
  /** Sum of the weight tensors' bytes. */
  weightBytes: number;
  /** Highest GPU memory the buffer pool held (live + pooled; sizes rounded to its classes). */
  peakPoolBytes: number;
  /** The process's true peak RSS at the end (ru_maxrss, VmHWM). */
  maxRssBytes: number;
  shapes: typeof SDXL_TEXT_ENCODERS;
}

/** Loads the teacher of `dir` and caches `prompts` prompts; runs in the child process. */
async function measure(
  dir: string,
  prompts: number,
  batchSize: number,
): Promise<TeacherCacheResult> {
  const gpu = await Gpu.create();
  const peak = new PeakMemory(gpu);
  const out = await Deno.makeTempDir({ prefix: "teacher-cache-" });
  try {
    const loadStart = performance.now();
    const teacher = await loadSdxlTeacher(gpu, dir);
    const loadSeconds = (performance.now() - loadStart) / 1000;
    const rssAfterLoadBytes = Deno.memoryUsage().rss;
    peak.sample();
    const cacheStart = performance.now();
    await runCache({ data: PROMPTS, limit: prompts, out, batchSize }, teacher);
    const cacheSeconds = (performance.now() - cacheStart) / 1000;
    peak.sample();
    teacher.destroy();
    return {
      name: "teacher_cache",
      date: new Date().toISOString(),
      adapter: [
        gpu.adapterInfo.vendor,
        gpu.adapterInfo.architecture,
        gpu.adapterInfo.device,
        gpu.adapterInfo.description,
      ].filter(Boolean).join(" "),
      prompts,
      batchSize,
      loadSeconds,
      cacheSeconds,
      captionsPerSecond: prompts / cacheSeconds,
      peakRssBytes: peak.rss,
      rssAfterLoadBytes,
      weightBytes: teacher.gpuBytes,
      peakPoolBytes: peak.gpuPool,
      maxRssBytes: maxRssBytes(),
      shapes: SDXL_TEXT_ENCODERS,
    };
  } finally {
    peak.stop();
    await Deno.remove(out, { recursive: true });
    gpu.destroy();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      help: { type: "boolean", short: "h" },
      dir: { type: "string" },
      json: { type: "string" },
      prompts: { type: "string", default: "64" },
      "batch-size": { type: "string", default: "8" },
      measure: { type: "boolean" },
    },
  });
  if (values.help) {
    console.log(await scriptHelp(new URL(import.meta.url)));
    return;
  }
  const { dir, json } = values;
  const prompts = Number(values.prompts);
  const batchSize = Number(values["batch-size"]);
  if (!dir || (!json && !values.measure) || !(prompts > 0) || !(batchSize > 0)) {
    throw new Error(
      "usage: teacher_scale.ts --dir <folder> --json <bench.json> [--prompts 64] [--batch-size 8]",
    );
  }
  if (values.measure) {
    console.log(JSON.stringify(await measure(dir, prompts, batchSize)));
    return;
  }
  if (!(await Deno.stat(join(dir, "tokenizer_2", "vocab.json")).catch(() => null))) {
    console.error(`teacher_scale: writing random SDXL text encoders to ${dir} ...`);
    const start = performance.now();
    await writeRandomSdxlTeacherFolder(dir);
    console.error(`teacher_scale: written in ${((performance.now() - start) / 1000).toFixed(1)} s`);
  }
  const result = await measureInChild<TeacherCacheResult>(
    new URL(import.meta.url),
    ["--dir", dir, "--prompts", String(prompts), "--batch-size", String(batchSize)],
    "teacher_scale",
  );
  await appendBenchEntry(json!, result);
  const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(0)} MiB`;
  const rss = `${mib(result.maxRssBytes)} (${mib(result.rssAfterLoadBytes)} after loading)`;
  console.log(
    `teacher_cache: ${result.prompts} prompts, batch ${result.batchSize}, load ` +
      `${result.loadSeconds.toFixed(1)} s, ${result.captionsPerSecond.toFixed(3)} captions/s, ` +
      `peak RSS ${rss}, weights ${mib(result.weightBytes)}, GPU pool peak ` +
      `${mib(result.peakPoolBytes)} on ${result.adapter}`,
  );
}

if (import.meta.main) await main();
