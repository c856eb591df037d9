/**
 * `deno task train` and `deno task train:wandb` end to end: scripts/train.ts in its own process
 * with the permissions of the deno.json tasks (the W&B host swapped for the local fake server,
 * the write folder for a temp one), on the tiny model of the trainer tests.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { UsageError } from "../../src/cli/args.ts";
import { parseTrainArgs } from "../../src/cli/train.ts";
import { readMetrics } from "../../src/train/metrics.ts";
import { historyFields } from "../../src/train/wandb.ts";
import { FakeWandb, parseWandbLine } from "../train/fake_wandb.ts";
import { writeTinySetup } from "../train/tiny_run.ts";

const KEY = "e2e-key-fedcba9876543210";
const REPO = new URL("../../", import.meta.url).pathname;
const ROOT = await Deno.makeTempDir({ prefix: "distill-train-wandb-" });
globalThis.addEventListener("unload", () => Deno.removeSync(ROOT, { recursive: true }));
let ready: Promise<void> | undefined;

/** The permission flags of a deno.json task, with `runs` and the W&B host made local. */
async function taskFlags(task: string, host: string): Promise<string[]> {
  const tasks = JSON.parse(await Deno.readTextFile(join(REPO, "deno.json"))).tasks;
  return (tasks[task] as string).split(" ").filter((part) => part.startsWith("--allow-")).map(
    (flag) =>
      flag.replace("--allow-write=runs", `--allow-write=${ROOT}`)
        .replace("--allow-net=api.wandb.ai", `--allow-net=${host}`),
  );
}

async function train(task: string, server: FakeWandb, out: string, extra: string[] = []) {
  await (ready ??= writeTinySetup(ROOT));
  const flags = await taskFlags(task, new URL(server.baseUrl).host);
  const args = [
    ...["--cache", join(ROOT, "cache"), "--qwen", join(ROOT, "qwen"), "--out", join(ROOT, out)],
    ...["--batch-size", "8", "--max-steps", "4", "--seed", "5", "--held-out", "0.05"],
    ...["--eval-every", "2", "--eval-rows", "8", "--checkpoint-every", "2"],
    ...["--lora-r", "4", "--lora-alpha", "8", "--prompt-mode", "raw", "--max-tokens", "24"],
    ...["--resampler-dim", "32", "--resampler-depth", "1", "--resampler-heads", "2"],
    ...["--resampler-dim-head", "16", "--resampler-ff-mult", "2", ...extra],
  ];
  const result = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...flags, "scripts/train.ts", ...args],
    cwd: REPO,
    env: { WANDB_API_KEY: KEY, WANDB_BASE_URL: server.baseUrl },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(result.stderr);
  return { code: result.code, stderr };
}

async function withServer(run: (server: FakeWandb) => Promise<void>) {
  const server = new FakeWandb(KEY);
  try {
    await run(server);
  } finally {
    await server.close();
  }
}

async function filesUnder(dir: string): Promise<string[]> {
  const files: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    const path = join(dir, entry.name);
    if (entry.isDirectory) files.push(...await filesUnder(path));
    else if (entry.isFile) files.push(path);
  }
  return files;
}

Deno.test("train task: no --wandb, nothing sent; --wandb under the plain task is refused first", async () => {
  await withServer(async (server) => {
    const plain = await train("train", server, "plain");
    assert.equal(plain.code, 0, plain.stderr);
    assert.equal(server.requests.length, 0);
    await assert.rejects(Deno.stat(join(ROOT, "plain", "wandb.json")), Deno.errors.NotFound);

    const refused = await train("train", server, "refused", ["--wandb", "p"]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /deno task train:wandb/);
    assert.equal(server.requests.length, 0);
    await assert.rejects(Deno.stat(join(ROOT, "refused", "metrics.jsonl")), Deno.errors.NotFound);
  });
});

Deno.test("train:wandb task: the run's every metric reaches W&B under its metrics.jsonl name", async () => {
  await withServer(async (server) => {
    const { code, stderr } = await train("train:wandb", server, "tracked", [
      "--wandb",
      "distill-e2e",
      "--wandb-name",
      "tiny",
    ]);
    assert.equal(code, 0, stderr);
    const out = join(ROOT, "tracked");
    assert.equal(server.runs.size, 1);
    const run = [...server.runs.values()][0];
    const config = JSON.parse(run.upserts.at(-1)!.config as string);
    assert.equal(config["lora.r"].value, 4);
    assert.equal(config.total_steps.value, 4);

    // One row per step (and the evaluation before training), with both records' fields.
    const records = await readMetrics(out);
    const rows = run.history.map(parseWandbLine);
    assert.deepEqual(rows.map((r) => r._step), [0, 1, 2, 3, 4]);
    for (const record of records) {
      if (record.type === "run") continue;
      const row = rows[record.step];
      for (const [name, value] of Object.entries(historyFields(record))) {
        assert.equal(row[name], value, `${record.type} ${record.step}: ${name}`);
      }
    }
    assert.ok("grad_norm/lora" in rows[1] && "heldout_loss" in rows[2] && "cos_seq" in rows[4]);
    assert.equal(parseWandbLine(run.summary[0]).heldout_loss, rows[4].heldout_loss);
    assert.deepEqual(run.complete, { exitcode: 0 });
    assert.match(stderr, /wandb: run .* finished \(exit code 0\), 5 rows/);

    assert.ok(!stderr.includes(KEY), "the key is in the log");
    for (const file of await filesUnder(out)) {
      const bytes = await Deno.readFile(file);
      const text = new TextDecoder("latin1").decode(bytes);
      assert.ok(!text.includes(KEY), `the key is in ${file}`);
    }
  });
});

Deno.test("train CLI: the --wandb flags become run options; the others need --wandb", () => {
  const required = ["--cache", "c", "--qwen", "q", "--out", "runs/r"];
  assert.equal(parseTrainArgs(required)!.wandb, undefined);
  assert.deepEqual(
    parseTrainArgs([
      ...required,
      ...["--wandb", "distill", "--wandb-entity", "team", "--wandb-tags", "a, b,"],
    ])!.wandb,
    { project: "distill", entity: "team", tags: ["a", "b"] },
  );
  assert.throws(
    () => parseTrainArgs([...required, "--wandb-name", "x"]),
    (e: Error) => e instanceof UsageError && /--wandb-name needs --wandb <project>/.test(e.message),
  );
  assert.throws(() => parseTrainArgs([...required, "--wandb", "a/b"]), /expected a project name/);
});
