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
      // Array.prototype.sort is stable: rows of equal length keep their shuffled order.
      const window = used.slice(start, start + this.#windowRows)
        .sort((a, b) => lengths[a] - lengths[b]);
      for (let b = 0; b < window.length; b += stepBatch) {
        batches.push(window.slice(b, b + stepBatch).map((i) => train[i]));
      }
    }
    return rng.permutation(batches.length).map((i) => batches[i]);
  }
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
