import { extname } from "node:path";
import { readPromptsFile } from "../data/prompts_file.ts";
import { runEncode } from "../train/encode_file.ts";
import { type Command, parseCommandArgs, positiveInteger, UsageError } from "./args.ts";

const HELP = `distill encode: turn prompts into SDXL conditioning with a trained student.

Usage: deno task encode --qwen <folder> --adapter <folder> [options] "prompt" ["prompt" ...]
       deno task encode --qwen <folder> --adapter <folder> --prompts prompts.txt [options]

Options:
  --qwen <folder>        the Qwen3 model folder the adapter was trained on (Hugging Face layout)
  --adapter <folder>     the adapter folder training wrote (<out>/adapter)
  --prompts <file>       one prompt per line (UTF-8; blank lines are refused)
  --negative <text>      negative prompt, encoded once and used for every prompt. Without it the
                         negative tensors are zeros, as diffusers' SDXL pipeline does by default
                         (force_zeros_for_empty_prompt)
  --out <file>           output file (default conditioning.safetensors); missing folders are
                         made. Checked before any model is read
  --force                replace --out if it exists (default: refuse)
  --format <name>        safetensors or json (default: from --out's extension)
  --dtype <name>         f16 (default) or f32 for the safetensors tensors
  --batch-size <n>       prompts per GPU pass (default 8)
  -h, --help             show this help

Output tensors, named as diffusers' StableDiffusionXLPipeline takes them:
  prompt_embeds [B, 77, 2048], pooled_prompt_embeds [B, 1280],
  negative_prompt_embeds [B, 77, 2048], negative_pooled_prompt_embeds [B, 1280],
with metadata: adapter id, prompt mode, token counts and which prompts were truncated.
Prompts may be up to the adapter's token limit (256 by default) after the chat template;
longer ones are cut there, with a warning. An empty prompt "" is encoded like any other.

Permissions: the 'encode' task reads any file and writes only the --out file's folder under
the current directory; to write elsewhere run
  deno run --allow-read --allow-write=<folder> --allow-env mod.ts encode ...`;

export const encodeCommand: Command = {
  name: "encode",
  summary: "turn prompts into SDXL conditioning (prompt_embeds + pooled) with a trained student",
  async run(args) {
    const { values, positionals } = parseCommandArgs("encode", args, {
      qwen: { type: "string" },
      adapter: { type: "string" },
      prompts: { type: "string" },
      negative: { type: "string" },
      out: { type: "string" },
      format: { type: "string" },
      dtype: { type: "string" },
      "batch-size": { type: "string" },
      force: { type: "boolean" },
    }, true);
    if (values.help) return console.log(HELP);
    if (!values.qwen) throw new UsageError("encode: --qwen <folder> is required");
    if (!values.adapter) throw new UsageError("encode: --adapter <folder> is required");
    const prompts = values.prompts ? await readPromptsFile(values.prompts) : [];
    prompts.push(...positionals);
    if (prompts.length === 0) {
      throw new UsageError(
        'encode: give a prompt ("a red cube on a blue sphere") or --prompts FILE',
      );
    }
    const out = values.out ?? "conditioning.safetensors";
    const format = values.format ??
      (extname(out).toLowerCase() === ".json" ? "json" : "safetensors");
    if (format !== "safetensors" && format !== "json") {
      throw new UsageError(`encode: --format must be safetensors or json, not '${format}'`);
    }
    const dtype = values.dtype ?? "f16";
    if (dtype !== "f16" && dtype !== "f32") {
      throw new UsageError(`encode: --dtype must be f16 or f32, not '${dtype}'`);
    }
    await runEncode({
      qwen: values.qwen,
      adapter: values.adapter,
      prompts,
      negative: values.negative,
      out,
      format,
      dtype,
      batchSize: positiveInteger("encode", "--batch-size", values["batch-size"], 8),
      force: values.force ?? false,
    });
  },
};
