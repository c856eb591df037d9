import assert from "node:assert/strict";
import { join } from "node:path";
import type { CaptionRow } from "../../src/data/captions.ts";
import { openTargetCache, type TargetCache } from "../../src/data/target_cache.ts";
import {
  captionWords,
  HeldOutEvaluator,
  type Predictions,
  referencePool,
  sliceNames,
  targetMeans,
} from "../../src/train/evaluation.ts";
import { splitCacheRowsByFile } from "../../src/train/options.ts";
import { withTempDir } from "../helpers.ts";
import { wordTeacher, writeCache } from "./tiny_run.ts";

const CAPTIONS = [
  "a red cube left of a blue sphere",
  "a blue cube on a red table",
  "two green dogs without collars",
  "a red sphere under a green cube",
  "three blue birds on a wire",
  "a cat that is not black",
  "a green cube left of a red sphere",
  "two red dogs on a blue rug",
];

function rows(files: string[]): CaptionRow[] {
  return CAPTIONS.map((caption, i) => ({
    id: `${files[i % files.length]}.txt:${i + 1}`,
    caption,
    source: files[i % files.length],
  }));
}

async function withCache(
  captionRows: CaptionRow[],
  run: (cache: TargetCache) => Promise<void>,
): Promise<void> {
  await withTempDir(async (dir) => {
    await writeCache(join(dir, "cache"), captionRows, wordTeacher());
    await run(await openTargetCache(join(dir, "cache")));
  });
}

/** Outputs for the held-out rows: row i of `source` predicts held-out row i. */
function predictions(targets: Predictions): Predictions {
  return { seq: targets.seq.slice(), pooled: targets.pooled.slice() };
}

Deno.test("evaluation: the teacher itself scores R² 1, top-1 1; the mean scores R² 0", async () => {
  await withCache(rows(["a"]), async (cache) => {
    const train = [0, 1, 2, 3, 4];
    const heldOut = [5, 6, 7];
    const pool = referencePool(train);
    const mean = await targetMeans(cache, pool);
    const evaluator = await HeldOutEvaluator.create(cache, heldOut, pool, mean);
    const teacher = await cache.readRows(heldOut);

    const perfect = evaluator.report(predictions(teacher));
    assert.ok(
      Math.abs(perfect.student.r2Seq - 1) < 1e-6 && Math.abs(perfect.student.r2Pooled - 1) < 1e-6,
    );
    assert.equal(perfect.student.top1Seq, 1);
    assert.equal(perfect.student.top1Pooled, 1);
    assert.ok(Math.abs(perfect.student.centeredCosSeq - 1) < 1e-6);
    assert.ok(Math.abs(perfect.student.spreadSeq - 1) < 1e-6);
    assert.equal(perfect.chanceTop1, 1 / 3);
    assert.equal(perfect.chanceTop5, 1);

    const repeat = (v: Float32Array) => {
      const out = new Float32Array(v.length * 3);
      for (let i = 0; i < 3; i++) out.set(v, i * v.length);
      return out;
    };
    const flat = evaluator.report({ seq: repeat(mean.seq), pooled: repeat(mean.pooled) });
    assert.ok(Math.abs(flat.student.r2Seq) < 1e-6 && Math.abs(flat.student.r2Pooled) < 1e-6);
    assert.equal(flat.student.spreadSeq, 0);
    assert.equal(flat.student.top1Seq, 0, "a constant output ranks no target first");

    // R² and MSE by hand: the mean of the 5 training targets against the 3 held-out ones.
    let sq = 0;
    for (let r = 0; r < 3; r++) {
      for (let j = 0; j < mean.seq.length; j++) {
        sq += (teacher.seq[r * mean.seq.length + j] - mean.seq[j]) ** 2;
      }
    }
    assert.ok(Math.abs(flat.meanMseSeq / (sq / (3 * mean.seq.length)) - 1) < 1e-6);

    // Swapping two rows' outputs swaps their retrieval: 1 of 3 still ranks first.
    const swapped = predictions(teacher);
    const width = mean.seq.length;
    swapped.seq.set(teacher.seq.subarray(0, width), width);
    swapped.seq.set(teacher.seq.subarray(width, 2 * width), 0);
    assert.equal(evaluator.report(swapped).student.top1Seq, 1 / 3);
  });
});

Deno.test("evaluation: one held-out row leaves retrieval not defined; a small pool's neighbours are the mean", async () => {
  await withCache(rows(["a"]), async (cache) => {
    const pool = referencePool([0, 1, 2, 3, 4, 5, 6]);
    const mean = await targetMeans(cache, pool);
    const one = await HeldOutEvaluator.create(cache, [7], pool, mean);
    const report = one.report(predictions(await cache.readRows([7])));
    assert.equal(report.student.top1Seq, null);
    assert.equal(report.student.top5Pooled, null);
    assert.equal(report.chanceTop1, null);
    // A pool of no more than NEIGHBOURS (8) captions: the neighbours are all of them, and
    // their average is the mean (tests/train/learning_test.ts checks them on 270 captions).
    assert.ok(Math.abs(report.neighbours.r2Pooled) < 1e-6, `${report.neighbours.r2Pooled}`);
  });
  assert.throws(() => referencePool([]), /training rows/);
});

Deno.test("evaluation: slices by caption file, negation and length; words of a caption", () => {
  assert.deepEqual(sliceNames("t2i/color_val.txt:3", "a red cube", false), ["file:color"]);
  assert.deepEqual(sliceNames("t2i/color_val_seen.txt:3", "no red cube", true), [
    "file:color",
    "negation",
    "long",
  ]);
  assert.deepEqual(sliceNames("x", "a cat that isn't black", false), ["negation"]);
  assert.deepEqual(sliceNames("x", "nothing here? notable, knot", false), ["negation"]);
  assert.deepEqual(sliceNames("x", "a notable knot", false), []);
  assert.deepEqual([...captionWords("A Red-cube, a red CUBE!")], ["a", "red", "cube"]);
});

Deno.test("split by caption file: held-out files, repeats of training captions left out", () => {
  const ids = ["t/a_train.txt:1", "t/a_train.txt:2", "t/a_val.txt:1", "t/a_val.txt:2", "p.txt:1"];
  const captions = ["red cube", "blue cube", "red cube", "green cube", "a dog"];
  const split = splitCacheRowsByFile(ids, captions, ["a_val", "p"]);
  assert.deepEqual(split.train, [0, 1]);
  assert.deepEqual([...split.heldOut].sort(), [3, 4]);
  assert.match(split.warnings[0], /1 held-out rows repeat a training caption/);
  assert.throws(() => splitCacheRowsByFile(ids, captions, ["b_val"]), /b_val hold no row.*a_train/);
});
