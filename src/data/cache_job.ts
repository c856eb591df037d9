/**
 * The cache job: read a caption set, then compute the teacher's targets for it into a
 * resumable target cache, with progress lines.
 */
import type { Teacher } from "../models/teacher.ts";
import { prepareOutputFolder } from "../io/output_path.ts";
import { formatDuration, progressThrottle } from "../util/progress.ts";
import { type CaptionFormat, readCaptionSet, type SprightChoice } from "./captions.ts";
import { buildTargetCache, type CacheProgress } from "./cache_build.ts";
import type { CacheManifest, CacheWorker } from "./cache_format.ts";

/** What `runCache` reads and where it writes; mirrors the `cache` command's flags. */
export interface CacheOptions {
  /** Caption file or folder (formats: datasets.md). */
  data: string;
  /** Data set format; detected from the files when absent. */
  format?: CaptionFormat;
  /** Record field or column holding the caption; default caption, text, prompt or prompts. */
  captionField?: string;
  /** Which SPRIGHT caption(s) to take from each sample. */
  spright?: SprightChoice;
  /** Drop captions equal to an earlier one. */
  dedupe?: boolean;
  /** Cache only the first this many captions (after `dedupe`). */
  limit?: number;
  /** The cache folder; created if missing, resumed if it holds this teacher's cache. */
  out: string;
  /** Captions per teacher call. */
  batchSize: number;
  /** Undefined: the resumed cache's value, else the default. */
  rowsPerShard?: number;
  /** Compute only this worker's share of the shards (several machines, one data set). */
  worker?: CacheWorker;
}

/** A teacher, or a function loading one, called only once the captions were read (fail fast). */
export type TeacherSource = Teacher | (() => Promise<Teacher>);

/** One progress line: rows done of total, shards, rate of this run and the time left. */
export function progressLine(progress: CacheProgress, elapsedSeconds: number): string {
  const { rowsDone, rowsTotal, rowsComputed, shardsDone, shardsTotal } = progress;
  const rate = elapsedSeconds > 0 ? rowsComputed / elapsedSeconds : 0;
  const eta = rowsDone === rowsTotal ? 0 : rate > 0 ? (rowsTotal - rowsDone) / rate : Infinity;
  const percent = (100 * rowsDone / rowsTotal).toFixed(1);
  return `cache: ${rowsDone}/${rowsTotal} rows (${percent}%), ${shardsDone}/${shardsTotal} ` +
    `shards, ${rate.toFixed(1)} rows/s, ETA ${formatDuration(eta)}`;
}

/**
 * Reads the captions, then computes their targets into `options.out` (resuming what is there),
 * with progress lines on `log` at most every 2 s plus a final one. Returns the manifest written.
 */
export async function runCache(
  options: CacheOptions,
  teacher: TeacherSource,
  log: (line: string) => void = (line) => console.error(line),
): Promise<CacheManifest> {
  // A bad --out fails now, not after reading a large caption set.
  await prepareOutputFolder(options.out);
  const set = await readCaptionSet(options.data, {
    format: options.format,
    captionField: options.captionField,
    spright: options.spright,
    dedupe: options.dedupe,
  });
  for (const warning of set.warnings) log(`cache: ${warning}`);
  const rows = options.limit === undefined ? set.rows : set.rows.slice(0, options.limit);
  const limited = rows.length < set.rows.length
    ? ` (the first ${rows.length} of ${set.rows.length})`
    : "";
  log(`cache: ${rows.length} captions${limited} from ${options.data} (${set.format})`);

  const start = performance.now();
  const due = progressThrottle();
  let latest: CacheProgress | undefined;
  const manifest = await buildTargetCache({
    dir: options.out,
    rows,
    source: {
      data: options.data,
      format: set.format,
      ...(options.captionField === undefined ? {} : { captionField: options.captionField }),
      ...(options.spright === undefined ? {} : { spright: options.spright }),
      dedupe: options.dedupe ?? false,
      ...(options.limit === undefined ? {} : { limit: options.limit }),
    },
    teacher: typeof teacher === "function" ? await teacher() : teacher,
    batchSize: options.batchSize,
    rowsPerShard: options.rowsPerShard,
    worker: options.worker,
    onProgress(progress) {
      latest = progress;
      if (due()) log(progressLine(progress, (performance.now() - start) / 1000));
    },
    log: (line) => log(`cache: ${line}`),
  });
  if (latest) log(progressLine(latest, (performance.now() - start) / 1000));
  const { worker } = manifest;
  log(
    worker
      ? `cache: worker ${worker.index}/${worker.count} finished its ${manifest.shards.length} ` +
        `shards in ${options.out}; once every worker is done and their files are in one ` +
        `folder, run: deno task cache --merge --out <folder>`
      : `cache: ${manifest.rows} rows in ${manifest.shardCount} shards, complete: ${options.out}`,
  );
  return manifest;
}
