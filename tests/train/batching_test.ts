import assert from "node:assert/strict";
import { loadQwenTokenizerFromPackage } from "../../src/text/qwen_tokenizer.ts";
import {
  lengthSortedBatches,
  paddingFraction,
  StepOrder,
  type StepOrderOptions,
} from "../../src/train/batching.ts";

const PROMPTS = new URL("../fixtures/prompts/", import.meta.url).pathname;
const DEMO_PROMPTS = new URL("../../data/prompts/demo_prompts.txt", import.meta.url).pathname;

/** Padding share of `batches` of row indices, each padded to its longest row. */
function batchesPadding(batches: number[][], lengths: readonly number[]): number {
  return paddingFraction(batches.map((rows) => {
    const ls = rows.map((row) => lengths[row]);
    return { lengths: ls, seqLen: Math.max(...ls) };
  }));
}

/** The SPRIGHT sample's 48 captions (spatial and original of each of 24 images). */
async function sprightCaptions(): Promise<string[]> {
  const lines = (await Deno.readTextFile(`${PROMPTS}spright_coco_sample24.jsonl`))
    .trim().split("\n").map((line) => JSON.parse(line));
  return lines.flatMap((l) => [l.spatial_caption, l.original_caption]);
}

/** Mean padding share of every step of epoch 0, each step padded to its longest row. */
function epochPadding(order: StepOrder, lengthOf: Map<number, number>): number {
  const batches = Array.from({ length: order.stepsPerEpoch }, (_, step) => {
    const lengths = order.rows(step).map((row) => lengthOf.get(row)!);
    return { lengths, seqLen: Math.max(...lengths) };
  });
  return paddingFraction(batches);
}

Deno.test("paddingFraction: padded positions over all positions of the batches", () => {
  assert.equal(paddingFraction([]), 0);
  assert.equal(paddingFraction([{ lengths: [3, 1], seqLen: 3 }]), 2 / 6);
  assert.equal(
    paddingFraction([{ lengths: [3, 1], seqLen: 3 }, { lengths: [5], seqLen: 5 }]),
    2 / 11,
  );
});

Deno.test("StepOrder: each epoch uses every kept row once, in batches of similar length, the same after a restart", () => {
  const train = Array.from({ length: 50 }, (_, i) => 100 + i);
  const lengths = train.map((_, i) => 1 + ((i * 37) % 23));
  const lengthOf = new Map(train.map((row, i) => [row, lengths[i]]));
  const options: StepOrderOptions = {
    train,
    lengths,
    stepBatch: 4,
    stepsPerEpoch: 12,
    epochSeed: (epoch) => 7 + epoch,
    windowBatches: 3,
  };
  const order = new StepOrder(options);
  const epoch0 = Array.from({ length: 12 }, (_, step) => order.rows(step));
  assert.ok(epoch0.every((rows) => rows.length === 4));
  const used = epoch0.flat();
  assert.equal(new Set(used).size, 48, "no row twice in an epoch");
  assert.ok(used.every((row) => train.includes(row)));
  // Within a window rows are sorted, so a batch's lengths never decrease.
  for (const rows of epoch0) {
    const ls = rows.map((row) => lengthOf.get(row)!);
    assert.deepEqual(ls, [...ls].sort((a, b) => a - b), `batch ${rows} sorted by length`);
  }
  const epoch1 = Array.from({ length: 12 }, (_, step) => order.rows(12 + step));
  assert.notDeepEqual(epoch1, epoch0, "each epoch has its own batches");
  const resumed = new StepOrder(options);
  assert.deepEqual(resumed.rows(17), epoch1[5], "a function of the seed and the step alone");
  assert.deepEqual(resumed.rows(4), epoch0[4]);
  const otherSeed = new StepOrder({ ...options, epochSeed: (epoch) => 8 + epoch });
  assert.notDeepEqual(otherSeed.rows(0), epoch0[0]);

  const unbucketed = epochPadding(new StepOrder({ ...options, windowBatches: 1 }), lengthOf);
  const bucketed = epochPadding(new StepOrder({ ...options, windowBatches: 12 }), lengthOf);
  assert.ok(bucketed < unbucketed / 2, `padding ${bucketed} bucketed vs ${unbucketed}`);

  assert.throws(() => new StepOrder({ ...options, lengths: [1] }), /1 lengths for 50 training/);
  assert.throws(() => new StepOrder({ ...options, stepsPerEpoch: 13 }), /need more than 50/);
});

Deno.test("StepOrder on SPRIGHT captions with the Qwen chat template: at most 5% padding, against far more in random order", async () => {
  const captions = await sprightCaptions();
  const tokenizer = await loadQwenTokenizerFromPackage();
  const lengths = captions.map((c) => tokenizer.encode(c, { mode: "chat" }).ids.length);
  const train = captions.map((_, i) => i);
  const lengthOf = new Map(train.map((row) => [row, lengths[row]]));
  const options = { train, lengths, stepBatch: 4, stepsPerEpoch: 12, epochSeed: () => 3 };
  const random = epochPadding(new StepOrder({ ...options, windowBatches: 1 }), lengthOf);
  const bucketed = epochPadding(new StepOrder({ ...options, windowBatches: 12 }), lengthOf);
  assert.ok(bucketed <= 0.05, `bucketed padding ${bucketed}`);
  assert.ok(random > 0.2, `random-order padding ${random}`);
});

Deno.test("lengthSortedBatches: every index once, batches ascending in length, ties in input order", () => {
  const lengths = [5, 2, 9, 2, 7, 1, 5];
  assert.deepEqual(lengthSortedBatches(lengths, 3), [[5, 1, 3], [0, 6, 4], [2]]);
  assert.deepEqual(lengthSortedBatches(lengths, 1), [[5], [1], [3], [0], [6], [4], [2]]);
  assert.deepEqual(lengthSortedBatches(lengths, 10), [[5, 1, 3, 0, 6, 4, 2]]);
  assert.deepEqual(lengthSortedBatches([], 4), []);
});

Deno.test("lengthSortedBatches at encode's default batch of 8 cuts the padding of demo prompts and SPRIGHT captions", async () => {
  const tokenizer = await loadQwenTokenizerFromPackage();
  const demo = (await Deno.readTextFile(DEMO_PROMPTS)).trim().split("\n");
  // Measured (Qwen chat template, limit 256): demo_prompts.txt, 256 prompts of 20 tokens median
  // and 70 at most, 19.2% padding in input order and 5.1% bucketed; the SPRIGHT sample, 48
  // captions of 41 median and 85 at most, 43.8% and 10.0%.
  const sets: Array<[string[], number, number]> = [
    [demo, 0.15, 0.06],
    [await sprightCaptions(), 0.4, 0.11],
  ];
  for (const [prompts, inOrderAtLeast, bucketedAtMost] of sets) {
    const { lengths } = tokenizer.encodeBatch(prompts, { mode: "chat", maxTokens: 256 });
    const inOrder = Array.from(
      { length: Math.ceil(lengths.length / 8) },
      (_, b) => Array.from(lengths.keys()).slice(b * 8, b * 8 + 8),
    );
    const plain = batchesPadding(inOrder, lengths);
    const bucketed = batchesPadding(lengthSortedBatches(lengths, 8), lengths);
    assert.ok(plain >= inOrderAtLeast, `${prompts.length} prompts in input order: ${plain}`);
    assert.ok(bucketed <= bucketedAtMost, `${prompts.length} prompts bucketed: ${bucketed}`);
  }
});
