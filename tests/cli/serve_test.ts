import assert from "node:assert/strict";
import { join } from "node:path";
import { runEncode } from "../../src/train/encode_file.ts";
import { checkBind, type ServeOptions, startServer } from "../../src/train/server.ts";
import { serveCommand } from "../../src/cli/serve.ts";
import { tinyStudent } from "./tiny_student.ts";

const root = await Deno.makeTempDir({ prefix: "distill-serve-" });
const student = await tinyStudent(root);

function serveWith(options: Partial<ServeOptions> = {}) {
  return startServer({
    qwen: student.qwen,
    adapter: student.adapter,
    host: "127.0.0.1",
    port: 0,
    maxBatch: 4,
    maxBodyBytes: 4096,
    maxPrompts: 8,
    maxPromptChars: 200,
    ...options,
  }, () => {});
}

/** The file `encode` writes for these prompts (f16 safetensors), as bytes. */
async function encodeFile(prompts: string[], negative?: string): Promise<Uint8Array> {
  const out = join(root, `enc-${crypto.randomUUID()}.safetensors`);
  await runEncode({
    qwen: student.qwen,
    adapter: student.adapter,
    prompts,
    negative,
    out,
    format: "safetensors",
    dtype: "f16",
    batchSize: 8,
  }, () => {});
  return await Deno.readFile(out);
}

async function post(url: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(`${url}/v1/encode`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: res.status, bytes: new Uint8Array(await res.arrayBuffer()) };
}

function json(bytes: Uint8Array) {
  return JSON.parse(new TextDecoder().decode(bytes));
}

const server = await serveWith();

Deno.test("serve answers the same bytes as the encode file, with and without a negative prompt", async () => {
  const plain = await post(server.url, { prompt: "a red cube on top of a blue sphere" });
  assert.equal(plain.status, 200);
  assert.deepEqual(plain.bytes, await encodeFile(["a red cube on top of a blue sphere"]));
  const withNegative = await post(server.url, { prompt: "a cat", negative_prompt: "blurry" });
  assert.equal(withNegative.status, 200);
  assert.deepEqual(withNegative.bytes, await encodeFile(["a cat"], "blurry"));
});

Deno.test("serve: concurrent requests are batched and answer what single requests do", async () => {
  // Two share a token count, so they go through one GPU pass together.
  const prompts = ["a cat", "a dog", "two dogs left of a tree", "", "a cat"];
  const alone: Uint8Array[] = [];
  for (const prompt of prompts) alone.push((await post(server.url, { prompt })).bytes);
  const together = await Promise.all(prompts.map((prompt) => post(server.url, { prompt })));
  together.forEach((r, i) => assert.deepEqual(r.bytes, alone[i], `prompt ${i + 1}`));
  // A list in one request: each row equals that prompt's single answer.
  const list = json((await post(server.url, { prompt: prompts, format: "json" })).bytes);
  assert.deepEqual(list.tensors.prompt_embeds.shape, [5, 77, 2048]);
  assert.deepEqual(JSON.parse(list.metadata.prompts), prompts);
  for (let i = 0; i < prompts.length; i++) {
    const single = json((await post(server.url, { prompt: prompts[i], format: "json" })).bytes);
    const rows = (name: string, size: number) =>
      list.tensors[name].data.slice(i * size, (i + 1) * size);
    assert.deepEqual(rows("prompt_embeds", 77 * 2048), single.tensors.prompt_embeds.data);
    assert.deepEqual(rows("pooled_prompt_embeds", 1280), single.tensors.pooled_prompt_embeds.data);
    assert.ok(single.tensors.pooled_prompt_embeds.data.some((v: number) => v !== 0));
  }
});

Deno.test("serve: every bad request gets its 4xx and a message, and the server keeps serving", async () => {
  const cases: [unknown, number, RegExp, string?][] = [
    ["{not json", 400, /not valid JSON/],
    [[1, 2], 400, /must be a JSON object/],
    [{}, 400, /'prompt' is required/],
    [{ prompt: 3 }, 400, /'prompt' must be a string or a non-empty list/],
    [{ prompt: [] }, 400, /non-empty list/],
    [{ prompt: ["a", 2] }, 400, /non-empty list of strings/],
    [{ prompt: "a", negative_prompt: ["b"] }, 400, /'negative_prompt' must be a string/],
    [{ prompt: "a", format: "npz" }, 400, /'format' must be/],
    [{ prompt: "a", dtype: "bf16" }, 400, /'dtype' must be/],
    [{ prompt: "a", negative: "b" }, 400, /unknown field 'negative'/],
    [{ prompt: "x".repeat(5000) }, 413, /larger than 4096 bytes/, "max_body_bytes"],
    [{ prompt: Array(9).fill("a") }, 413, /9 prompts.*limit is 8/, "max_prompts"],
    [{ prompt: ["a", "y".repeat(201)] }, 413, /prompt 2 has 201 characters/, "max_prompt_chars"],
    [{ prompt: "a", negative_prompt: "n".repeat(300) }, 413, /negative_prompt has 300/],
  ];
  for (const [body, status, message, limit] of cases) {
    const res = await post(server.url, body);
    const error = json(res.bytes);
    assert.equal(res.status, status, JSON.stringify(body).slice(0, 60));
    assert.match(error.error, message);
    if (limit) assert.equal(error.limit, limit);
  }
  const wrongMethod = await fetch(`${server.url}/v1/encode`);
  assert.equal(wrongMethod.status, 405);
  assert.match((await wrongMethod.json()).error, /takes POST, not GET/);
  const missing = await fetch(`${server.url}/v2/nothing`);
  assert.equal(missing.status, 404);
  await missing.body?.cancel();
  const after = await post(server.url, { prompt: "still here" });
  assert.equal(after.status, 200);
  assert.deepEqual(after.bytes, await encodeFile(["still here"]));
});

Deno.test("serve: /health names the models, the adapter and the device", async () => {
  const health = await (await fetch(`${server.url}/health`)).json();
  assert.equal(health.status, "ok");
  assert.equal(health.base_model, "tiny-random-qwen3");
  assert.match(health.adapter_id, /^[0-9a-f]{16}$/);
  assert.equal(health.prompt_mode, "chat");
  assert.equal(health.max_tokens, 24);
  assert.equal(typeof health.device, "string");
});

Deno.test("serve: a token is required for a non-local bind and checked on every request; a busy port is named", async () => {
  assert.throws(() => checkBind("0.0.0.0", undefined), /--host 0\.0\.0\.0 is reachable.*--token/);
  checkBind("0.0.0.0", "secret");
  checkBind("127.0.0.1", undefined);
  await assert.rejects(
    serveCommand.run(["--qwen", "q", "--adapter", "a", "--host", "0.0.0.0"]),
    /give --token/,
  );
  await assert.rejects(serveCommand.run(["--adapter", "a"]), /--qwen <folder> is required/);
  await assert.rejects(
    serveCommand.run(["--qwen", "q", "--adapter", "a", "--max-batch", "0"]),
    /--max-batch must be a positive integer/,
  );
  await assert.rejects(
    serveWith({ port: Number(new URL(server.url).port) }),
    /127\.0\.0\.1:\d+ is already in use; choose another --port/,
  );
  const guarded = await serveWith({ token: "s3cret" });
  try {
    const none = await fetch(`${guarded.url}/health`);
    assert.equal(none.status, 401);
    assert.match((await none.json()).error, /Authorization: Bearer/);
    const wrong = await post(guarded.url, { prompt: "a" }, { authorization: "Bearer nope!!" });
    assert.equal(wrong.status, 401);
    const right = await post(guarded.url, { prompt: "a cat" }, { authorization: "Bearer s3cret" });
    assert.equal(right.status, 200);
    assert.deepEqual(right.bytes, await encodeFile(["a cat"]));
  } finally {
    await guarded.shutdown();
  }
});

Deno.test("serve: shutdown finishes the request in flight, then refuses connections", async () => {
  // The body arrives in two parts: the request is in the server's hands, unfinished, when
  // shutdown starts.
  const body = new TextEncoder().encode(JSON.stringify({ prompt: ["a cat", "a dog"] }));
  let sendRest!: () => void;
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(body.slice(0, 10));
      sendRest = () => {
        controller.enqueue(body.slice(10));
        controller.close();
      };
    },
  });
  const inFlight = fetch(`${server.url}/v1/encode`, { method: "POST", body: stream });
  await new Promise((resolve) => setTimeout(resolve, 500));
  const stopped = server.shutdown();
  sendRest();
  const answer = await inFlight;
  assert.equal(answer.status, 200, answer.status === 200 ? "" : await answer.text());
  assert.equal(
    new Uint8Array(await answer.arrayBuffer()).byteLength,
    (await encodeFile(["a cat", "a dog"])).byteLength,
  );
  await stopped;
  await server.finished;
  await assert.rejects(fetch(`${server.url}/health`));
});
