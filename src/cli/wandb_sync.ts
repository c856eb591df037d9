/**
 * W&B on the command line: the `--wandb` flags of `train`, starting a tracked run, and the
 * `wandb-sync` command that sends a run folder's metrics.jsonl afterwards (a run trained
 * offline, or rows a live run could not send). See src/train/wandb.ts for the wire format.
 */
import { join } from "node:path";
import { METRICS_FILE, readMetrics } from "../train/metrics.ts";
import {
  readWandbState,
  WANDB_STATE_FILE,
  wandbConnection,
  WandbRun,
  type WandbRunOptions,
  type WandbTiming,
} from "../train/wandb.ts";
import { type Command, parseCommandArgs, UsageError } from "./args.ts";

export const WANDB_OPTIONS = {
  wandb: { type: "string" },
  "wandb-entity": { type: "string" },
  "wandb-name": { type: "string" },
  "wandb-tags": { type: "string" },
} as const;

export const WANDB_FLAGS_HELP =
  `  --wandb <project>           log the run live to this Weights & Biases project (needs
                              WANDB_API_KEY; server WANDB_BASE_URL, default https://api.wandb.ai;
                              use 'deno task train:wandb', the only task with network access)
  --wandb-entity <entity>     W&B user or team (default: the key owner's default entity)
  --wandb-name <name>         display name of the W&B run (default: W&B picks one)
  --wandb-tags <list>         comma-separated W&B tags`;

/** The `--wandb*` flags as run options; undefined without `--wandb`. */
export function wandbRunOptions(
  command: string,
  v: { [K in keyof typeof WANDB_OPTIONS]?: string },
): WandbRunOptions | undefined {
  if (v.wandb === undefined) {
    const stray = (["wandb-entity", "wandb-name", "wandb-tags"] as const).find((f) => v[f]);
    if (stray) throw new UsageError(`${command}: --${stray} needs --wandb <project>`);
    return undefined;
  }
  if (!/^[\w.-]+$/.test(v.wandb)) {
    throw new UsageError(
      `${command}: --wandb ${JSON.stringify(v.wandb)}: expected a project name ` +
        `(letters, digits, '_', '-', '.')`,
    );
  }
  const tags = v["wandb-tags"]?.split(",").map((t) => t.trim()).filter((t) => t !== "");
  return {
    project: v.wandb,
    ...(v["wandb-entity"] ? { entity: v["wandb-entity"] } : {}),
    ...(v["wandb-name"] ? { name: v["wandb-name"] } : {}),
    ...(tags?.length ? { tags } : {}),
  };
}

/** How to reach W&B and what to say about it; tests pass a local server and short timings. */
export interface WandbStartSettings extends WandbTiming {
  env?: (name: string) => string | undefined;
  log?: (line: string) => void;
}

const ENV_VARS = ["WANDB_API_KEY", "WANDB_BASE_URL"];

function readEnv(name: string): string | undefined {
  if (Deno.permissions.querySync({ name: "env", variable: name }).state !== "granted") {
    throw new Error(
      `--wandb reads ${ENV_VARS.join(" and ")}, which this task may not: use ` +
        `'deno task train:wandb' (or add --allow-env=${ENV_VARS.join(",")} and ` +
        `--allow-net=<W&B host>)`,
    );
  }
  return Deno.env.get(name);
}

/**
 * Connects to W&B for the run folder `out` (errors for a missing or refused key, a bad
 * WANDB_BASE_URL or a missing network permission come here, before any training). With
 * `resume`, continues the W&B run in `<out>/wandb.json` and first catches up with the rows of
 * metrics.jsonl that W&B does not have.
 */
export async function startWandbTracking(
  out: string,
  run: WandbRunOptions,
  resume: boolean,
  settings: WandbStartSettings = {},
): Promise<WandbRun> {
  const { env = readEnv, log = (line: string) => console.error(line) } = settings;
  const connection = wandbConnection(env);
  const host = new URL(connection.baseUrl).host;
  if ((await Deno.permissions.query({ name: "net", host })).state !== "granted") {
    throw new Error(
      `--wandb needs network access to ${host}: use 'deno task train:wandb' (which may reach ` +
        `api.wandb.ai), or for another server run deno with --allow-net=${host}`,
    );
  }
  const wandb = await WandbRun.start(connection, run, out, {
    ...settings,
    resume,
    log,
    syncHint: `deno task wandb-sync ${out}`,
  });
  if (resume) { for (const record of await readMetrics(out)) wandb.record(record); }
  log(`wandb: logging to ${wandb.url}`);
  return wandb;
}

export const WANDB_SYNC_HELP =
  `distill wandb-sync: send a run folder's metrics.jsonl to Weights & Biases: a run trained
without --wandb, or the rows a live run could not send. Sending again sends nothing twice.

Usage: deno task wandb-sync <run folder> [--wandb <project>] [options]

${WANDB_FLAGS_HELP}
                              (all four only for a folder without ${WANDB_STATE_FILE}; a folder
                              that has one continues its W&B run)
  -h, --help                  show this help

The run is marked finished (exit code 0) when metrics.jsonl reaches its last step, failed
(1) otherwise. Permissions: the task reads and writes under ./runs, reads WANDB_API_KEY and
WANDB_BASE_URL, and reaches api.wandb.ai only; for a self-hosted server run
  deno run --allow-read=runs --allow-write=runs --allow-env=WANDB_API_KEY,WANDB_BASE_URL \\
    --allow-net=<host:port> scripts/wandb_sync.ts runs/<name>`;

/** Sends `<out>/metrics.jsonl`; returns the rows W&B did not take. */
export async function wandbSync(
  out: string,
  run: WandbRunOptions | undefined,
  settings: WandbStartSettings = {},
): Promise<number> {
  const records = await readMetrics(out);
  if (records.length === 0) throw new Error(`${join(out, METRICS_FILE)}: no records to send`);
  const saved = await readWandbState(out);
  if (!saved && !run) {
    throw new UsageError(
      `wandb-sync: ${out} has no ${WANDB_STATE_FILE} (it was trained without --wandb): ` +
        `pass --wandb <project>`,
    );
  }
  const runOptions = saved ? { project: saved.project } : run!;
  const wandb = await startWandbTracking(out, runOptions, true, settings);
  const first = records[0];
  const totalSteps = first.type === "run" ? first.config.total_steps : undefined;
  const lastStep = records.findLast((r) => r.type === "step")?.step;
  return await wandb.finish(lastStep !== undefined && lastStep === totalSteps ? 0 : 1);
}

export const wandbSyncCommand: Command = {
  name: "wandb-sync",
  summary: "send a run folder's metrics to Weights & Biases (idempotent)",
  async run(args) {
    const { values, positionals } = parseCommandArgs("wandb-sync", args, WANDB_OPTIONS, true);
    if (values.help) return console.log(WANDB_SYNC_HELP);
    if (positionals.length !== 1) {
      throw new UsageError("wandb-sync: expected one run folder, e.g. runs/my-run");
    }
    const unsent = await wandbSync(positionals[0], wandbRunOptions("wandb-sync", values));
    if (unsent > 0) throw new Error(`${unsent} rows were not sent; run the command again later`);
  },
};
