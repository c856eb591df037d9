import type { Teacher } from "../models/teacher.ts";
import { Gpu } from "../gpu/device.ts";
import { CAPTION_FORMATS, SPRIGHT_CHOICES } from "../data/captions.ts";
import { type CacheOptions, runCache } from "../data/cache_job.ts";
import { type CacheWorker, DEFAULT_ROWS_PER_SHARD } from "../data/cache_format.ts";
import { type CacheVerifyReport, mergeCacheManifests, verifyCache } from "../data/cache_merge.ts";
import { type Command, parseCommandArgs, UsageError } from "./args.ts";
import { explainPermission, type ScopedTask } from "./progress.ts";

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
