/**
 * `deno task check` (last step): every import inside src/ points down the layer order, never up,
 * and mod.ts (the public API) imports nothing from src/cli but the CLI entry.
 * Reads the module graph of mod.ts and the scripts from `deno info --json` (static and dynamic
 * imports, types included) and names each upward import with its file and line.
 *
 * The order, lowest first (README, "Layout"):
 */
export const LAYERS = [
  "util", // rng, hashing
  "io", // safetensors, Hugging Face folders, dtypes, atomic and checked writes
  "gpu", // the WebGPU device, tensors, buffer pool
  "ops", // kernels with their TypeScript references, the NF4 codec
  "text", // tokenizers
  "models", // CLIP teachers, Qwen3 + LoRA, the resampler, the Teacher interface
  "data", // caption sets and the target cache
  "train", // the distillation step, loop, evaluation, student loading, tracking
  "bench", // benchmarks
  "cli", // commands
] as const;

interface InfoDependency {
  specifier: string;
  span: { start: { line: number } };
}

interface InfoModule {
  specifier: string;
  /** `code` for value imports, `type` for `import type`. */
  dependencies?: Array<{ code?: InfoDependency; type?: InfoDependency }>;
}

/** The layer of a src/ module URL, or undefined outside src/. */
export function layerOf(specifier: string, root: string): string | undefined {
  if (!specifier.startsWith(root)) return undefined;
  const [top, layer] = specifier.slice(root.length).split("/");
  return top === "src" ? layer : undefined;
}

/** "file:line imports target (layer a above b)" for each import that points up. */
export function upwardImports(modules: readonly InfoModule[], root: string): string[] {
  const rank = (layer: string) => LAYERS.indexOf(layer as typeof LAYERS[number]);
  const found = new Set<string>();
  for (const module of modules) {
    const from = layerOf(module.specifier, root);
    if (!from) continue;
    for (const dep of module.dependencies ?? []) {
      for (const target of [dep.code, dep.type]) {
        const to = target && layerOf(target.specifier, root);
        if (!to || to === from) continue;
        if (rank(from) < 0 || rank(to) < 0 || rank(to) > rank(from)) {
          const where = `${module.specifier.slice(root.length)}:${target!.span.start.line + 1}`;
          const unknown = [from, to].find((layer) => rank(layer) < 0);
          found.add(
            `${where} imports ${target!.specifier.slice(root.length)} (` +
              (unknown
                ? `${unknown} is not a layer: add it to LAYERS in scripts/check_layers.ts)`
                : `${from} may import only layers below it: ${
                  LAYERS.slice(0, rank(from)).join(", ")
                })`),
          );
        }
      }
    }
  }
  return [...found].sort();
}

/** The one CLI module mod.ts may import: `main`, the command line's entry. */
export const MOD_CLI_ENTRY = "src/cli/main.ts";

/**
 * "mod.ts:line imports src/cli/x.ts (...)" for each import of mod.ts from src/cli other than
 * the CLI entry: the public API exports library code, and CLI modules hold only argv handling.
 */
export function modCliImports(modules: readonly InfoModule[], root: string): string[] {
  const mod = modules.find((module) => module.specifier === `${root}mod.ts`);
  const found = new Set<string>();
  for (const dep of mod?.dependencies ?? []) {
    for (const target of [dep.code, dep.type]) {
      const path = target?.specifier.slice(root.length);
      if (!target || layerOf(target.specifier, root) !== "cli" || path === MOD_CLI_ENTRY) continue;
      found.add(
        `mod.ts:${target.span.start.line + 1} imports ${path} (mod.ts exports the library from ` +
          `below src/cli; of src/cli it imports only ${MOD_CLI_ENTRY}, for main)`,
      );
    }
  }
  return [...found].sort();
}

if (import.meta.main) {
  const root = new URL("../", import.meta.url).href;
  const entries = ["mod.ts", ...[...Deno.readDirSync("scripts")].map((e) => `scripts/${e.name}`)]
    .filter((p) => p.endsWith(".ts"));
  // `deno info` takes one root at a time.
  const graphs = await Promise.all(entries.map(async (entry) => {
    const { code, stdout, stderr } = await new Deno.Command("deno", {
      args: ["info", "--json", entry],
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (code !== 0) {
      console.error(
        `check_layers: deno info ${entry} failed:\n${new TextDecoder().decode(stderr)}`,
      );
      Deno.exit(1);
    }
    return JSON.parse(new TextDecoder().decode(stdout)).modules as InfoModule[];
  }));
  const upward = [...upwardImports(graphs.flat(), root), ...modCliImports(graphs[0], root)];
  if (upward.length) {
    console.error(
      `check_layers: ${upward.length} import(s) against the layers:\n  ${upward.join("\n  ")}`,
    );
    Deno.exit(1);
  }
  console.log(
    `check_layers: src/ imports point down only (${LAYERS.join(" < ")}); mod.ts takes only ` +
      `${MOD_CLI_ENTRY} from src/cli`,
  );
}
