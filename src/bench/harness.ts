/**
 * What `deno task bench` runs: a list of named benches, each returning result rows for the
 * JSON report, and the timing helper they share.
 */
import process from "node:process";
import type { Gpu } from "../gpu/device.ts";
import type { TorchStudentTimes } from "./student.ts";

/** One row of the report; benches add whatever fields describe the case (m, n, k, dtype...). */
export interface BenchResult {
  name: string;
  /** Median wall time of one call, GPU work included. */
  ms: number;
  /** Median process CPU time of one call (see GpuTiming.cpuMs). */
  cpuMs?: number;
  gflops?: number;
  [field: string]: unknown;
}

export interface BenchContext {
  gpu: Gpu;
  /** GFLOP/s of the plain-TypeScript matmul on this machine, to express results as ratios. */
  baselineGflops: number;
  /** PyTorch's times for the student bench (`--torch`), to print each row's ratio. */
  torch?: TorchStudentTimes;
}

export interface Bench {
  /** Selects the bench with `--only`; also the `name` of its result rows by convention. */
  name: string;
  summary: string;
  run(ctx: BenchContext): Promise<BenchResult[]>;
}

export interface TimingOptions {
  /** Timed batches; the median is reported (default 5). */
  reps?: number;
  /** Calls per batch are chosen so one batch takes about this long (default 100 ms). */
  batchMs?: number;
}

export interface GpuTiming {
  /** Median wall milliseconds per call. */
  ms: number;
  /**
   * Median process CPU milliseconds per call, all threads. On a CPU adapter this is the work
   * itself: ms x cores on an idle machine, and still meaningful when other jobs share the cores.
   */
  cpuMs: number;
}

/** Most calls in one timed batch (the parameter ring submits every 4096 dispatches). */
const MAX_CALLS_PER_BATCH = 4096;
/** Calls recorded per submission within a batch. */
const SUBMIT_EVERY = 64;

/**
 * Median time per call of `record`, which must only record GPU work. The first call
 * (pipeline compilation) is not timed. Batches double from one call until a batch with its one
 * wait takes `batchMs`: a wait costs about 11 ms through Deno's WebGPU (the round_trip rows),
 * which on a real GPU is far more than one call's work, so the batch must bury it. An estimate
 * from the difference of one and two calls did not: on an NVIDIA H200 it was mostly noise.
 */
export async function timeGpu(
  gpu: Gpu,
  record: () => void,
  { reps = 5, batchMs = 100 }: TimingOptions = {},
): Promise<GpuTiming> {
  record();
  await gpu.sync();
  let calls = 1;
  while (calls < MAX_CALLS_PER_BATCH && await timeCalls(gpu, record, calls) < batchMs) calls *= 2;
  const wall: number[] = [];
  const cpu: number[] = [];
  for (let r = 0; r < reps; r++) {
    const cpuStart = process.cpuUsage();
    wall.push((await timeCalls(gpu, record, calls)) / calls);
    const used = process.cpuUsage(cpuStart);
    cpu.push((used.user + used.system) / 1000 / calls);
  }
  return { ms: median(wall), cpuMs: median(cpu) };
}

/** Wall milliseconds of `calls` recorded calls and one wait for all of them. */
async function timeCalls(gpu: Gpu, record: () => void, calls: number): Promise<number> {
  const start = performance.now();
  for (let c = 1; c <= calls; c++) {
    record();
    // Scratch a call frees is reused only once its pass is submitted: submitting every
    // SUBMIT_EVERY calls keeps thousands of calls from holding thousands of scratch buffers.
    if (c % SUBMIT_EVERY === 0) gpu.flush();
  }
  await gpu.sync();
  return performance.now() - start;
}

/** Median wall time of `run` (host code) over `reps` runs after one warm-up run. */
export function timeHost(run: () => void, reps = 5): number {
  run();
  const times: number[] = [];
  for (let r = 0; r < reps; r++) {
    const start = performance.now();
    run();
    times.push(performance.now() - start);
  }
  return median(times);
}

/** The middle value (the mean of the two middle ones for an even count). */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}
