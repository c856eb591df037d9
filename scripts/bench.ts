/**
 * `deno task bench`: times the GPU ops on this machine's adapter and optionally writes the
 * results as JSON. Benches are listed in src/bench/benches.ts.
 */
import { BENCHES } from "../src/bench/benches.ts";
import { readTorchStudentTimes } from "../src/bench/student.ts";
import { timeBlockedMatmul } from "../src/bench/cpu_matmul.ts";
import type { BenchResult } from "../src/bench/harness.ts";
import { parseCommandArgs, UsageError } from "../src/cli/args.ts";
import { adapterReport } from "../src/gpu/adapter_report.ts";
import { Gpu } from "../src/gpu/device.ts";
import { writeFileAtomic } from "../src/io/atomic.ts";
import { OutputPathError, prepareOutputFile } from "../src/io/output_path.ts";

const BASELINE_SIZES = [256, 512];

const HELP = `deno task bench: time the GPU ops on this machine's WebGPU adapter.

Usage: deno task bench [--json FILE] [--only NAME[,NAME...]] [--torch FILE]

Options:
  --json FILE  also write the results as JSON to FILE (inside the project, e.g.
               bench-out/bench.json; the task may only write under the current folder)
  --only LIST  run only the named benches (${BENCHES.map((b) => b.name).join(", ")})
  --torch FILE the JSON that PyTorch's torch_student.py printed, measured on this machine
               just before: each student row then shows vsTorch (distill's seconds over
               PyTorch's; the NF4 forward is set against PyTorch's f32 forward), and
               the f32 matmul 1024³ shows fractionOfTorch (its GFLOP/s over PyTorch's
               OpenBLAS matmul, which torch_baseline.py prints first into the same file)
  -h, --help   show this help

The student bench (--only student runs it alone) writes a random bench-config Qwen3 to
bench-out/student-bench-qwen3/ once and times the forward with NF4 weights (decoded to f32, the
default, and to f16) and with f32 weights and one training step (NF4 + LoRA r16 q/k/v/o +
resampler, batch 1, 256 tokens). Where the adapter has timestamp-query it then profiles one
more step: student_step_kernel rows give each kernel's GPU time in it (longest first), its
calls and its share of the step's GPU time.

Every result is the median wall time (ms) of one call after a warm-up, GPU work included,
with the process CPU time (cpuMs, all threads) that tells how much of the machine a CPU
adapter really got when other jobs share the cores. Kernel rows time batches of calls that
double until one batch with its single wait takes 100 ms, because a wait costs about 11 ms
through Deno's WebGPU (the round_trip rows measure it), far more than a kernel on a real GPU;
student rows time whole calls, each with its one readback.
A plain-TypeScript blocked matmul at ${
  BASELINE_SIZES.join(" and ")
} gives the "baseline" GFLOP/s; each result's
vsBaseline is its GFLOP/s over the best baseline. Set DENO_WEBGPU_BACKEND=gl to time OpenGL.`;

async function main(args: string[]): Promise<number> {
  const { values } = parseCommandArgs("bench", args, {
    json: { type: "string" },
    only: { type: "string" },
    torch: { type: "string" },
  });
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  const known = new Set(BENCHES.map((b) => b.name));
  const only = values.only?.split(",").filter(Boolean);
  const unknown = only?.filter((name) => !known.has(name)) ?? [];
  if (unknown.length > 0) {
    throw new UsageError(`bench: unknown bench ${unknown.join(", ")} (known: ${[...known]})`);
  }
  const selected = BENCHES.filter((b) => !only || only.includes(b.name));
  const torch = values.torch
    ? await readTorchStudentTimes(values.torch).catch((error: Error) => {
      throw new UsageError(`bench: ${error.message}`);
    })
    : undefined;
  // Before minutes of timing: an unwritable --json would otherwise fail only at the end.
  if (values.json) {
    await prepareOutputFile(values.json, { force: true, flag: "--json" }).catch((error) => {
      if (error instanceof OutputPathError) throw new UsageError(`bench: ${error.message}`);
      if (!(error instanceof Deno.errors.NotCapable)) throw error;
      throw new UsageError(
        `bench: --json ${values.json}: this task may only write under the current folder ` +
          `(${Deno.cwd()}). Fix: give a path there, e.g. bench-out/bench.json`,
      );
    });
  }

  const gpu = await Gpu.create();
  const adapter = adapterReport(gpu);
  console.log(`adapter: ${adapter.description} (backend ${adapter.backend})`);
  const baselineResults = timeBlockedMatmul(BASELINE_SIZES);
  const baselineGflops = Math.max(...baselineResults.map((r) => r.gflops));
  for (const r of baselineResults) {
    console.log(
      `baseline TypeScript matmul ${r.size}: ${r.ms.toFixed(1)} ms, ${r.gflops.toFixed(2)} GFLOP/s`,
    );
  }
  const results: BenchResult[] = [];
  for (const bench of selected) {
    for (const result of await bench.run({ gpu, baselineGflops, torch })) {
      console.log(describe(result));
      results.push(result);
    }
  }
  if (values.json) {
    const report = {
      adapter: adapter.description,
      backend: adapter.backend,
      features: Object.entries(adapter.features).filter(([, on]) => on).map(([name]) => name),
      baseline: {
        name: "plain TypeScript blocked matmul (f32, square)",
        results: baselineResults,
        gflops: baselineGflops,
      },
      ...(torch ? { torch } : {}),
      results,
    };
    await writeFileAtomic(values.json, JSON.stringify(report, null, 2) + "\n");
    console.log(`wrote ${values.json}`);
  }
  gpu.destroy();
  return 0;
}

function describe(r: BenchResult): string {
  const { name, ms, cpuMs, gflops, ...fields } = r;
  const detail = Object.entries(fields)
    .filter(([key]) => key !== "vsBaseline")
    .map(([key, value]) => `${key}=${value}`)
    .join(" ");
  const cpu = cpuMs === undefined ? "" : ` (CPU ${cpuMs.toFixed(1)} ms)`;
  const rate = gflops === undefined ? "" : `, ${gflops.toFixed(2)} GFLOP/s`;
  return `${name} ${detail}: ${ms.toFixed(2)} ms${cpu}${rate}`;
}

try {
  Deno.exit(await main(Deno.args));
} catch (error) {
  if (!(error instanceof UsageError)) throw error;
  console.error(`${error.message}\n\n${HELP}`);
  Deno.exit(2);
}
