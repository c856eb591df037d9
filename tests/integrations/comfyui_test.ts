import assert from "node:assert/strict";
import { join } from "node:path";
import { runEncode } from "../../src/train/encode_file.ts";
import { startServer } from "../../src/train/server.ts";
import { tinyStudent } from "../cli/tiny_student.ts";
import { runPython, torchPython } from "./python.ts";

Deno.test({
  name: torchPython
    ? "ComfyUI nodes: CONDITIONING from a running serve and from encode files"
    : "ComfyUI nodes (ignored: no python3 that imports torch; set DISTILL_PYTHON)",
  ignore: !torchPython,
  async fn() {
    const root = await Deno.makeTempDir({ prefix: "distill-comfyui-" });
    const student = await tinyStudent(root);
    const encode = (prompts: string[], out: string, negative?: string) =>
      runEncode({
        ...student,
        prompts,
        negative,
        out: join(root, out),
        format: out.endsWith(".json") ? "json" : "safetensors",
        dtype: "f32",
        batchSize: 8,
      }, () => {});
    await encode(["a red cube on a blue sphere"], "single.safetensors", "blurry");
    await encode(["a cat", "two dogs"], "list.json");
    const server = await startServer({
      ...student,
      host: "127.0.0.1",
      port: 0,
      token: "comfy-test-token",
      maxBatch: 8,
      maxBodyBytes: 1 << 20,
      maxPrompts: 8,
      maxPromptChars: 8192,
    }, () => {});
    try {
      const output = await runPython("integrations/comfyui/test_nodes.py", {
        DISTILL_TEST_SERVER: server.url,
        DISTILL_TEST_TOKEN: "comfy-test-token",
        DISTILL_TEST_SINGLE: join(root, "single.safetensors"),
        DISTILL_TEST_LIST: join(root, "list.json"),
        DISTILL_TOKEN: "",
      });
      assert.match(output, /Ran 5 tests[\s\S]*OK/);
    } finally {
      await server.shutdown();
      await Deno.remove(root, { recursive: true });
    }
  },
});
