import assert from "node:assert/strict";
import { join } from "node:path";
import {
  type EvalRecord,
  formatMetricsLine,
  METRICS_FILE,
  MetricsLog,
  type MetricsRecord,
  parseMetrics,
  readMetrics,
  type StepRecord,
} from "../../src/train/metrics.ts";

const CONFIG = { steps: 10, batch_size: 4, lr: { resampler: 1e-4, lora: 2e-5 } };
const START = new Date("2025-01-01T00:00:00Z");

function stepRecord(step: number): Omit<StepRecord, "type"> {
  return {
    step,
    epoch: Math.floor(step / 4),
    samples: step * 4,
    loss: 1 / step,
    loss_seq: 0.6 / step,
    loss_pooled: 0.4 / step,
    lr: { resampler: 1e-4 * (1 - step / 20), lora: 2e-5 * (1 - step / 20) },
    grad_norm: { total: 2 / step, resampler: 1.5 / step, lora: 0.5 / step },
    clip_coef: Math.min(1, step / 2),
    samples_per_s: 100 + step,
    elapsed_s: step * 0.04,
  };
}

function evalRecord(step: number): Omit<EvalRecord, "type"> {
  return {
    step,
    heldout_loss: 1.2 / step,
    heldout_loss_seq: 0.7 / step,
    heldout_loss_pooled: 0.5 / step,
    cos_seq: 1 - 0.1 / step,
    cos_pooled: 1 - 0.05 / step,
  };
}

/** Logs steps `from..to` as the trainer would: each step, then an eval every third step. */
async function logSteps(log: MetricsLog, from: number, to: number): Promise<void> {
  for (let step = from; step <= to; step++) {
    await log.logStep(stepRecord(step));
    if (step % 3 === 0) await log.logEval(evalRecord(step));
  }
}

/** A run folder whose log ran from the start to step `last`, uninterrupted. */
async function runUpTo(last: number): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "distill-metrics-" });
  using log = await MetricsLog.open(dir);
  await log.logRun(CONFIG, START);
  await logSteps(log, 1, last);
  return dir;
}

const readLog = (dir: string) => Deno.readFile(join(dir, METRICS_FILE));

Deno.test("metrics: records round-trip, one JSON line each, non-finite numbers included", async () => {
  const dir = await Deno.makeTempDir({ prefix: "distill-metrics-" });
  const diverged = { ...stepRecord(2), loss: NaN, loss_seq: Infinity, loss_pooled: -Infinity };
  {
    using log = await MetricsLog.open(dir);
    await log.logRun(CONFIG, START);
    await log.logStep(stepRecord(1));
    await log.logStep(diverged);
    await log.logEval(evalRecord(2));
  }
  const expected: MetricsRecord[] = [
    { type: "run", time: START.toISOString(), config: CONFIG },
    { type: "step", ...stepRecord(1) },
    { type: "step", ...diverged },
    { type: "eval", ...evalRecord(2) },
  ];
  assert.deepEqual(await readMetrics(dir), expected);

  const text = await Deno.readTextFile(join(dir, METRICS_FILE));
  const lines = text.split("\n");
  assert.equal(lines.pop(), "", "the log ends with a newline");
  assert.equal(lines.length, 4);
  for (const line of lines) JSON.parse(line); // plain JSON, so any reader takes it
  assert.match(lines[2], /"loss":"NaN","loss_seq":"Infinity","loss_pooled":"-Infinity"/);
  assert.ok(lines[1].startsWith('{"type":"step","step":1,'), lines[1]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("metrics: a torn last line is dropped, a complete one without newline kept", async () => {
  const dir = await runUpTo(3);
  const whole = await readMetrics(dir);
  const path = join(dir, METRICS_FILE);
  const complete = await Deno.readTextFile(path);

  await Deno.writeTextFile(path, complete + '{"type":"step","step":4,"epo');
  assert.deepEqual(await readMetrics(dir), whole);

  const next = formatMetricsLine({ type: "step", ...stepRecord(4) });
  await Deno.writeTextFile(path, complete + next.trimEnd());
  assert.deepEqual(await readMetrics(dir), [...whole, { type: "step", ...stepRecord(4) }]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("metrics: a bad line before the last is an error naming the file and line", () => {
  const good = formatMetricsLine({ type: "step", ...stepRecord(1) });
  assert.throws(
    () => parseMetrics(good + "{oops\n" + good, "run/metrics.jsonl"),
    /run\/metrics\.jsonl line 2: not JSON/,
  );
  assert.throws(
    () => parseMetrics('{"type":"bogus"}\n', "m.jsonl"),
    /m\.jsonl line 1: "type" is "bogus"/,
  );
  assert.throws(() => parseMetrics('{"type":"eval"}\n', "m.jsonl"), /without a numeric "step"/);
  assert.deepEqual(parseMetrics(""), []);
});

Deno.test("metrics: an absent log reads as empty", async () => {
  const dir = await Deno.makeTempDir({ prefix: "distill-metrics-" });
  assert.deepEqual(await readMetrics(dir), []);
  await Deno.remove(dir);
});

Deno.test("metrics: a new run refuses to append to an existing log unless told to overwrite", async () => {
  const dir = await runUpTo(2);
  await assert.rejects(() => MetricsLog.open(dir), /already has records: resume the run/);
  {
    using log = await MetricsLog.open(dir, { overwrite: true });
    await log.logRun({ fresh: true }, START);
  }
  assert.deepEqual(await readMetrics(dir), [{
    type: "run",
    time: START.toISOString(),
    config: { fresh: true },
  }]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("metrics: resuming cuts the log back to the checkpoint, byte for byte", async () => {
  const stopped = await runUpTo(6);
  const crashed = await runUpTo(8);
  // The crash also tore the line it was writing.
  await Deno.writeTextFile(join(crashed, METRICS_FILE), '{"type":"eval","st', { append: true });

  {
    using log = await MetricsLog.open(crashed, { resumeFromStep: 6 });
    assert.equal(log.lastStep, 6);
    assert.deepEqual(await readLog(crashed), await readLog(stopped));
    await logSteps(log, 7, 10);
  }
  const uninterrupted = await runUpTo(10);
  assert.deepEqual(await readLog(crashed), await readLog(uninterrupted));
  const leftovers = [...Deno.readDirSync(crashed)].map((e) => e.name);
  assert.deepEqual(leftovers, [METRICS_FILE], "no temp files left behind");

  for (const dir of [stopped, crashed, uninterrupted]) await Deno.remove(dir, { recursive: true });
});

Deno.test("metrics: resuming from step 0 keeps only the run record; a bad step is refused", async () => {
  const dir = await runUpTo(4);
  {
    using log = await MetricsLog.open(dir, { resumeFromStep: 0 });
    assert.equal(log.lastStep, undefined);
  }
  assert.deepEqual((await readMetrics(dir)).map((r) => r.type), ["run"]);
  await assert.rejects(
    () => MetricsLog.open(dir, { resumeFromStep: 1.5 }),
    /expected a step number/,
  );
  await assert.rejects(
    () => MetricsLog.open(dir, { resumeFromStep: -1 }),
    /expected a step number/,
  );
  await Deno.remove(dir, { recursive: true });
});
