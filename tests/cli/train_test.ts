import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { UsageError } from "../../src/cli/args.ts";
import {
  parseTrainArgs,
  TRAIN_HELP,
  TRAIN_OPTIONS,
  trainCommand,
  trainProgressLine,
  withFlagNames,
} from "../../src/cli/train.ts";
import { resolveTrainConfig } from "../../src/train/options.ts";
import { assertLinkRefused, rejectsWith } from "../helpers.ts";

const REQUIRED = ["--cache", "cache/c", "--qwen", "models/q", "--out", "runs/r"];

Deno.test("train CLI: --help lists every option with an example", () => {
  for (const flag of Object.keys(TRAIN_OPTIONS)) {
    assert.ok(TRAIN_HELP.includes(`--${flag}`), `--${flag} is not in the help`);
  }
  assert.match(TRAIN_HELP, /deno task train --cache \S+ --qwen models\/Qwen3-4B --out runs\//);
  assert.match(TRAIN_HELP, /--allow-write=<out>/);
  assert.equal(parseTrainArgs(["--help"]), undefined);
});

Deno.test("train CLI: flags become options; defaults are the trainer's", () => {
  const options = parseTrainArgs([
    ...REQUIRED,
    "--batch-size",
    "16",
    "--micro-batch",
    "6",
    "--lr-lora",
    "1e-4",
    "--lora-targets",
    "q_proj, v_proj",
    "--prompt-mode",
    "raw",
    "--no-gradient-checkpointing",
    "--resume",
  ])!;
  const config = resolveTrainConfig(options);
  assert.deepEqual(config.microBatches, [6, 5, 5]);
  assert.deepEqual(config.lr, { resampler: 1e-4, lora: 1e-4 });
  assert.deepEqual(config.lora, {
    r: 16,
    alpha: 32,
    dropout: 0.05,
    targetModules: ["q_proj", "v_proj"],
  });
  assert.deepEqual(config.prompt, { mode: "raw", maxTokens: 256 });
  assert.deepEqual(config.resampler, {
    dim: 2048,
    depth: 4,
    heads: 16,
    dimHead: 128,
    ffMult: 4,
    numPositions: 0,
    seqBias: true,
  });
  assert.equal(config.gradientCheckpointing, false);
  assert.equal(config.resume, true);
  const defaults = resolveTrainConfig(parseTrainArgs(REQUIRED)!);
  assert.equal(defaults.gradientCheckpointing, "auto");
  assert.deepEqual(defaults.heldOutFiles, []);
  // The mean start is the default; the seed's resampler and learned positions are flags.
  const seed = resolveTrainConfig(
    parseTrainArgs([...REQUIRED, "--no-mean-start", "--resampler-positions", "300"])!,
  );
  assert.equal(seed.resampler.seqBias, false);
  assert.equal(seed.resampler.numPositions, 300);
  assert.deepEqual(
    parseTrainArgs([...REQUIRED, "--held-out-files", "color_val, partiprompts"])!.heldOutFiles,
    ["color_val", "partiprompts"],
  );
});

Deno.test("train CLI: bad command lines are usage errors naming the flag", () => {
  const cases: Array<[string[], RegExp]> = [
    [["--cache", "c", "--qwen", "q"], /--out <folder> is required/],
    [[...REQUIRED, "--batch-size", "0"], /--batch-size "0" is not an integer >= 1/],
    [[...REQUIRED, "--lr-lora", "fast"], /--lr-lora "fast" is not a number/],
    [[...REQUIRED, "--prompt-mode", "json"], /--prompt-mode "json": expected chat or raw/],
    [
      [...REQUIRED, "--gradient-checkpointing", "--no-gradient-checkpointing"],
      /not both/,
    ],
    [[...REQUIRED, "--steps", "3"], /train: Unknown option '--steps'/],
  ];
  for (const [args, message] of cases) {
    assert.throws(
      () => parseTrainArgs(args),
      (e: Error) => e instanceof UsageError && message.test(e.message),
    );
  }
});

Deno.test("train CLI: option errors name the flag; the library keeps the option field", async () => {
  const bad: Array<[string[], string]> = [
    [["--held-out", "1.5"], "train: --held-out must be in [0, 1) (got 1.5)"],
    [["--batch-size", "4", "--micro-batch", "9"], "--micro-batch 9 is larger than --batch-size 4"],
    [["--lr-lora=-1"], "--lr-lora must be a number >= 0 (got -1)"],
    [["--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1] (got 2)"],
    [
      ["--resampler-positions", "64", "--max-tokens", "96"],
      "--resampler-positions 64 is below --max-tokens 96",
    ],
  ];
  for (const [args, message] of bad) {
    await rejectsWith(() => trainCommand.run([...REQUIRED, ...args]), message);
  }
  // A resumed run's mismatch lines too; flags already in a message stay as they are.
  assert.equal(
    withFlagNames(
      "lr.resampler: 0.003 (checkpoint) vs 0.001 (now)\nseed: 1 (checkpoint) vs 2 " +
        "(now)\nprompt.maxTokens: 256 (checkpoint) vs 77 (now); use --epochs",
    ),
    "--lr-resampler: 0.003 (checkpoint) vs 0.001 (now)\n--seed: 1 (checkpoint) vs 2 (now)\n" +
      "--max-tokens: 256 (checkpoint) vs 77 (now); use --epochs",
  );
  assert.throws(
    () => resolveTrainConfig({ ...parseTrainArgs(REQUIRED)!, heldOutFraction: 1.5 }),
    /^Error: heldOutFraction must be in \[0, 1\) \(got 1\.5\)$/,
  );
});

Deno.test("train CLI: a progress line has step, loss, rate and ETA", () => {
  const line = trainProgressLine({
    step: 120,
    totalSteps: 5000,
    epoch: 0,
    epochs: 2,
    loss: 0.43214,
    lossSeq: 0.41,
    lossPooled: 0.02214,
    lr: { resampler: 9.9e-5, lora: 1.98e-5 },
    samplesPerSecond: 12.34,
    elapsedSeconds: 155,
    etaSeconds: 3725,
  });
  assert.equal(
    line,
    "train: step 120/5000 (2.4%), epoch 1/2, loss 0.4321 (seq 0.4100, pooled 0.02214), " +
      "lr 9.90e-5, 12.3 samples/s, ETA 1h02m",
  );
});

Deno.test("train CLI: a link in ./runs leading outside is refused before the cache is read", async () => {
  await assertLinkRefused("runs", ({ root, allowed, link }) => [
    "run",
    "--allow-read",
    `--allow-write=${allowed}`,
    "--allow-env=DISTILL_DEBUG,DENO_WEBGPU_BACKEND",
    fileURLToPath(new URL("../../scripts/train.ts", import.meta.url)),
    ...["--cache", join(root, "no-cache"), "--qwen", join(root, "no-qwen")],
    ...["--out", join(link, "run")],
  ]);
});
