/**
 * The encode server: keeps a student loaded and answers `POST /v1/encode` with what `encode`
 * writes for the same prompts, batching queued prompts of equal token count on the GPU.
 */
import { timingSafeEqual } from "node:crypto";
import { basename } from "node:path";
import { Gpu } from "../gpu/device.ts";
import { UsageError } from "../util/usage_error.ts";
import {
  type Conditioning,
  destroyStudent,
  encodePrompts,
  loadStudent,
  type Student,
} from "./student.ts";
import { adapterId, conditioningBytes, encodedFile } from "./encode_file.ts";

/** What `startServer` loads and how it listens; mirrors the `serve` command's flags. */
export interface ServeOptions {
  /** The Qwen3 model folder the adapter was trained on. */
  qwen: string;
  /** The adapter folder training wrote. */
  adapter: string;
  /** Address to bind; a non-loopback one needs `token`. */
  host: string;
  /** Port; 0 lets the system pick one (see `RunningServer.url`). */
  port: number;
  /** Bearer token every request must carry, if set. */
  token?: string;
  /** Prompts per GPU pass. */
  maxBatch: number;
  /** Largest request body in bytes. */
  maxBodyBytes: number;
  /** Prompts per request. */
  maxPrompts: number;
  /** Characters per prompt (the tokenizer's work grows with it; tokens past the limit are cut). */
  maxPromptChars: number;
}

/** A listening server: its address, and how to stop it. */
export interface RunningServer {
  /** Base URL, e.g. http://127.0.0.1:8411 */
  url: string;
  /** Stops accepting, finishes the requests in flight, frees the student and the GPU. */
  shutdown(): Promise<void>;
  /** Resolves once the server has shut down. */
  finished: Promise<void>;
}

function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** Throws before anything is loaded when the bind would expose the model without a token. */
export function checkBind(host: string, token: string | undefined): void {
  if (!isLoopback(host) && !token) {
    throw new UsageError(
      `serve: --host ${host} is reachable from other machines; give --token <secret> ` +
        `(or set DISTILL_TOKEN) so only clients holding it are answered`,
    );
  }
}

/** Row `i` of a batch's conditioning, as a batch of one. */
function rowOf(c: Conditioning, i: number): Conditioning {
  const seqRow = c.seqLen * c.seqDim;
  return {
    ...c,
    promptEmbeds: c.promptEmbeds.slice(i * seqRow, (i + 1) * seqRow),
    pooled: c.pooled.slice(i * c.pooledDim, (i + 1) * c.pooledDim),
    batch: 1,
    tokenCounts: [c.tokenCounts[i]],
    truncated: [c.truncated[i]],
  };
}

/** Single rows stacked into one batch, in order. */
function joinRows(rows: Conditioning[]): Conditioning {
  const first = rows[0];
  const seqRow = first.seqLen * first.seqDim;
  const out: Conditioning = {
    ...first,
    promptEmbeds: new Float32Array(rows.length * seqRow),
    pooled: new Float32Array(rows.length * first.pooledDim),
    batch: rows.length,
    tokenCounts: rows.map((r) => r.tokenCounts[0]),
    truncated: rows.map((r) => r.truncated[0]),
  };
  rows.forEach((r, i) => {
    out.promptEmbeds.set(r.promptEmbeds, i * seqRow);
    out.pooled.set(r.pooled, i * first.pooledDim);
  });
  return out;
}

interface Pending {
  prompt: string;
  resolve: (row: Conditioning) => void;
  reject: (err: Error) => void;
}

/**
 * Prompts from concurrent requests wait here while the GPU is busy, then go through in passes
 * of up to `maxBatch` prompts that all have the same token count: nothing is padded, so every
 * prompt's conditioning is bit-equal to encoding it alone.
 */
class PromptQueue {
  #pending: Pending[] = [];
  #draining = false;

  constructor(readonly gpu: Gpu, readonly student: Student, readonly maxBatch: number) {}

  /** One conditioning row per prompt. */
  encode(prompts: readonly string[]): Promise<Conditioning[]> {
    const rows = prompts.map((prompt) =>
      new Promise<Conditioning>((resolve, reject) =>
        this.#pending.push({ prompt, resolve, reject })
      )
    );
    if (!this.#draining) this.#drain();
    return Promise.all(rows);
  }

  /** Runs until nothing waits; the flag drops in the same step that finds the queue empty. */
  async #drain(): Promise<void> {
    this.#draining = true;
    try {
      while (this.#pending.length) {
        const waiting = this.#pending.splice(0);
        for (const pass of this.#passes(waiting)) {
          try {
            const prompts = pass.map((p) => p.prompt);
            const c = await encodePrompts(this.gpu, this.student, prompts, this.maxBatch);
            pass.forEach((p, i) => p.resolve(rowOf(c, i)));
          } catch (err) {
            for (const p of pass) p.reject(err as Error);
          }
        }
      }
    } finally {
      this.#draining = false;
    }
  }

  /** GPU passes of up to maxBatch prompts of one token count; if tokenizing fails, all fail. */
  #passes(waiting: Pending[]): Pending[][] {
    const { mode, maxTokens } = this.student.adapter.config.prompt;
    let lengths: number[];
    try {
      lengths = Array.from(
        this.student.tokenizer.encodeBatch(waiting.map((p) => p.prompt), { mode, maxTokens })
          .lengths,
      );
    } catch (err) {
      for (const p of waiting) p.reject(err as Error);
      return [];
    }
    const passes: Pending[][] = [];
    for (const group of Map.groupBy(waiting, (_, i) => lengths[i]).values()) {
      for (let start = 0; start < group.length; start += this.maxBatch) {
        passes.push(group.slice(start, start + this.maxBatch));
      }
    }
    return passes;
  }
}

/** A request the client got wrong: answered with `status` and a JSON error. */
class RequestError extends Error {
  constructor(readonly status: number, message: string, readonly limit?: string) {
    super(message);
  }
}

function jsonResponse(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}

/** The body as text, refusing more than `max` bytes without reading the rest. */
async function readBody(req: Request, max: number): Promise<string> {
  const tooLarge = () =>
    new RequestError(413, `request body is larger than ${max} bytes`, "max_body_bytes");
  if (Number(req.headers.get("content-length") ?? 0) > max) throw tooLarge();
  if (!req.body) return "";
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    for await (const chunk of req.body) {
      size += chunk.byteLength;
      if (size > max) throw tooLarge();
      chunks.push(chunk);
    }
  } catch (err) {
    if (err instanceof RequestError) throw err;
    throw new RequestError(400, `could not read the request body (${(err as Error).message})`);
  }
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const c of chunks) {
    bytes.set(c, offset);
    offset += c.byteLength;
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new RequestError(400, "request body is not valid UTF-8");
  }
}

/** What a valid POST /v1/encode body asks for. */
interface EncodeRequest {
  prompts: string[];
  negative?: string;
  format: "safetensors" | "json";
  dtype: "f16" | "f32";
}

const ENCODE_KEYS = ["prompt", "negative_prompt", "format", "dtype"];

function parseEncodeRequest(text: string, options: ServeOptions): EncodeRequest {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch (err) {
    throw new RequestError(400, `request body is not valid JSON (${(err as Error).message})`);
  }
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new RequestError(400, 'request body must be a JSON object like {"prompt": "a cat"}');
  }
  const fields = body as Record<string, unknown>;
  for (const key of Object.keys(fields)) {
    if (!ENCODE_KEYS.includes(key)) {
      throw new RequestError(
        400,
        `unknown field '${key}'; the fields are ${ENCODE_KEYS.join(", ")}`,
      );
    }
  }
  const { prompt, negative_prompt: negative, format = "safetensors", dtype = "f16" } = fields;
  if (prompt === undefined) throw new RequestError(400, "field 'prompt' is required");
  const prompts = typeof prompt === "string" ? [prompt] : prompt;
  if (
    !Array.isArray(prompts) || prompts.length === 0 ||
    !prompts.every((p) => typeof p === "string")
  ) {
    throw new RequestError(400, "field 'prompt' must be a string or a non-empty list of strings");
  }
  if (prompts.length > options.maxPrompts) {
    throw new RequestError(
      413,
      `${prompts.length} prompts in one request; the limit is ${options.maxPrompts}`,
      "max_prompts",
    );
  }
  if (negative !== undefined && typeof negative !== "string") {
    throw new RequestError(400, "field 'negative_prompt' must be a string");
  }
  const all = negative === undefined ? prompts : [...prompts, negative];
  const long = all.findIndex((p) => p.length > options.maxPromptChars);
  if (long >= 0) {
    const which = long < prompts.length ? `prompt ${long + 1}` : "negative_prompt";
    throw new RequestError(
      413,
      `${which} has ${all[long].length} characters; the limit is ${options.maxPromptChars}`,
      "max_prompt_chars",
    );
  }
  if (format !== "safetensors" && format !== "json") {
    throw new RequestError(400, `field 'format' must be "safetensors" or "json"`);
  }
  if (dtype !== "f16" && dtype !== "f32") {
    throw new RequestError(400, `field 'dtype' must be "f16" or "f32"`);
  }
  return { prompts, negative, format, dtype };
}

function authorized(req: Request, token: string): boolean {
  const given = new TextEncoder().encode(req.headers.get("authorization") ?? "");
  const expected = new TextEncoder().encode(`Bearer ${token}`);
  return given.byteLength === expected.byteLength && timingSafeEqual(given, expected);
}

/** Loads the student once and serves it until `shutdown` (or the command's signals). */
export async function startServer(
  options: ServeOptions,
  log: (line: string) => void = (line) => console.error(line),
): Promise<RunningServer> {
  checkBind(options.host, options.token);
  const gpu = await Gpu.create();
  const student = await loadStudent(gpu, options.qwen, options.adapter).catch((err) => {
    gpu.destroy();
    throw err;
  });
  const release = () => {
    destroyStudent(student);
    gpu.destroy();
  };
  const id = await adapterId(options.adapter).catch((err) => {
    release();
    throw err;
  });
  const queue = new PromptQueue(gpu, student, options.maxBatch);
  const info = gpu.adapterInfo;
  const health = {
    status: "ok",
    qwen: basename(options.qwen),
    base_model: student.adapter.config.baseModel.name,
    adapter_id: id,
    prompt_mode: student.adapter.config.prompt.mode,
    max_tokens: student.adapter.config.prompt.maxTokens,
    max_batch: options.maxBatch,
    device: [info.vendor, info.architecture, info.description].filter(Boolean).join(" "),
  };

  async function encode(req: Request): Promise<Response> {
    const request = parseEncodeRequest(await readBody(req, options.maxBodyBytes), options);
    const { prompts, negative } = request;
    const rows = await queue.encode(negative === undefined ? prompts : [...prompts, negative]);
    const positive = joinRows(rows.slice(0, prompts.length));
    const negativeRow = negative === undefined ? null : rows[prompts.length];
    const encoded = encodedFile(student, id, prompts, negative, positive, negativeRow);
    const bytes = conditioningBytes("response", encoded, request.format, request.dtype);
    const type = request.format === "json" ? "application/json" : "application/octet-stream";
    return new Response(bytes, { headers: { "content-type": type } });
  }

  // Deno's own graceful shutdown cuts off request bodies still arriving, so requests are
  // counted here and the listener closes only once the last one is answered.
  let inFlight = 0;
  let stopping = false;
  let idle = () => {};

  async function handle(req: Request): Promise<Response> {
    const { pathname } = new URL(req.url);
    if (stopping) return jsonResponse(503, { error: "the server is shutting down" });
    inFlight++;
    try {
      if (options.token && !authorized(req, options.token)) {
        throw new RequestError(401, "missing or wrong 'Authorization: Bearer <token>' header");
      }
      const routes: Record<string, [string, () => Promise<Response> | Response]> = {
        "/v1/encode": ["POST", () => encode(req)],
        "/health": ["GET", () => jsonResponse(200, health)],
      };
      const route = routes[pathname];
      if (!route) throw new RequestError(404, `no endpoint ${pathname}; use POST /v1/encode`);
      if (req.method !== route[0]) {
        throw new RequestError(405, `${pathname} takes ${route[0]}, not ${req.method}`);
      }
      return await route[1]();
    } catch (err) {
      if (err instanceof RequestError) {
        const body = err.limit ? { error: err.message, limit: err.limit } : { error: err.message };
        return jsonResponse(err.status, body);
      }
      log(`serve: ${req.method} ${pathname} failed: ${(err as Error).message}`);
      return jsonResponse(500, { error: `encoding failed: ${(err as Error).message}` });
    } finally {
      if (--inFlight === 0) idle();
    }
  }

  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve({ hostname: options.host, port: options.port, onListen() {} }, handle);
  } catch (err) {
    release();
    if (err instanceof Deno.errors.AddrInUse) {
      throw new Error(`${options.host}:${options.port} is already in use; choose another --port`);
    }
    throw err;
  }
  const host = options.host.includes(":") ? `[${options.host}]` : options.host;
  const url = `http://${host}:${server.addr.port}`;
  let stopped: Promise<void> | null = null;
  const stop = async () => {
    stopping = true;
    if (inFlight > 0) await new Promise<void>((resolve) => idle = resolve);
    await server.shutdown();
    release();
  };
  const shutdown = () => stopped ??= stop();
  const finished = server.finished.then(() => shutdown());
  log(`serve: ${health.base_model} (adapter ${id}) on ${url}: POST /v1/encode, GET /health`);
  return { url, shutdown, finished };
}
