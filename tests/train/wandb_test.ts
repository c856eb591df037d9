import assert from "node:assert/strict";
import { join } from "node:path";
import { startWandbTracking, wandbSync } from "../../src/cli/wandb_sync.ts";
import { type EvalRecord, MetricsLog, type StepRecord } from "../../src/train/metrics.ts";
import {
  readWandbState,
  wandbConfig,
  wandbConnection,
  wandbJson,
  type WandbRun,
} from "../../src/train/wandb.ts";
import { rejectsWith, withTempDir } from "../helpers.ts";
import { FakeWandb, parseWandbLine } from "./fake_wandb.ts";

const KEY = "test-key-0123456789abcdef";
const FAST = { flushIntervalMs: 60_000, flushRows: 2, retryDelaysMs: [5, 5, 5] };

function step(n: number): Omit<StepRecord, "type"> {
  return {
    step: n,
    epoch: 0,
    samples: 8 * n,
    loss: 1 / n,
    loss_seq: 0.75 / n,
    loss_pooled: 0.25 / n,
    lr: { resampler: 1e-4, lora: 2e-5 },
    grad_norm: { total: 2 * n, resampler: n, lora: n / 2 },
    clip_coef: 1,
    samples_per_s: 40,
    elapsed_s: 0.5 * n,
  };
}

/** An eval record with a field the trainer may add later (it must go through by name). */
function evaluation(n: number): Omit<EvalRecord, "type"> {
  const held = { heldout_loss: 2 / (n + 1), heldout_loss_seq: 1.5 / (n + 1) };
  return {
    step: n,
    ...held,
    heldout_loss_pooled: 0.5 / (n + 1),
    cos_seq: 0.5,
    cos_pooled: 0.6,
    r2_seq: n / 10,
  } as Omit<EvalRecord, "type">;
}

const CONFIG = {
  lr: { resampler: 1e-4, lora: 2e-5 },
  lora: { r: 4, targetModules: ["q_proj", "v_proj"] },
  seed: 5,
  total_steps: 6,
};

/** Logs steps `from..to` (evaluating at 0, 3 and the last) through a metrics log fed to W&B. */
async function logSteps(log: MetricsLog, from: number, to: number, last = 6) {
  if (from === 0) {
    await log.logRun(CONFIG, new Date("2026-01-02T03:04:05Z"));
    await log.logEval(evaluation(0));
    from = 1;
  }
  for (let n = from; n <= to; n++) {
    await log.logStep(step(n));
    if (n === 3 || n === last) await log.logEval(evaluation(n));
  }
}

async function withServer(run: (server: FakeWandb, dir: string) => Promise<void>) {
  const server = new FakeWandb(KEY);
  try {
    await withTempDir((dir) => run(server, dir));
  } finally {
    await server.close();
  }
}

function settings(server: FakeWandb | string, lines: string[] = [], key = KEY) {
  const baseUrl = typeof server === "string" ? server : server.baseUrl;
  const env = (name: string) => ({ WANDB_API_KEY: key, WANDB_BASE_URL: baseUrl })[name];
  return { ...FAST, env, log: (line: string) => lines.push(line) };
}

async function openTracked(dir: string, wandb: WandbRun, resumeFromStep?: number) {
  return await MetricsLog.open(dir, {
    ...(resumeFromStep === undefined ? {} : { resumeFromStep }),
    onRecord: (record) => wandb.record(record),
  });
}

function steps(history: string[]): number[] {
  return history.map((line) => parseWandbLine(line)._step as number);
}

async function assertNoKeyIn(dir: string, lines: string[]) {
  for await (const entry of Deno.readDir(dir)) {
    if (!entry.isFile) continue;
    const text = await Deno.readTextFile(join(dir, entry.name));
    assert.ok(!text.includes(KEY), `the API key is in ${entry.name}`);
  }
  assert.ok(!lines.some((line) => line.includes(KEY)), "the API key is in a log line");
}

Deno.test("wandb: connection settings are checked with the variable named", () => {
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  assert.deepEqual(wandbConnection(env({ WANDB_API_KEY: "k" })), {
    baseUrl: "https://api.wandb.ai",
    apiKey: "k",
  });
  assert.equal(
    wandbConnection(env({ WANDB_API_KEY: "k", WANDB_BASE_URL: "http://w.local:8080/" })).baseUrl,
    "http://w.local:8080",
  );
  assert.throws(() => wandbConnection(env({})), /WANDB_API_KEY/);
  assert.throws(
    () => wandbConnection(env({ WANDB_API_KEY: "k", WANDB_BASE_URL: "wandb.local" })),
    /WANDB_BASE_URL "wandb.local" is not a URL/,
  );
  assert.throws(
    () => wandbConnection(env({ WANDB_API_KEY: "k", WANDB_BASE_URL: "ftp://w.local" })),
    /WANDB_BASE_URL "ftp:\/\/w.local": expected an http\(s\) URL/,
  );
});

Deno.test("wandb: config in W&B's shape; non-finite numbers as W&B's JSON tokens", () => {
  assert.deepEqual(wandbConfig(CONFIG), {
    "lr.resampler": { value: 1e-4 },
    "lr.lora": { value: 2e-5 },
    "lora.r": { value: 4 },
    "lora.targetModules": { value: ["q_proj", "v_proj"] },
    "seed": { value: 5 },
    "total_steps": { value: 6 },
  });
  assert.equal(
    wandbJson({ a: NaN, b: -Infinity, c: "NaN", d: 1 }),
    '{"a":NaN,"b":-Infinity,"c":"NaN","d":1}',
  );
});

Deno.test("wandb: a run sends its config, every row in order at the right offsets, summary and completion", async () => {
  await withServer(async (server, dir) => {
    const lines: string[] = [];
    const wandb = await startWandbTracking(
      dir,
      { project: "distill-test", name: "tiny", tags: ["a", "b"] },
      false,
      settings(server, lines),
    );
    const log = await openTracked(dir, wandb);
    await logSteps(log, 0, 6);
    log.close();
    assert.equal(await wandb.finish(0), 0);

    const viewer = server.requests[0];
    assert.equal(viewer.authorization, "Basic " + btoa(`api:${KEY}`));
    const run = server.run(wandb.runId);
    const upsert = run.upserts.at(-1)!;
    assert.equal(upsert.project, "distill-test");
    assert.equal(upsert.entity, "fake-entity");
    assert.equal(upsert.displayName, "tiny");
    assert.deepEqual(upsert.tags, ["a", "b"]);
    assert.deepEqual(JSON.parse(upsert.config as string), wandbConfig(CONFIG));

    // Rows 0..6: eval 0 alone, evals 3 and 6 joined to their step's row.
    assert.deepEqual(steps(run.history), [0, 1, 2, 3, 4, 5, 6]);
    const row3 = parseWandbLine(run.history[3]);
    assert.equal(row3.loss, 1 / 3);
    assert.equal(row3["grad_norm/total"], 6);
    assert.equal(row3["lr/lora"], 2e-5);
    assert.equal(row3.heldout_loss, 0.5);
    assert.equal(row3.r2_seq, 0.3);
    assert.equal(row3._runtime, 1.5);
    assert.equal(row3._timestamp, Date.parse("2026-01-02T03:04:05Z") / 1000 + 1.5);
    assert.equal("type" in row3 || "step" in row3, false);
    assert.equal(parseWandbLine(run.history[0]).heldout_loss, 2);
    // Each batch starts where the one before ended.
    let offset = 0;
    for (const request of server.streams) {
      const chunk = (request.body.files as Record<string, { offset: number; content: [] }>)[
        "wandb-history.jsonl"
      ];
      if (!chunk) continue;
      assert.equal(chunk.offset, offset);
      offset += chunk.content.length;
    }
    assert.equal(offset, 7);
    assert.ok(server.streams.length >= 4, "rows go in batches of flushRows");
    const summary = parseWandbLine(run.summary[0]);
    assert.equal(summary.heldout_loss, 2 / 7);
    assert.equal(summary.loss, 1 / 6);
    assert.equal(summary._step, 6);
    assert.deepEqual(run.complete, { exitcode: 0 });
    assert.deepEqual(server.streams.at(-1)!.body.complete, true);

    const state = await readWandbState(dir);
    assert.equal(state?.history_offset, 7);
    assert.equal(state?.last_step, 6);
    await assertNoKeyIn(dir, lines);
  });
});

Deno.test("wandb: a 500 and a dropped connection are retried; no row is lost or doubled", async () => {
  await withServer(async (server, dir) => {
    const lines: string[] = [];
    const wandb = await startWandbTracking(dir, { project: "p" }, false, settings(server, lines));
    server.failures.push("500", "drop", "500");
    const log = await openTracked(dir, wandb);
    await logSteps(log, 0, 6);
    log.close();
    assert.equal(await wandb.finish(0), 0);
    assert.equal(server.failures.length, 0);
    assert.deepEqual(steps(server.run(wandb.runId).history), [0, 1, 2, 3, 4, 5, 6]);
    assert.deepEqual(server.run(wandb.runId).complete, { exitcode: 0 });
  });
});

Deno.test("wandb: a resumed run continues the same W&B run at its offset, without duplicate steps", async () => {
  await withServer(async (server, dir) => {
    const lines: string[] = [];
    const first = await startWandbTracking(dir, { project: "p" }, false, settings(server, lines));
    let log = await openTracked(dir, first);
    await logSteps(log, 0, 5); // killed after step 5; its checkpoint was at step 4
    log.close();
    await first.finish(1);
    assert.deepEqual(server.run(first.runId).complete, { exitcode: 1 });

    const second = await startWandbTracking(dir, { project: "p" }, true, settings(server, lines));
    assert.equal(second.runId, first.runId);
    log = await openTracked(dir, second, 4);
    await logSteps(log, 5, 6); // the resumed trainer repeats step 5
    log.close();
    assert.equal(await second.finish(0), 0);
    const run = server.run(first.runId);
    assert.deepEqual(steps(run.history), [0, 1, 2, 3, 4, 5, 6]);
    const offsets = server.streams.flatMap((r) => {
      const chunk = (r.body.files as Record<string, { offset: number }>)["wandb-history.jsonl"];
      return chunk ? [chunk.offset] : [];
    });
    assert.equal(new Set(offsets).size, offsets.length, `an offset was sent twice: ${offsets}`);
    assert.deepEqual(run.complete, { exitcode: 0 });
    assert.equal(parseWandbLine(run.summary[0]).heldout_loss, 2 / 7);
  });
});

Deno.test("wandb: with W&B unreachable the run goes on; wandb-sync sends the rows later, once", async () => {
  await withServer(async (server, dir) => {
    const lines: string[] = [];
    const closed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const deadUrl = `http://127.0.0.1:${closed.addr.port}`;
    closed.close();
    const wandb = await startWandbTracking(dir, { project: "p" }, false, settings(deadUrl, lines));
    const log = await openTracked(dir, wandb);
    await logSteps(log, 0, 6);
    log.close();
    assert.equal(await wandb.finish(0), 7);
    assert.match(lines.join("\n"), /unreachable/);
    assert.match(lines.at(-1)!, new RegExp(`7 history rows were not sent .*wandb-sync ${dir}`));

    assert.equal(await wandbSync(dir, undefined, settings(server, lines)), 0);
    const run = server.run(wandb.runId);
    assert.deepEqual(steps(run.history), [0, 1, 2, 3, 4, 5, 6]);
    assert.deepEqual(JSON.parse(run.upserts[0].config as string), wandbConfig(CONFIG));
    assert.deepEqual(run.complete, { exitcode: 0 });
    const sent = server.streams.length;

    // Again: nothing new goes out, the run stays as it is.
    assert.equal(await wandbSync(dir, undefined, settings(server, lines)), 0);
    const again = server.streams.slice(sent);
    assert.ok(again.every((r) => !("wandb-history.jsonl" in (r.body.files as object))));
    assert.deepEqual(steps(run.history), [0, 1, 2, 3, 4, 5, 6]);
    const summary = parseWandbLine(run.summary[0]);
    assert.deepEqual([summary._step, summary._runtime, summary.heldout_loss], [6, 3, 2 / 7]);
    await assertNoKeyIn(dir, lines);
  });
});

Deno.test("wandb: a refused key, a missing key and a folder never tracked are clear errors", async () => {
  await withServer(async (server, dir) => {
    const lines: string[] = [];
    await rejectsWith(
      () => startWandbTracking(dir, { project: "p" }, false, settings(server, lines, "wrong")),
      "refused the API key (HTTP 401)",
      "WANDB_API_KEY",
    );
    await rejectsWith(
      () => startWandbTracking(dir, { project: "p" }, false, settings(server, lines, "")),
      "WANDB_API_KEY",
    );
    const log = await MetricsLog.open(dir);
    await logSteps(log, 0, 2);
    log.close();
    await rejectsWith(() => wandbSync(dir, undefined, settings(server)), "pass --wandb <project>");
    assert.equal(server.requests.length, 0);
  });
});
