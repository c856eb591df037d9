/**
 * Does the student learn the prompt? A caption-dependent teacher (`wordTeacher`: targets follow
 * the caption's words and where they sit), held-out captions the student never trains on, and
 * the best prompt-independent predictor (the per-position training mean) as the bar. The
 * control trains on the same targets shuffled against their captions: same shapes and
 * statistics, no link to the prompt, so any gain there would come from the targets' shape,
 * not from the prompt.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import type { HeldOutReport } from "../../src/train/evaluation.ts";
import { train } from "../../src/train/trainer.ts";
import { testGpu } from "../helpers.ts";
import {
  promptRows,
  shuffledTeacher,
  tinyOptions,
  wordTeacher,
  writeCache,
  writeTinyQwen3,
} from "./tiny_run.ts";

const ROOT = await Deno.makeTempDir({ prefix: "distill-learning-" });
globalThis.addEventListener("unload", () => Deno.removeSync(ROOT, { recursive: true }));

let ready: Promise<void> | undefined;
function setup(): Promise<void> {
  return ready ??= (async () => {
    const rows = await promptRows();
    await writeTinyQwen3(join(ROOT, "qwen"));
    await writeCache(join(ROOT, "cache"), rows, wordTeacher());
    const captions = rows.map((r) => r.caption);
    await writeCache(join(ROOT, "shuffled"), rows, shuffledTeacher(wordTeacher(), captions));
  })();
}

/** 60 steps of 16 on 270 captions, evaluated on the 30 held out (10% by caption hash). */
async function heldOutAfterTraining(cache: string): Promise<HeldOutReport> {
  await setup();
  const result = await train({
    ...tinyOptions(ROOT, join(ROOT, "runs", cache)),
    cache: join(ROOT, cache),
    batchSize: 16,
    maxSteps: 60,
    epochs: 100,
    heldOutFraction: 0.1,
    evalRows: 0,
    evalEvery: 0,
    checkpointEvery: 0,
  }, { gpu: await testGpu(), log: () => {} });
  return result.evalAfter!.heldOut!;
}

function describe(h: HeldOutReport): string {
  const s = h.student;
  const f = (v: number | null) => v?.toFixed(3);
  return `R² seq ${f(s.r2Seq)} pooled ${f(s.r2Pooled)}, top-5 seq ${f(s.top5Seq)} ` +
    `pooled ${f(s.top5Pooled)} (chance ${f(h.chanceTop5)}), ${s.rows} rows`;
}

Deno.test("learning: on held-out captions the student beats the mean predictor and chance", async () => {
  const h = await heldOutAfterTraining("cache");
  const s = h.student;
  console.log(`student: ${describe(h)}; word neighbours R² seq ${h.neighbours.r2Seq.toFixed(3)}`);
  assert.ok(s.rows >= 20, describe(h));
  assert.ok(s.r2Seq > 0.04, `seq barely beats ignoring the prompt: ${describe(h)}`);
  assert.ok(s.r2Pooled > 0.1, `pooled barely beats ignoring the prompt: ${describe(h)}`);
  assert.ok(s.top5Seq! > 2.5 * h.chanceTop5!, `seq retrieval near chance: ${describe(h)}`);
  assert.ok(s.centeredCosSeq > 0.1 && s.centeredCosPooled > 0.2, describe(h));
  // The prompt-aware reference that needs no training also beats the mean here.
  assert.ok(h.neighbours.r2Pooled > 0.1, `word neighbours: R² ${h.neighbours.r2Pooled}`);
  // The student's outputs move with the prompt, though less than the teacher's.
  assert.ok(s.spreadSeq > 0.1 && s.spreadPooled > 0.1, describe(h));
});

Deno.test("learning control: targets shuffled against their captions give no gain", async () => {
  const h = await heldOutAfterTraining("shuffled");
  const s = h.student;
  console.log(`shuffled control: ${describe(h)}`);
  assert.ok(s.r2Seq < 0.02 && s.r2Pooled < 0.02, `learned unlinked targets: ${describe(h)}`);
  assert.ok(s.top5Seq! < 2 * h.chanceTop5!, `retrieval without a link: ${describe(h)}`);
});
