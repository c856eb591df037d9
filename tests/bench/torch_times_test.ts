import assert from "node:assert/strict";
import { readTorchStudentTimes } from "../../src/bench/student.ts";

async function withFile(text: string, body: (path: string) => Promise<void>): Promise<void> {
  const path = await Deno.makeTempFile({ suffix: ".json" });
  try {
    await Deno.writeTextFile(path, text);
    await body(path);
  } finally {
    await Deno.remove(path);
  }
}

const STUDENT_LINE = '{"tokens": 256, "fwd_f32_s": 1.07, "train_step_s": 8.39}';

Deno.test("torch times: the baseline's matmul GFLOP/s printed first is read beside the student's", async () => {
  // What `python3 torch_student.py > FILE` writes: torch_baseline.py's indented JSON, then one line.
  const baseline = JSON.stringify({ torch_matmul_1024_gflops: 82.2, bench_fwd_s: 0.85 }, null, 1);
  await withFile(`${baseline}\n${STUDENT_LINE}\n`, async (path) => {
    assert.deepStrictEqual(await readTorchStudentTimes(path), {
      tokens: 256,
      fwd_f32_s: 1.07,
      train_step_s: 8.39,
      matmul1024Gflops: 82.2,
    });
  });
});

Deno.test("torch times: the student line alone has no matmul figure", async () => {
  await withFile(STUDENT_LINE, async (path) => {
    assert.deepStrictEqual((await readTorchStudentTimes(path)).matmul1024Gflops, undefined);
  });
});

Deno.test("torch times: a wrong token count names the flag and the fix", async () => {
  await withFile('{"tokens": 128, "fwd_f32_s": 1, "train_step_s": 2}', async (path) => {
    await assert.rejects(readTorchStudentTimes(path), /run torch_student\.py without --tokens/);
  });
});
