/**
 * Live tracking in Weights & Biases over the two plain HTTP endpoints W&B's own clients use,
 * with metrics.jsonl (src/train/metrics.ts) staying the record:
 *
 * - `POST {base}/graphql`, mutation `upsertBucket`: creates or updates the run (id, display
 *   name, project, entity, tags, config as `{"key": {"value": ...}}` with nested groups
 *   flattened to dotted keys, as the W&B config table shows them).
 * - `POST {base}/files/{entity}/{project}/{run}/file_stream`: appends history lines to
 *   `wandb-history.jsonl` at a line offset, rewrites `wandb-summary.json` (line 0), and at the
 *   end marks the run `complete` with its `exitcode`.
 *
 * Each optimizer step becomes one history row with `_step` = the step; an evaluation logged
 * after that step joins its row (the one before training is row 0), so `_step` only grows.
 * Nested record fields are flattened with "/" (`grad_norm/total`), which W&B groups into
 * panel sections; every other field keeps its metrics.jsonl name, new ones included.
 *
 * Rows are queued and sent in batches (every `flushIntervalMs` or `flushRows` rows), with
 * retries and backoff on network errors, 429 and 5xx. Nothing here blocks or fails training:
 * `record` only queues, and rows W&B did not take stay in metrics.jsonl, to be sent by
 * `deno task wandb-sync`. What was sent is kept in `<runDir>/wandb.json` (run id, history
 * offset, last step sent; never the key), so a resumed run or a sync continues the same W&B
 * run at the right offset and skips the steps W&B already has: a resumed run repeats the
 * steps after its checkpoint bit for bit, so those rows are the same.
 */
import { join } from "node:path";
import { writeFileAtomic } from "../io/atomic.ts";
import type { MetricsRecord, StepRecord } from "./metrics.ts";

export const DEFAULT_WANDB_BASE_URL = "https://api.wandb.ai";
/** Where a run folder keeps its W&B run and how far its history was sent. */
export const WANDB_STATE_FILE = "wandb.json";
export const HISTORY_FILE = "wandb-history.jsonl";
export const SUMMARY_FILE = "wandb-summary.json";

/** The server and key, from WANDB_BASE_URL and WANDB_API_KEY. */
export interface WandbConnection {
  /** Origin and optional path prefix, without a trailing slash. */
  baseUrl: string;
  /** The API key; never written to disk or to a log line. */
  apiKey: string;
}

/** Which W&B run to log to. */
export interface WandbRunOptions {
  /** The W&B project. */
  project: string;
  /** Default: the key owner's default entity. */
  entity?: string;
  /** Display name; default: W&B picks one. */
  name?: string;
  /** Tags shown with the run. */
  tags?: string[];
}

/** What `<runDir>/wandb.json` holds. */
export interface WandbState {
  base_url: string;
  entity: string;
  project: string;
  run_id: string;
  name?: string;
  tags?: string[];
  /** Unix seconds the run started (its `run` record), for `_timestamp`. */
  start_time?: number;
  /** History lines W&B has taken: the offset of the next one. */
  history_offset: number;
  /** `_step` of the last history row W&B has taken (-1: none). */
  last_step: number;
}

/** How often queued rows are sent and how failed requests are retried. */
export interface WandbTiming {
  /** Send queued rows at least this often (default 15 s). */
  flushIntervalMs?: number;
  /** ...or as soon as this many are queued (default 50). */
  flushRows?: number;
  /** Waits before each retry of a failed request; their count is the retries (default 1-16 s). */
  retryDelaysMs?: number[];
  /** Give up on one request after this long (default 30 s). */
  requestTimeoutMs?: number;
}

const DEFAULT_TIMING: Required<WandbTiming> = {
  flushIntervalMs: 15_000,
  flushRows: 50,
  retryDelaysMs: [1000, 2000, 4000, 8000, 16000],
  requestTimeoutMs: 30_000,
};

/** Reads and checks the connection settings; `env` is `Deno.env.get` or a stand-in. */
export function wandbConnection(env: (name: string) => string | undefined): WandbConnection {
  const apiKey = env("WANDB_API_KEY")?.trim();
  if (!apiKey) {
    throw new Error(
      "--wandb needs an API key in WANDB_API_KEY (from https://wandb.ai/authorize, or your " +
        "server's /authorize page)",
    );
  }
  const raw = env("WANDB_BASE_URL")?.trim() || DEFAULT_WANDB_BASE_URL;
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new Error(
      `WANDB_BASE_URL ${JSON.stringify(raw)} is not a URL; expected e.g. ` +
        `${DEFAULT_WANDB_BASE_URL} or http://wandb.example.org:8080`,
    );
  }
  if (!["http:", "https:"].includes(url.protocol) || url.username || url.password) {
    throw new Error(
      `WANDB_BASE_URL ${JSON.stringify(raw)}: expected an http(s) URL without user or ` +
        `password (the key goes in WANDB_API_KEY), e.g. ${DEFAULT_WANDB_BASE_URL}`,
    );
  }
  return { baseUrl: (url.origin + url.pathname).replace(/\/+$/, ""), apiKey };
}

type Json = Record<string, unknown>;

function flatten(value: Json, separator: string, prefix = "", into: Json = {}): Json {
  for (const [key, inner] of Object.entries(value)) {
    const name = prefix + key;
    if (inner !== null && typeof inner === "object" && !Array.isArray(inner)) {
      flatten(inner as Json, separator, name + separator, into);
    } else {
      into[name] = inner;
    }
  }
  return into;
}

/** A run's config in W&B's shape: dotted keys for nested groups, each `{"value": ...}`. */
export function wandbConfig(config: Json): Record<string, { value: unknown }> {
  return Object.fromEntries(
    Object.entries(flatten(config, ".")).map(([key, value]) => [key, { value }]),
  );
}

/** A step or eval record's metrics: nested fields joined with "/", `type` and `step` left out. */
export function historyFields(record: MetricsRecord): Json {
  const { type: _type, step: _step, ...fields } = record as StepRecord;
  return flatten(fields, "/");
}

const NON_FINITE_TAG = "\u0000nonfinite:";

/**
 * JSON as W&B's Python client writes it: non-finite numbers as the bare tokens NaN, Infinity
 * and -Infinity (which W&B reads), not as null.
 */
export function wandbJson(value: unknown): string {
  return JSON.stringify(
    value,
    (_k, v) => typeof v === "number" && !Number.isFinite(v) ? NON_FINITE_TAG + v : v,
  ).replace(/"\\u0000nonfinite:(NaN|Infinity|-Infinity)"/g, "$1");
}

/** A W&B-style run id: 8 characters of [a-z0-9]. */
export function newRunId(): string {
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  return Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => alphabet[b % 36]).join("");
}

export async function readWandbState(runDir: string): Promise<WandbState | undefined> {
  const path = join(runDir, WANDB_STATE_FILE);
  try {
    return JSON.parse(await Deno.readTextFile(path)) as WandbState;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw new Error(`${path}: ${(err as Error).message}; delete it to start a new W&B run`);
  }
}

/** An HTTP failure worth retrying: the network, a timeout, 429 or 5xx. */
class TransientError extends Error {}

interface HistoryRow {
  step: number;
  fields: Json;
  runtime: number;
}

/** Options of `WandbRun.start` besides the run and the connection. */
export interface WandbStartOptions extends WandbTiming {
  /** Continue the W&B run recorded in `<runDir>/wandb.json` (a new one when there is none). */
  resume: boolean;
  /** Notes and warnings, one line each. */
  log: (line: string) => void;
  /** What to tell the user to run for unsent rows, e.g. `deno task wandb-sync runs/x`. */
  syncHint: string;
}

/** One W&B run fed with metrics records; see the module comment. */
export class WandbRun {
  private readonly timing: Required<WandbTiming>;
  private config: Json | undefined;
  private upserted = false;
  private pending: HistoryRow | undefined;
  private readonly queue: HistoryRow[] = [];
  private lastQueuedStep: number;
  private summary: Json = {};
  private sending: Promise<void> = Promise.resolve();
  private busy = false;
  private saving: Promise<void> = Promise.resolve();
  private timer: ReturnType<typeof setInterval> | undefined;
  /** Set when W&B refused a request for good (not a network error): nothing more is sent. */
  private refused: string | undefined;
  private lastError: string | undefined;
  /** Whether a record came: before that, nothing is sent (training may still refuse). */
  private stateWritten = false;

  private constructor(
    private readonly connection: WandbConnection,
    private readonly runDir: string,
    private readonly state: WandbState,
    private readonly options: WandbStartOptions,
  ) {
    this.timing = {
      flushIntervalMs: options.flushIntervalMs ?? DEFAULT_TIMING.flushIntervalMs,
      flushRows: options.flushRows ?? DEFAULT_TIMING.flushRows,
      retryDelaysMs: options.retryDelaysMs ?? DEFAULT_TIMING.retryDelaysMs,
      requestTimeoutMs: options.requestTimeoutMs ?? DEFAULT_TIMING.requestTimeoutMs,
    };
    this.lastQueuedStep = state.last_step;
  }

  /**
   * Checks the key (a 401 is an error naming WANDB_API_KEY) and finds the entity, then returns
   * a run that sends what it is fed. An unreachable server is only a warning: the run goes on
   * without W&B and the rows can be sent later.
   */
  static async start(
    connection: WandbConnection,
    run: WandbRunOptions,
    runDir: string,
    options: WandbStartOptions,
  ): Promise<WandbRun> {
    const saved = options.resume ? await readWandbState(runDir) : undefined;
    if (saved && (saved.project !== run.project || saved.base_url !== connection.baseUrl)) {
      options.log(
        `wandb: continuing run ${saved.run_id} of project ${saved.project} at ${saved.base_url} ` +
          `(from ${join(runDir, WANDB_STATE_FILE)})`,
      );
    }
    const state: WandbState = saved ?? {
      base_url: connection.baseUrl,
      entity: run.entity ?? "",
      project: run.project,
      run_id: newRunId(),
      ...(run.name ? { name: run.name } : {}),
      ...(run.tags?.length ? { tags: run.tags } : {}),
      history_offset: 0,
      last_step: -1,
    };
    const wandb = new WandbRun(connection, runDir, state, options);
    try {
      const viewer = await wandb.graphql("query Viewer { viewer { id entity } }", {}, 2);
      const entity = (viewer as { viewer?: { entity?: string } | null }).viewer?.entity;
      if (!state.entity && entity) state.entity = entity;
      if (!state.entity) throw new Error("W&B did not name a default entity: pass --wandb-entity");
    } catch (err) {
      if (!(err instanceof TransientError)) throw err;
      wandb.goOffline(`${connection.baseUrl} is unreachable (${err.message})`);
    }
    const timer = setInterval(() => wandb.flush(), wandb.timing.flushIntervalMs);
    Deno.unrefTimer(timer);
    wandb.timer = timer;
    return wandb;
  }

  /** The run's page on the W&B site (app host of the API host). */
  get url(): string {
    const app = this.connection.baseUrl.replace("://api.wandb.ai", "://wandb.ai");
    return `${app}/${this.state.entity}/${this.state.project}/runs/${this.state.run_id}`;
  }

  /** The W&B run id (kept in `<runDir>/wandb.json` for a resumed run). */
  get runId(): string {
    return this.state.run_id;
  }

  /** Queues one metrics record; never waits and never throws. */
  record(record: MetricsRecord): void {
    if (!this.stateWritten) {
      // The first record means training accepted the run folder: claim it for this W&B run.
      this.stateWritten = true;
      this.saveState();
    }
    if (record.type === "run") {
      this.config = record.config;
      this.state.start_time ??= Date.parse(record.time) / 1000;
      this.upserted = false;
      return;
    }
    const fields = historyFields(record);
    // The summary takes every record, those W&B already has too, so it ends on the last values.
    Object.assign(this.summary, fields, { _step: record.step });
    if (record.type === "step") this.summary._runtime = record.elapsed_s;
    if (this.pending && record.step === this.pending.step) {
      Object.assign(this.pending.fields, fields);
      return;
    }
    if (record.step <= this.lastQueuedStep) return; // W&B has it from an earlier session
    if (this.pending) this.queue.push(this.pending);
    const runtime = record.type === "step" ? record.elapsed_s : this.pending?.runtime ?? 0;
    this.pending = { step: record.step, fields: { ...fields }, runtime };
    this.lastQueuedStep = record.step;
    if (this.queue.length >= this.timing.flushRows) this.flush();
  }

  /** Sends what is queued (after any send in flight); resolves when done or given up. */
  flush(final?: { exitCode: number }): Promise<void> {
    // A timer tick while a send (and its retries) is under way would only pile up behind it.
    if (this.busy && !final) return this.sending;
    this.busy = true;
    this.sending = this.sending.then(() => this.send(final)).finally(() => this.busy = false);
    return this.sending;
  }

  /**
   * Sends the rest and marks the run complete with `exitCode`, then stops. When rows could not
   * be sent, says how many and how to send them; returns that count.
   */
  async finish(exitCode: number): Promise<number> {
    clearInterval(this.timer);
    if (!this.stateWritten) return 0; // training stopped before its first record: no W&B run
    if (this.pending) this.queue.push(this.pending);
    this.pending = undefined;
    await this.flush({ exitCode });
    await this.saving;
    const unsent = this.queue.length;
    if (unsent > 0 || this.refused) {
      this.options.log(
        `wandb: ${unsent} history rows were not sent (${this.refused ?? this.lastError}); ` +
          `metrics.jsonl has them all: send them with ${this.options.syncHint}`,
      );
    } else {
      this.options.log(
        `wandb: run ${this.url} finished (exit code ${exitCode}), ${this.state.history_offset} rows`,
      );
    }
    return unsent;
  }

  /** Stops sending for the rest of the run (rows stay in metrics.jsonl for wandb-sync). */
  private goOffline(reason: string): void {
    this.refused = reason;
    this.options.log(`wandb: warning: ${reason}; training goes on without W&B`);
  }

  /** Writes wandb.json, after any write before it (so the newest state lands last). */
  private saveState(): Promise<void> {
    const path = join(this.runDir, WANDB_STATE_FILE);
    const text = JSON.stringify(this.state, null, 2) + "\n";
    this.saving = this.saving.then(() => writeFileAtomic(path, text)).catch((err) =>
      this.options.log(`wandb: warning: cannot write ${path}: ${(err as Error).message}`)
    );
    return this.saving;
  }

  /** Sends the queued history rows and the summary (and, with `final`, the run's end). */
  private async send(final?: { exitCode: number }): Promise<void> {
    if (this.refused || !this.stateWritten) return;
    try {
      if (!this.upserted) await this.upsert();
      const timestamp = this.state.start_time;
      while (this.queue.length > 0 || final) {
        const rows = this.queue.slice(0, this.timing.flushRows);
        const lines = rows.map((r) =>
          wandbJson({
            ...r.fields,
            _step: r.step,
            _runtime: r.runtime,
            _timestamp: timestamp === undefined ? Date.now() / 1000 : timestamp + r.runtime,
          })
        );
        const last = rows.at(-1);
        const files: Json = {};
        if (lines.length > 0) {
          files[HISTORY_FILE] = { offset: this.state.history_offset, content: lines };
        }
        files[SUMMARY_FILE] = { offset: 0, content: [wandbJson(this.summary)] };
        const done = final && rows.length === this.queue.length;
        await this.post(
          `files/${this.state.entity}/${this.state.project}/${this.state.run_id}/file_stream`,
          { files, ...(done ? { complete: true, exitcode: final.exitCode } : {}) },
        );
        this.queue.splice(0, rows.length);
        if (last) {
          this.state.history_offset += rows.length;
          this.state.last_step = last.step;
          await this.saveState();
        }
        if (done) break;
      }
    } catch (err) {
      if (err instanceof TransientError) {
        this.lastError = `${this.connection.baseUrl} unreachable: ${err.message}`;
        this.options.log(`wandb: warning: ${this.lastError}; will try again`);
      } else {
        this.goOffline((err as Error).message);
      }
    }
  }

  /** Creates or updates the run with its name, tags and config (GraphQL `upsertBucket`). */
  private async upsert(): Promise<void> {
    const s = this.state;
    const bucket = await this.graphql(UPSERT_BUCKET, {
      id: null,
      name: s.run_id,
      project: s.project,
      entity: s.entity,
      displayName: s.name ?? null,
      tags: s.tags ?? null,
      config: this.config ? wandbJson(wandbConfig(this.config)) : null,
    });
    if (!(bucket as { upsertBucket?: unknown }).upsertBucket) {
      throw new Error(`upsertBucket returned no run: ${JSON.stringify(bucket)}`);
    }
    this.upserted = true;
  }

  /** One GraphQL call, retried on network errors, 429 and 5xx. */
  private async graphql(query: string, variables: Json, retries?: number): Promise<Json> {
    const body = await this.post("graphql", { query, variables }, retries) as {
      data?: Json;
      errors?: { message?: string }[];
    };
    if (body.errors?.length) {
      throw new Error(
        `W&B GraphQL error: ${body.errors.map((e) => e.message ?? "?").join("; ")}`,
      );
    }
    return body.data ?? {};
  }

  /** POSTs JSON and returns the JSON reply, retrying transient failures with backoff. */
  private async post(path: string, payload: Json, retries?: number): Promise<unknown> {
    const delays = this.timing.retryDelaysMs.slice(0, retries);
    const url = `${this.connection.baseUrl}/${path}`;
    for (let attempt = 0;; attempt++) {
      try {
        return await this.postOnce(url, payload);
      } catch (err) {
        if (!(err instanceof TransientError) || attempt >= delays.length) throw err;
        await new Promise((resolve) => setTimeout(resolve, delays[attempt]));
      }
    }
  }

  /** One authenticated POST; throws with the status on an HTTP error. */
  private async postOnce(url: string, payload: Json): Promise<unknown> {
    let response: Response;
    let text: string;
    try {
      response = await fetch(url, {
        method: "POST",
        headers: {
          "Authorization": "Basic " + btoa(`api:${this.connection.apiKey}`),
          "Content-Type": "application/json",
        },
        body: wandbJson(payload),
        signal: AbortSignal.timeout(this.timing.requestTimeoutMs),
      });
      text = await response.text();
    } catch (err) {
      throw new TransientError((err as Error).message);
    }
    if (response.status === 429 || response.status >= 500) {
      throw new TransientError(`${url}: HTTP ${response.status}`);
    }
    if (response.status === 401 || response.status === 403) {
      throw new Error(
        `W&B at ${this.connection.baseUrl} refused the API key (HTTP ${response.status}): ` +
          `check WANDB_API_KEY (and WANDB_BASE_URL for a self-hosted server)`,
      );
    }
    if (!response.ok) {
      throw new Error(`${url}: HTTP ${response.status}: ${text.slice(0, 200)}`);
    }
    try {
      return JSON.parse(text);
    } catch {
      throw new Error(`${url}: the reply is not JSON: ${text.slice(0, 200)}`);
    }
  }
}

const UPSERT_BUCKET = `mutation UpsertBucket($id: String, $name: String, $project: String,
  $entity: String, $displayName: String, $tags: [String!], $config: JSONString) {
  upsertBucket(input: {id: $id, name: $name, modelName: $project, entityName: $entity,
    displayName: $displayName, tags: $tags, config: $config}) {
    bucket { id name displayName historyLineCount project { name entity { name } } }
    inserted
  }
}`;
