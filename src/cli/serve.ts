import { startServer } from "../train/server.ts";
import { type Command, parseCommandArgs, positiveInteger, UsageError } from "./args.ts";

const DEFAULT_PORT = 8411;

const HELP = `distill serve: keep a trained student loaded and encode prompts over HTTP.

Usage: deno task serve --qwen <folder> --adapter <folder> [options]

Options:
  --qwen <folder>          the Qwen3 model folder the adapter was trained on
  --adapter <folder>       the adapter folder training wrote (<out>/adapter)
  --host <address>         address to bind (default 127.0.0.1); any other than a loopback
                           address needs --token
  --port <n>               port (default ${DEFAULT_PORT}; 0 picks a free one)
  --token <secret>         require 'Authorization: Bearer <secret>' (or set DISTILL_TOKEN)
  --max-batch <n>          prompts per GPU pass when requests queue up (default 8)
  --max-body-bytes <n>     largest request body (default 1048576)
  --max-prompts <n>        prompts per request (default 64)
  --max-prompt-chars <n>   characters per prompt (default 8192)
  -h, --help               show this help

Endpoints:
  POST /v1/encode  {"prompt": "..." | ["...", ...], "negative_prompt": "...",
                    "format": "safetensors" | "json", "dtype": "f16" | "f32"}
      answers what 'encode' writes for the same prompts: prompt_embeds [B, 77, 2048],
      pooled_prompt_embeds [B, 1280] and the negative pair (zeros without negative_prompt),
      safetensors (F16) by default. Each prompt's tensors are bit-equal to 'encode' of that
      prompt alone: requests that queue up are batched only with prompts of the same token
      count, so no prompt is padded.
  GET /health      base model, adapter id, prompt settings and the GPU adapter, as JSON.
Bad requests get a 4xx JSON {"error": "..."} naming the problem (and "limit" for a limit).
SIGINT or SIGTERM stop accepting connections, finish the requests in flight, and exit.

Permissions: the 'serve' task may only listen on 127.0.0.1. To bind another address, widen
--allow-net to it and give a token, e.g.
  DISTILL_TOKEN=... deno run --allow-read --allow-net=0.0.0.0:${DEFAULT_PORT} \\
    --allow-env=DISTILL_DEBUG,DENO_WEBGPU_BACKEND,DISTILL_TOKEN mod.ts serve --host 0.0.0.0 ...`;

export const serveCommand: Command = {
  name: "serve",
  summary: "keep a trained student loaded and encode prompts over HTTP (POST /v1/encode)",
  async run(args) {
    const { values } = parseCommandArgs("serve", args, {
      qwen: { type: "string" },
      adapter: { type: "string" },
      host: { type: "string" },
      port: { type: "string" },
      token: { type: "string" },
      "max-batch": { type: "string" },
      "max-body-bytes": { type: "string" },
      "max-prompts": { type: "string" },
      "max-prompt-chars": { type: "string" },
    });
    if (values.help) return console.log(HELP);
    if (!values.qwen) throw new UsageError("serve: --qwen <folder> is required");
    if (!values.adapter) throw new UsageError("serve: --adapter <folder> is required");
    const port = values.port === undefined ? DEFAULT_PORT : Number(values.port);
    if (!Number.isInteger(port) || port < 0 || port > 65535) {
      throw new UsageError(
        `serve: --port must be an integer from 0 to 65535, not '${values.port}'`,
      );
    }
    const int = (flag: keyof typeof values, fallback: number) =>
      positiveInteger("serve", `--${flag}`, values[flag] as string | undefined, fallback);
    const host = values.host ?? "127.0.0.1";
    const token = values.token ?? Deno.env.get("DISTILL_TOKEN");
    const server = await startServer({
      qwen: values.qwen,
      adapter: values.adapter,
      host,
      port,
      token: token || undefined,
      maxBatch: int("max-batch", 8),
      maxBodyBytes: int("max-body-bytes", 1 << 20),
      maxPrompts: int("max-prompts", 64),
      maxPromptChars: int("max-prompt-chars", 8192),
    });
    const stop = () => {
      console.error("serve: finishing the requests in flight, then exiting");
      server.shutdown();
    };
    const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
    for (const s of signals) Deno.addSignalListener(s, stop);
    try {
      await server.finished;
    } finally {
      for (const s of signals) Deno.removeSignalListener(s, stop);
    }
  },
};
