import assert from "node:assert/strict";
import { join } from "node:path";
import { MANIFEST_FILE, shardFileName } from "../../src/data/cache_format.ts";
import { openTargetCache } from "../../src/data/target_cache.ts";
import { sha256File } from "../../src/util/hash.ts";
import { ModelFolder } from "../../src/io/hf.ts";
import { SafetensorsFile, writeSafetensors } from "../../src/io/safetensors.ts";
import { qwen3Config } from "../../src/models/qwen3_weights.ts";
import { destroyAdapter, loadAdapter } from "../../src/train/adapter.ts";
import { type MetricsRecord, readMetrics } from "../../src/train/metrics.ts";
import {
  checkResamplerFitsCache,
  microBatchSizes,
  resolveTrainConfig,
  splitCacheRows,
  type TrainOptions,
} from "../../src/train/options.ts";
import { EvalAccumulator } from "../../src/train/evaluation.ts";
import { readLatestCheckpoint } from "../../src/train/checkpoint.ts";
import { train } from "../../src/train/trainer.ts";
import { firstLine, testGpu } from "../helpers.ts";
import { readTree } from "../data/fake_teacher.ts";
import { promptRows, tinyOptions, wordTeacher, writeCache, writeTinySetup } from "./tiny_run.ts";

const ROOT = await Deno.makeTempDir({ prefix: "distill-train-" });
globalThis.addEventListener("unload", () => Deno.removeSync(ROOT, { recursive: true }));
const CACHE = join(ROOT, "cache");
const QWEN = join(ROOT, "qwen");
let ready: Promise<void> | undefined;

/** The tiny Qwen3 and its cache, written once for every test of this file. */
function setup(): Promise<void> {
  return ready ??= writeTinySetup(ROOT);
}

function options(name: string, extra: Partial<TrainOptions> = {}): TrainOptions {
  return { ...tinyOptions(ROOT, join(ROOT, "runs", name)), ...extra };
}

async function rejectsWith(run: () => Promise<unknown>, ...parts: string[]): Promise<void> {
  await assert.rejects(run, (error: Error) => {
    for (const part of parts) {
      assert.ok(error.message.includes(part), `"${part}" not in: ${error.message}`);
    }
    return true;
  });
}

async function copyFolder(from: string, to: string, skip: string[] = []): Promise<void> {
  await Deno.mkdir(to, { recursive: true });
  for await (const entry of Deno.readDir(from)) {
    if (entry.isFile && !skip.includes(entry.name)) {
      await Deno.copyFile(join(from, entry.name), join(to, entry.name));
    }
  }
}

/** The log without wall-clock values, which no two runs share. */
function withoutTimes(records: MetricsRecord[]): unknown[] {
  return records.map((r) => {
    if (r.type === "run") return { ...r, time: "" };
    if (r.type === "step") return { ...r, samples_per_s: 0, elapsed_s: 0 };
    return r;
  });
}

async function assertSameFiles(actual: string, expected: string, skip: string[] = []) {
  const [a, b] = [await readTree(actual), await readTree(expected)];
  for (const name of skip) {
    a.delete(name);
    b.delete(name);
  }
  assert.deepEqual([...a.keys()], [...b.keys()], `${actual}: file names differ`);
  for (const [name, bytes] of b) assert.deepEqual(a.get(name), bytes, `${actual}/${name} differs`);
}

Deno.test("train: starts at the mean target, held-out loss falls; adapter, metrics, report written", async () => {
  await setup();
  const gpu = await testGpu();
  const lines: string[] = [];
  const opts = options("converge", {
    maxSteps: 24,
    lr: { resampler: 1e-2, lora: 1e-3 },
    evalEvery: 12,
    evalRows: 0,
    checkpointEvery: 0,
  });
  const result = await train(opts, { gpu, log: (line) => lines.push(line) });
  const before = result.evalBefore!;
  const after = result.evalAfter!;
  assert.equal(before.rows, 12, "every held-out row (5% of 300 by caption hash)");
  // The mean start: before any step the student outputs the training mean, so it scores
  // exactly the mean predictor (R² 0) and its centered cosine is 0.
  const start = before.heldOut!;
  assert.ok(Math.abs(start.student.r2Seq) < 1e-4, `R² seq at the start ${start.student.r2Seq}`);
  assert.ok(Math.abs(start.student.r2Pooled) < 1e-4, `R² pooled ${start.student.r2Pooled}`);
  assert.ok(Math.abs(before.lossSeq / start.meanMseSeq - 1) < 1e-4);
  assert.ok(after.loss < before.loss, `held-out loss ${before.loss} -> ${after.loss}`);

  const records = await readMetrics(opts.out);
  assert.equal(records[0].type, "run");
  const evals = records.filter((r) => r.type === "eval").map((r) => r.step);
  const steps = records.filter((r) => r.type === "step").map((r) => r.step);
  assert.deepEqual(evals, [0, 12, 24]);
  assert.deepEqual(steps, Array.from({ length: 24 }, (_, i) => i + 1));
  const lastStep = records.findLast((r) => r.type === "step")!;
  assert.ok(lastStep.type === "step" && lastStep.samples === 24 * 8 && lastStep.epoch === 0);
  for (const r of records) {
    if (r.type !== "step") continue;
    assert.ok(r.padding !== undefined && r.padding >= 0 && r.padding < 1, `padding ${r.padding}`);
  }

  assert.ok((await Deno.stat(join(opts.out, "report.html"))).size > 1000);
  assert.deepEqual(await readLatestCheckpoint(opts.out), {
    step: 24,
    dir: join(opts.out, "checkpoints", "step-0000024"),
  });
  const folder = await ModelFolder.open(QWEN);
  const adapter = await loadAdapter(gpu, result.adapterDir, qwen3Config(folder));
  folder.close();
  assert.deepEqual(adapter.config.prompt, { mode: "raw", maxTokens: 24 });
  assert.equal(adapter.config.training?.heldout_loss_after, after.loss);
  assert.equal(adapter.resampler.config.numQueries, 8);
  destroyAdapter(adapter);
  assert.ok(lines.some((l) => l.includes("held-out loss") && l.includes("->")), lines.join("\n"));
  assert.ok(lines.some((l) => l.includes("held-out R²")), lines.join("\n"));
  const lastEval = records.findLast((r) => r.type === "eval")!;
  assert.ok(lastEval.type === "eval" && lastEval.r2_seq === after.heldOut!.student.r2Seq);
  assert.ok(lastEval.mean_loss_seq! > 0 && lastEval.chance_top1 === 1 / 12);
});

Deno.test("train: a run SIGKILLed mid-way and resumed ends byte-identical to an uninterrupted one", async () => {
  await setup();
  const gpu = await testGpu();
  const extra = { maxSteps: 8, microBatch: 4, checkpointEvery: 2, evalEvery: 3 };
  const straight = options("straight", extra);
  await train(straight, { gpu, log: () => {} });

  const killed = options("killed", extra);
  const script = new URL("./train_process.ts", import.meta.url).pathname;
  const config = new URL("../../deno.json", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--config", config, "-A", script, JSON.stringify(killed)],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  // The child says when it has logged a step past its latest checkpoint, then waits to be killed.
  const said = await firstLine(child);
  const ready = said.match(/^ready (\d+) (\d+)$/);
  if (ready) child.kill("SIGKILL");
  const status = await child.status;
  const stderr = await new Response(child.stderr).text();
  assert.ok(ready, `the child never reported a step past a checkpoint: ${said}\n${stderr}`);
  assert.equal(status.signal, "SIGKILL", `the child ended by itself: ${stderr}`);
  const stopped = await readLatestCheckpoint(killed.out);
  assert.ok(stopped && stopped.step < 8, `killed after step ${stopped?.step}`);
  const logged = (await readMetrics(killed.out)).filter((r) => r.type === "step").length;
  assert.ok(logged > stopped.step, "the log ran ahead of the checkpoint: resume must cut it");
  await assert.rejects(() => Deno.stat(join(killed.out, "adapter")), Deno.errors.NotFound);

  const lines: string[] = [];
  await train({ ...killed, resume: true }, { gpu, log: (line) => lines.push(line) });
  assert.ok(lines.some((l) => l.includes(`resuming after step ${stopped.step}`)), lines.join("\n"));

  await assertSameFiles(join(killed.out, "adapter"), join(straight.out, "adapter"));
  assert.deepEqual(
    withoutTimes(await readMetrics(killed.out)),
    withoutTimes(await readMetrics(straight.out)),
  );
  const final = (out: string) => join(out, "checkpoints", "step-0000008");
  await assertSameFiles(final(killed.out), final(straight.out), ["trainer_state.json"]);
  const state = async (out: string) => {
    const s = JSON.parse(await Deno.readTextFile(join(final(out), "trainer_state.json")));
    return { ...s, elapsedSeconds: 0 };
  };
  assert.deepEqual(await state(killed.out), await state(straight.out));
  const dirs = (await Array.fromAsync(Deno.readDir(join(killed.out, "checkpoints"))))
    .map((e) => e.name).sort();
  assert.deepEqual(dirs, ["latest.json", "step-0000006", "step-0000008"], "keepCheckpoints 2");
});

Deno.test("train: resuming with another cache or other settings, or restarting a run, is refused", async () => {
  await setup();
  const gpu = await testGpu();
  const done = options("done", { maxSteps: 2 });
  await train(done, { gpu, log: () => {} });
  const other = join(ROOT, "cache-other");
  const teacher = wordTeacher({ identity: { "text_encoder_2/model.safetensors": "sha256:g2" } });
  await writeCache(other, await promptRows(), teacher);
  await rejectsWith(
    () => train({ ...done, cache: other, resume: true }, { gpu, log: () => {} }),
    `cannot resume ${done.out}`,
    `the cache ${CACHE} (teacher`,
    "text_encoder_2/model.safetensors=sha256:fake-g",
    `this run reads ${other} (teacher`,
    "text_encoder_2/model.safetensors=sha256:g2",
    `--cache ${CACHE}`,
  );
  await rejectsWith(
    () =>
      train({ ...done, lr: { resampler: 1e-3, lora: 1e-3 }, resume: true }, { gpu, log: () => {} }),
    "lr.resampler: 0.003 (checkpoint) vs 0.001 (now)",
  );
  await rejectsWith(() => train(done, { gpu, log: () => {} }), "pass --resume to continue it");
});

Deno.test("train: a NaN in the cache stops training with the shard and row named", async () => {
  await setup();
  const gpu = await testGpu();
  const dir = join(ROOT, "cache-nan");
  await copyFolder(CACHE, dir);
  const cache = await openTargetCache(dir);
  // The first held-out row: the evaluation before the first step reads it.
  const row = splitCacheRows(cache.captions, 0.05).heldOut[0];
  const shard = Math.floor(row / cache.manifest.rowsPerShard);
  const path = join(dir, shardFileName(shard));
  const file = await SafetensorsFile.open(path);
  const at = file.info("prompt_embeds").byteOffset +
    2 * ((row - shard * cache.manifest.rowsPerShard) * cache.seqLen * cache.seqDim + 3);
  file.close();
  const bytes = await Deno.readFile(path);
  new DataView(bytes.buffer).setUint16(at, 0x7e00, true);
  await Deno.writeFile(path, bytes);
  const manifest = JSON.parse(await Deno.readTextFile(join(dir, MANIFEST_FILE)));
  manifest.shards[shard].sha256 = await sha256File(path);
  await Deno.writeTextFile(join(dir, MANIFEST_FILE), JSON.stringify(manifest));
  await rejectsWith(
    () => train(options("nan", { cache: dir }), { gpu, log: () => {} }),
    `${path}: prompt_embeds of row ${row}`,
    "NaN or infinity",
  );
});

Deno.test("train: a diverging run stops at the first non-finite loss, logged", async () => {
  await setup();
  const gpu = await testGpu();
  // Without a held-out split: no held-out figures, and the log says how to get them.
  const opts = options("diverge", {
    maxSteps: 6,
    lr: { resampler: 1e30, lora: 1e30 },
    heldOutFraction: 0,
  });
  const lines: string[] = [];
  await rejectsWith(
    () => train(opts, { gpu, log: (line) => lines.push(line) }),
    "training diverged at step",
    "Start a new run with lower learning rates",
  );
  const last = (await readMetrics(opts.out)).findLast((r) => r.type === "step")!;
  assert.ok(
    last.type === "step" && !Number.isFinite(last.loss),
    `last loss ${JSON.stringify(last)}`,
  );
  assert.ok(lines.some((l) => /no held-out rows .*--held-out 0\.05/.test(l)), lines.join("\n"));
});

Deno.test("train: bad models, LoRA targets and batch sizes are refused before the weights load", async () => {
  await setup();
  const gpu = await testGpu();
  const quiet = { gpu, log: () => {} };
  await rejectsWith(
    () => train(options("w", { lora: { targetModules: ["w_proj" as "q_proj"] } }), quiet),
    `LoRA target module 'w_proj' is not a linear layer of the Qwen3 in ${QWEN}`,
    "q_proj, k_proj",
  );

  const noK = join(ROOT, "qwen-no-k");
  await copyFolder(QWEN, noK, ["model.safetensors"]);
  const weights = await SafetensorsFile.open(join(QWEN, "model.safetensors"));
  const dropped = "model.layers.1.self_attn.k_proj.weight";
  const tensors = [];
  for (const name of weights.names().filter((n) => n !== dropped)) {
    const { dtype, shape } = weights.info(name);
    tensors.push({ name, dtype, shape, data: await weights.readBytes(name) });
  }
  weights.close();
  await writeSafetensors(join(noK, "model.safetensors"), tensors);
  await rejectsWith(
    () => train(options("no-k", { qwen: noK }), quiet),
    `${noK}/model.safetensors: tensor "${dropped}" is missing`,
  );

  const noTokenizer = join(ROOT, "qwen-no-tokenizer");
  await copyFolder(QWEN, noTokenizer, ["tokenizer.json"]);
  await rejectsWith(
    () => train(options("no-tok", { qwen: noTokenizer }), quiet),
    `"${noTokenizer}" has no tokenizer.json`,
  );

  await rejectsWith(
    () => train(options("big", { batchSize: 100, gradAccum: 3 }), quiet),
    "the batch of 300 samples per step is larger than the training split",
    "has 300 rows, 12 held out, 288 to train on",
  );
  await rejectsWith(
    () => train(options("both", { microBatch: 2, gradAccum: 2 }), quiet),
    "give microBatch (2) or gradAccum (2), not both",
  );
});

Deno.test("train: micro-batches follow the whole batch; gradient checkpointing changes no bit", async () => {
  await setup();
  const gpu = await testGpu();
  const extra = { maxSteps: 4, lora: { dropout: 0, r: 4, alpha: 8 }, checkpointEvery: 0 };
  const whole = await train(options("whole", extra), { gpu, log: () => {} });
  const split = await train(options("split", { ...extra, microBatch: 4 }), { gpu, log: () => {} });
  const losses = async (name: string) =>
    (await readMetrics(join(ROOT, "runs", name))).flatMap((r) => r.type === "step" ? [r.loss] : []);
  const [a, b] = [await losses("whole"), await losses("split")];
  a.forEach((loss, i) =>
    assert.ok(Math.abs(loss - b[i]) < 1e-4 * loss, `step ${i + 1}: ${loss} vs ${b[i]}`)
  );
  const [x, y] = [whole.evalAfter!.loss, split.evalAfter!.loss];
  assert.ok(Math.abs(x - y) < 1e-4 * x, `held-out ${x} vs ${y}`);
  // Recomputing activations repeats the same arithmetic: the same parameters, bit for bit.
  const recomputed = options("recomputed", { ...extra, gradientCheckpointing: true });
  await train(recomputed, { gpu, log: () => {} });
  await assertSameFiles(join(recomputed.out, "adapter"), whole.adapterDir);
});

Deno.test("train: batch options, held-out fallback, data order and evaluation sums", () => {
  assert.deepEqual(microBatchSizes(16, 6), [6, 5, 5]);
  assert.deepEqual(microBatchSizes(16, 16), [16]);
  assert.deepEqual(microBatchSizes(5, 1), [1, 1, 1, 1, 1]);
  const base = { cache: "c", qwen: "q", out: "o" };
  assert.deepEqual(resolveTrainConfig({ ...base, batchSize: 4, gradAccum: 3 }).microBatches, [
    4,
    4,
    4,
  ]);
  assert.equal(resolveTrainConfig({ ...base, batchSize: 4, gradAccum: 3 }).stepBatch, 12);
  assert.throws(
    () => resolveTrainConfig({ ...base, batchSize: 4, microBatch: 8 }),
    /larger than batchSize 4/,
  );
  assert.throws(() => resolveTrainConfig({ ...base, heldOutFraction: 1 }), /heldOutFraction/);

  const captions = ["a red cube", "two blue spheres", "a green cone"];
  const split = splitCacheRows(captions, 1e-6);
  assert.equal(split.heldOut.length, 1);
  assert.equal(split.train.length, 2);
  assert.match(split.warnings[0], /holds out none; evaluating on 1 caption instead/);
  assert.deepEqual(splitCacheRows(captions, 0), { train: [0, 1, 2], heldOut: [], warnings: [] });

  const acc = new EvalAccumulator(2);
  const teacher = { seq: Float32Array.from([1, 0, 0, 2]), pooled: Float32Array.from([3, 4]) };
  acc.add(
    { seq: Float32Array.from([2, 0, 0, 2]), pooled: Float32Array.from([-3, -4]) },
    teacher,
    1,
  );
  const r = acc.result();
  assert.equal(r.lossSeq, 1 / 4);
  assert.equal(r.lossPooled, (36 + 64) / 2);
  assert.equal(r.cosSeq, 1);
  assert.equal(r.cosPooled, -1);

  const cache = { dir: "cache/x", seqLen: 77, seqDim: 2048, pooledDim: 1280 };
  const resampler = {
    dimIn: 32,
    dim: 32,
    depth: 1,
    heads: 2,
    dimHead: 16,
    ffMult: 2,
    numQueries: 77,
    dimSeq: 2048,
    dimPooled: 768,
    numPositions: 0,
    seqBias: false,
  };
  assert.throws(
    () => checkResamplerFitsCache(resampler, cache, "ckpt/resampler_config.json"),
    /resampler outputs seq \[77, 2048\], pooled \[768\] but the cache cache\/x holds targets seq \[77, 2048\], pooled \[1280\]/,
  );
  checkResamplerFitsCache({ ...resampler, dimPooled: 1280 }, cache, "ok");
});
