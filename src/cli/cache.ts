import type { Teacher } from "../models/teacher.ts";
import { Gpu } from "../gpu/device.ts";
import { prepareOutputFolder } from "../io/output_path.ts";
import {
  CAPTION_FORMATS,
  type CaptionFormat,
  readCaptionSet,
  SPRIGHT_CHOICES,
  type SprightChoice,
} from "../data/captions.ts";
import { buildTargetCache, type CacheProgress } from "../data/cache_build.ts";
import {
  type CacheManifest,
  type CacheWorker,
  DEFAULT_ROWS_PER_SHARD,
} from "../data/cache_format.ts";
import { type CacheVerifyReport, mergeCacheManifests, verifyCache } from "../data/cache_merge.ts";
import { type Command, parseCommandArgs, UsageError } from "./args.ts";
import {
  explainPermission,
  formatDuration,
  progressThrottle,
  type ScopedTask,
} from "./progress.ts";

const DEFAULT_BATCH_SIZE = 8;
const CACHE_TASK: ScopedTask = { name: "cache", writeFolder: "cache", allowEnv: "--allow-env" };

const HELP = `distill cache: compute the SDXL teacher's targets (prompt_embeds [77, 2048] and
pooled [1280], stored as F16) for every caption of a data set, into a cache that training reads.

Usage: deno task cache --data <path> --sdxl <folder> --out <folder> [options]
       deno task cache --verify --out <folder>
       deno task cache --merge --out <folder>

Options:
  --data <path>            caption file or folder (formats: datasets.md); gzip files are
                           read as they are: .jsonl.gz, .csv.gz, .tsv.gz, .txt.gz,
                           metadata.jsonl.gz, .tar.gz/.tgz shards (not parquet, not kohya)
  --format <name>          ${CAPTION_FORMATS.join(", ")}
                           (default: detected from the files)
  --caption-field <name>   record field/column holding the caption
                           (default: caption, text, prompt or prompts)
  --spright <choice>       SPRIGHT caption(s) to take: ${SPRIGHT_CHOICES.join(", ")}
  --dedupe                 drop captions equal to an earlier one
  --limit <n>              only the first n captions (after --dedupe)
  --sdxl <folder>          SDXL diffusers folder (text_encoder/, text_encoder_2/, tokenizer/,
                           tokenizer_2/)
  --out <folder>           the cache; created if missing. A folder holding a cache of the same
                           teacher and captions is resumed; another teacher's is refused
  --batch-size <n>         captions per teacher call (default ${DEFAULT_BATCH_SIZE})
  --rows-per-shard <n>     rows per shard file (default ${DEFAULT_ROWS_PER_SHARD}; a resumed cache
                           keeps its own)
  --shard <i>/<n>          compute only the shards k with k mod n = i, so n machines split one
                           data set (each writes manifest.part-i-of-n.json)
  --merge                  combine the worker manifests in --out into manifest.json once every
                           shard is there
  --verify                 re-hash and check every shard in --out (sizes, SHA-256, shapes, row
                           list, NaN/infinity); exits 1 on any problem or missing shard
  -h, --help               show this help

Kill it at any time (Ctrl-C, SIGKILL, power loss) and run the same command again: finished shards
are kept, the rest is computed; a shard is either complete or absent, never partial.

Examples:
  deno task cache --data data/captions.jsonl --sdxl models/sdxl-base-1.0 --out cache/sdxl-coco
  Two machines: run '... --shard 0/2' on one and '... --shard 1/2' on the other (same --data
  and options), copy both --out folders' files into one folder, then
  deno task cache --merge --out cache/sdxl-coco

Permissions: the 'cache' task may read any file, write only under ./cache and reach no network.
To write elsewhere, widen the write permission to that folder alone:
  deno run --allow-read --allow-write=<out> --allow-env scripts/cache.ts --out <out> ...`;

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

/** The report as lines: a summary, each problem, the missing shards and the warnings. */
export function verifyReportLines(report: CacheVerifyReport): string[] {
  const lines = [
    `${report.dir}: ${report.rows} rows, ${report.shardCount} shards, ` +
    `${report.shardsChecked} checked`,
    ...report.problems.map((p) => `problem: ${p}`),
  ];
  if (report.missingShards.length) {
    lines.push(
      `missing: ${report.missingShards.length} shards not finished (` +
        `${report.missingShards.slice(0, 20).join(", ")}${
          report.missingShards.length > 20 ? ", ..." : ""
        }); rerun the cache to finish them`,
    );
  }
  lines.push(...report.warnings.map((w) => `warning: ${w}`));
  lines.push(report.ok ? "OK" : "FAILED");
  return lines;
}

/** The teacher the CLI computes targets with, and how to release its GPU. */
export interface OpenedTeacher {
  teacher: Teacher;
  close(): void;
}

/** The signature `src/models/sdxl_teacher.ts` exports as `loadSdxlTeacher`. */
export type LoadSdxlTeacher = (gpu: Gpu, sdxlDir: string) => Promise<Teacher>;

/** Loads the SDXL teacher of `sdxlDir` on a fresh GPU device. */
export async function openSdxlTeacher(sdxlDir: string): Promise<OpenedTeacher> {
  const { loadSdxlTeacher } = await import("../models/sdxl_teacher.ts");
  const gpu = await Gpu.create();
  try {
    return { teacher: await loadSdxlTeacher(gpu, sdxlDir), close: () => gpu.destroy() };
  } catch (error) {
    gpu.destroy();
    throw error;
  }
}

function positiveInteger(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < 1) {
    throw new UsageError(`cache: ${flag} ${JSON.stringify(value)} is not a positive integer`);
  }
  return n;
}

function parseWorker(value: string | undefined): CacheWorker | undefined {
  if (value === undefined) return undefined;
  const match = /^(\d+)\/(\d+)$/.exec(value);
  const index = Number(match?.[1]);
  const count = Number(match?.[2]);
  if (!match || count < 1 || index >= count) {
    throw new UsageError(
      `cache: --shard ${JSON.stringify(value)} is not i/n with 0 <= i < n (e.g. 0/2 and 1/2)`,
    );
  }
  return { index, count };
}

function oneOf<T extends string>(flag: string, value: string | undefined, choices: readonly T[]) {
  if (value === undefined || (choices as readonly string[]).includes(value)) {
    return value as T | undefined;
  }
  throw new UsageError(`cache: ${flag} ${JSON.stringify(value)}: expected ${choices.join(", ")}`);
}

const OPTIONS = {
  data: { type: "string" },
  format: { type: "string" },
  "caption-field": { type: "string" },
  spright: { type: "string" },
  dedupe: { type: "boolean" },
  limit: { type: "string" },
  sdxl: { type: "string" },
  out: { type: "string" },
  "batch-size": { type: "string" },
  "rows-per-shard": { type: "string" },
  shard: { type: "string" },
  merge: { type: "boolean" },
  verify: { type: "boolean" },
} as const;

/** The `cache` command, computing with the teacher `openTeacher` gives for `--sdxl`. */
export function makeCacheCommand(
  openTeacher: (sdxlDir: string) => Promise<OpenedTeacher>,
): Command {
  return {
    name: "cache",
    summary: "compute the SDXL teacher's targets for a caption data set (resumable)",
    async run(args) {
      const { values } = parseCommandArgs("cache", args, OPTIONS);
      if (values.help) return console.log(HELP);
      const out = values.out;
      if (!out) throw new UsageError("cache: --out <folder> is required");
      if (values.verify || values.merge) {
        const given = Object.keys(values).filter((k) =>
          k !== "out" && k !== "verify" && k !== "merge"
        );
        if (values.verify && values.merge) {
          throw new UsageError("cache: give --verify or --merge, not both");
        }
        if (given.length) {
          throw new UsageError(
            `cache: --${values.verify ? "verify" : "merge"} takes only --out (got --${
              given.join(", --")
            })`,
          );
        }
        try {
          if (values.merge) {
            const manifest = await mergeCacheManifests(out);
            console.log(`${out}: merged ${manifest.shardCount} shards, ${manifest.rows} rows`);
            return;
          }
          const report = await verifyCache(out);
          for (const line of verifyReportLines(report)) console.log(line);
          if (!report.ok) {
            throw new Error(
              `${out}: ${report.problems.length} problem(s), ${report.missingShards.length} ` +
                `missing shard(s)`,
            );
          }
          return;
        } catch (error) {
          throw explainPermission(error, CACHE_TASK);
        }
      }
      if (!values.data) throw new UsageError("cache: --data <path> is required");
      if (!values.sdxl) throw new UsageError("cache: --sdxl <folder> is required");
      const sdxl = values.sdxl;
      const options: CacheOptions = {
        data: values.data,
        format: oneOf("--format", values.format, CAPTION_FORMATS),
        captionField: values["caption-field"],
        spright: oneOf("--spright", values.spright, SPRIGHT_CHOICES),
        dedupe: values.dedupe ?? false,
        limit: positiveInteger("--limit", values.limit),
        out,
        batchSize: positiveInteger("--batch-size", values["batch-size"]) ?? DEFAULT_BATCH_SIZE,
        rowsPerShard: positiveInteger("--rows-per-shard", values["rows-per-shard"]),
        worker: parseWorker(values.shard),
      };
      let opened: OpenedTeacher | undefined;
      try {
        await runCache(options, async () => (opened = await openTeacher(sdxl)).teacher);
      } catch (error) {
        throw explainPermission(error, CACHE_TASK);
      } finally {
        opened?.close();
      }
    },
  };
}

export const cacheCommand: Command = makeCacheCommand(openSdxlTeacher);
