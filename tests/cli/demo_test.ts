import assert from "node:assert/strict";
import { join } from "node:path";
import { runDemo } from "../../src/cli/demo.ts";
import { SafetensorsFile } from "../../src/io/safetensors.ts";

/** The demo on a cut (fewer prompts and steps than `deno task demo`), checking what it writes. */
Deno.test("demo: ends with held-out figures beside the mean predictor; writes the four SDXL tensors", async () => {
  const out = join(await Deno.makeTempDir({ prefix: "distill-demo-" }), "demo-out");
  const lines: string[] = [];
  const result = await runDemo({ out, steps: 12, limit: 64 }, (line) => lines.push(line));
  assert.ok(result.evalBefore && result.evalAfter);
  // Learning itself is tested in tests/train/learning_test.ts; this cut is too short for it.
  // Here: the run starts at the mean predictor and its last lines say how it ended against it.
  assert.ok(Math.abs(result.evalBefore.heldOut!.student.r2Seq) < 1e-4);
  const last = lines.slice(-7).join("\n");
  assert.match(last, /did it learn the prompt\? On \d+ held-out prompts after 12 steps/);
  assert.match(last, /seq +-?\d\.\d{3} +\(MSE [\d.e-]+ vs the mean predictor's [\d.e-]+/);
  assert.match(last, /retrieval, own target ranked first among \d+ \(chance 0\.\d{3}\)/);
  assert.ok(lines.some((l) => /tiny RANDOM models/.test(l)), "the demo says its models are random");
  const file = await SafetensorsFile.open(result.conditioning);
  const shapes = Object.fromEntries(file.names().map((n) => [n, file.info(n).shape]));
  assert.deepEqual(shapes, {
    prompt_embeds: [1, 77, 2048],
    pooled_prompt_embeds: [1, 1280],
    negative_prompt_embeds: [1, 77, 2048],
    negative_pooled_prompt_embeds: [1, 1280],
  });
  assert.ok((await file.readF32("prompt_embeds")).every(Number.isFinite));
  file.close();
  const report = await Deno.readTextFile(result.report);
  assert.match(report, /<svg/);
  await assert.rejects(
    runDemo({ out: join(out, "models"), steps: 1 }, () => {}),
    /was not made by the demo/,
  );
});
