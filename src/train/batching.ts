/**
 * Which training rows go into each optimizer step: length-bucketed batches.
 *
 * Every padded token costs a full forward and backward, and captions vary a lot in length
 * (the SPRIGHT sample with the Qwen chat template: median 36 tokens, max 88), so batches drawn
 * in plain random order are mostly padding. Each epoch instead shuffles the rows, sorts them by
 * token length within windows of `windowBatches` batches, cuts each window into batches (rows
 * of similar length, padded only to their batch's longest), and shuffles the batches' order.
 * The window keeps some randomness in which rows meet; the batch shuffle keeps short and long
 * batches mixed through the epoch.
 *
 * Batch encoding (`encodePrompts`) sorts all its prompts the same way, with no window or
 * shuffle: its batches need not be random, only alike in length.
 *
 * Everything of epoch `e` comes from one `Rng(epochSeed(e))`, so the rows of a step are a
 * function of the seed and the step alone and a run resumed mid-epoch takes the same batches.
 */
import { Rng } from "../util/rng.ts";

/** How the order is drawn, recorded with each checkpoint (the window is in the trajectory). */
export const EPOCH_ORDER_DESCRIPTION =
  `Rng(mixSeed(seed, 1, epoch)): permutation(trainRows), stable sort by token length within ` +
  `windows of bucketWindow batches, then permutation(batches)`;

export interface StepOrderOptions {
  /** Training rows (cache row indices). */
  train: readonly number[];
  /** Token length of each of `train`'s rows, in the same order. */
  lengths: readonly number[];
  stepBatch: number;
  /** Steps per epoch: the rows past `stepsPerEpoch * stepBatch` of each shuffle are dropped. */
  stepsPerEpoch: number;
  /** The seed of epoch `e`'s generator. */
  epochSeed: (epoch: number) => number;
  /** Batches per length-sorted window; 1: batches of plain shuffled rows. */
  windowBatches: number;
}

/** The rows of optimizer step `step`, length-bucketed (see the module comment). */
export class StepOrder {
  readonly stepsPerEpoch: number;
  readonly #options: StepOrderOptions;
  readonly #windowRows: number;
  #epoch = -1;
  #batches: number[][] = [];

  constructor(options: StepOrderOptions) {
    const { train, lengths, stepBatch, stepsPerEpoch } = options;
    if (lengths.length !== train.length) {
      throw new Error(`StepOrder: ${lengths.length} lengths for ${train.length} training rows`);
    }
    if (stepsPerEpoch * stepBatch > train.length) {
      throw new Error(
        `StepOrder: ${stepsPerEpoch} steps of ${stepBatch} need more than ${train.length} rows`,
      );
    }
    this.#options = options;
    this.stepsPerEpoch = stepsPerEpoch;
    this.#windowRows = options.windowBatches * stepBatch;
  }

  rows(step: number): number[] {
    const { stepsPerEpoch } = this;
    const epoch = Math.floor(step / stepsPerEpoch);
    if (epoch !== this.#epoch) {
      this.#epoch = epoch;
      this.#batches = this.#epochBatches(epoch);
    }
    return this.#batches[step % stepsPerEpoch];
  }

  #epochBatches(epoch: number): number[][] {
    const { train, lengths, stepBatch, stepsPerEpoch, epochSeed } = this.#options;
    const rng = new Rng(epochSeed(epoch));
    const used = rng.permutation(train.length).slice(0, stepsPerEpoch * stepBatch);
    const batches: number[][] = [];
    for (let start = 0; start < used.length; start += this.#windowRows) {
      const window = used.slice(start, start + this.#windowRows);
      for (const batch of lengthSortedBatches(window.map((i) => lengths[i]), stepBatch)) {
        batches.push(batch.map((k) => train[window[k]]));
      }
    }
    return rng.permutation(batches.length).map((i) => batches[i]);
  }
}

/**
 * The indices of `lengths` sorted by length and cut into batches of at most `batchSize`, so
 * each batch pads only to its own longest row. The sort is stable: rows of equal length keep
 * their order (a shuffled window's, or the prompts' own). Training cuts each window with it;
 * batch encoding cuts all its prompts at once.
 */
export function lengthSortedBatches(lengths: readonly number[], batchSize: number): number[][] {
  const order = Array.from(lengths.keys()).sort((a, b) => lengths[a] - lengths[b]);
  const batches: number[][] = [];
  for (let start = 0; start < order.length; start += batchSize) {
    batches.push(order.slice(start, start + batchSize));
  }
  return batches;
}

/** Share of the token positions of some padded batches that are padding. */
export function paddingFraction(
  batches: ReadonlyArray<{ lengths: readonly number[]; seqLen: number }>,
): number {
  let positions = 0;
  let tokens = 0;
  for (const { lengths, seqLen } of batches) {
    positions += lengths.length * seqLen;
    for (const length of lengths) tokens += length;
  }
  return positions === 0 ? 0 : (positions - tokens) / positions;
}
