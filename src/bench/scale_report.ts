/**
 * What the real-scale scripts (scripts/*_scale.ts) share: peak memory measurements and the
 * bench JSON file they append their result entries to.
 */
import { dirname } from "node:path";
import process from "node:process";
import type { Gpu } from "../gpu/device.ts";
import { writeFileAtomic } from "../io/atomic.ts";

/**
 * The process's peak RSS so far (getrusage's ru_maxrss, VmHWM on Linux). Read through
 * node:process because Deno refuses /proc/self/status without --allow-all.
 */
export function maxRssBytes(): number {
  return process.resourceUsage().maxRSS * 1024;
}

/**
 * High-water marks of host RSS (`Deno.memoryUsage().rss`) and of the GPU buffer pool, sampled
 * on a timer and whenever `sample()` is called. The timer only fires while the event loop is
 * free, so callers also sample between long synchronous pieces of work. Ops release their
 * temporaries while they are recorded, so `gpuLive` misses peaks inside one recorded pass;
 * `gpuPool` (which keeps freed buffers) bounds what the process really holds.
 */
export class PeakMemory {
  readonly #gpu: Gpu;
  readonly #timer: ReturnType<typeof setInterval>;
  rss = 0;
  /** Bytes of live tensors. */
  gpuLive = 0;
  /** Bytes of live tensors plus freed buffers the pool keeps for reuse. */
  gpuPool = 0;

  constructor(gpu: Gpu, intervalMs = 100) {
    this.#gpu = gpu;
    this.sample();
    this.#timer = setInterval(() => this.sample(), intervalMs);
  }

  sample(): void {
    const { liveBytes, pooledBytes } = this.#gpu.stats;
    this.rss = Math.max(this.rss, Deno.memoryUsage().rss);
    this.gpuLive = Math.max(this.gpuLive, liveBytes);
    this.gpuPool = Math.max(this.gpuPool, liveBytes + pooledBytes);
  }

  /** Clears the marks, e.g. between the phases of a run. */
  reset(): void {
    this.rss = this.gpuLive = this.gpuPool = 0;
    this.sample();
  }

  stop(): void {
    clearInterval(this.#timer);
  }
}

/**
 * Appends `entry` to the bench file `path`, atomically: a JSON array of entries (created when
 * the file is missing), or the report `deno task bench --json` writes, whose `results` get it.
 */
export async function appendBenchEntry(path: string, entry: { name: string }): Promise<void> {
  let data: unknown = [];
  try {
    data = JSON.parse(await Deno.readTextFile(path));
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  const results = Array.isArray(data) ? data : (data as { results?: unknown } | null)?.results;
  if (!Array.isArray(results)) {
    throw new Error(
      `${path} is neither a JSON array of bench entries nor a bench report with "results"; ` +
        "pass another --json file",
    );
  }
  results.push(entry);
  await Deno.mkdir(dirname(path) || ".", { recursive: true });
  await writeFileAtomic(path, JSON.stringify(data, null, 2) + "\n");
}

/**
 * Runs `script --measure ...args` as a child Deno process and returns the JSON object it
 * prints last: the scale scripts measure in a child so that writing a checkpoint does not
 * count toward the measured peak memory.
 */
export async function measureInChild<T>(script: URL, args: string[], what: string): Promise<T> {
  const child = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      script.pathname,
      "--measure",
      ...args,
    ],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  if (!child.success) throw new Error(`${what}: the measuring process failed (${child.code})`);
  return JSON.parse(new TextDecoder().decode(child.stdout).trim().split("\n").at(-1)!) as T;
}

/** A script's leading doc comment as plain text: the `--help` of the scale scripts. */
export async function scriptHelp(script: URL): Promise<string> {
  const text = await Deno.readTextFile(script);
  const doc = text.match(/^\/\*\*([\s\S]*?)\*\//)?.[1] ?? "";
  return doc.split("\n").map((line) => line.replace(/^ ?\* ?/, "")).join("\n").trim();
}
