/**
 * Hugging Face model folders: `config.json` plus weights in `model.safetensors`, or sharded as
 * `model.safetensors.index.json` (`{"weight_map": {tensor: shard file}}`) and its shards.
 * A diffusers pipeline (SDXL) keeps one such folder per component (`text_encoder/`,
 * `text_encoder_2/`): open the component's folder.
 *
 * `ModelFolder.open` reads and checks config.json, the index and every shard's header, so a
 * broken folder fails at open rather than midway through a load. Shard file handles are then
 * opened only when data is read, and a loader that streams one shard at a time releases each
 * with `closeShard`:
 *
 *     for (const shard of folder.shards()) {
 *       for (const name of folder.namesInShard(shard)) upload(name, await folder.readBytes(name));
 *       folder.closeShard(shard);
 *     }
 */
import { join } from "node:path";
import { closeNamesHint } from "./closest.ts";
import { readJsonObject } from "./json.ts";
import { SafetensorsFile, type TensorInfo } from "./safetensors.ts";

export interface ModelFolderOptions {
  /**
   * File stem of the weights: `<stem>.safetensors` or `<stem>.safetensors.index.json`.
   * Default "model"; e.g. "model.fp16" for diffusers fp16 variants.
   */
  weightsName?: string;
}

/** A tensor's location, with the shard file (relative to the folder) that holds it. */
export interface ShardedTensorInfo extends TensorInfo {
  shard: string;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

async function readConfig(dir: string): Promise<Record<string, unknown>> {
  const path = join(dir, "config.json");
  if (!(await exists(path))) {
    const pipelineHint = (await exists(join(dir, "model_index.json")))
      ? ` ${dir} is a diffusers pipeline: open a component subfolder such as text_encoder/ or text_encoder_2/.`
      : "";
    throw new Error(
      `${path} not found: a Hugging Face model folder holds config.json and model.safetensors ` +
        `(or model.safetensors.index.json and its shards).${pipelineHint}`,
    );
  }
  return await readJsonObject(path, "the model config");
}

/** The index's tensor -> shard map, checked to be strings only. */
async function readWeightMap(indexPath: string): Promise<Map<string, string>> {
  const index = await readJsonObject(indexPath, "the shard index");
  const weightMap = index.weight_map;
  if (typeof weightMap !== "object" || weightMap === null || Array.isArray(weightMap)) {
    throw new Error(
      `${indexPath}: "weight_map" is missing or not a map of tensor name to shard file`,
    );
  }
  const entries = Object.entries(weightMap as Record<string, unknown>);
  for (const [name, shard] of entries) {
    if (typeof shard !== "string") {
      throw new Error(
        `${indexPath}: "weight_map" entry "${name}" is ${
          JSON.stringify(shard)
        }, not a shard file name`,
      );
    }
  }
  return new Map(entries as [string, string][]);
}

/** Reads and checks a file's header, then releases its handle until data is read. */
async function openHeaderOnly(path: string): Promise<SafetensorsFile> {
  const file = await SafetensorsFile.open(path);
  file.close();
  return file;
}

/**
 * Opens every shard an index names (checking that it exists and holds the tensors the index
 * puts in it). Returns the shards in name order and tensor -> shard in shard then file order.
 */
async function openShards(
  dir: string,
  indexPath: string,
): Promise<{ shards: Map<string, SafetensorsFile>; shardOf: Map<string, string> }> {
  const weightMap = await readWeightMap(indexPath);
  const byShard = new Map<string, SafetensorsFile>();
  for (const [name, shard] of weightMap) {
    if (byShard.has(shard)) continue;
    const shardPath = join(dir, shard);
    if (!(await exists(shardPath))) {
      throw new Error(
        `${indexPath} names shard ${shard} (for tensor "${name}"), but ${shardPath} ` +
          "does not exist; the download is incomplete",
      );
    }
    byShard.set(shard, await openHeaderOnly(shardPath));
  }
  const shards = new Map([...byShard].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
  const shardOf = new Map<string, string>();
  for (const [shard, file] of shards) {
    for (const name of file.names()) {
      if (weightMap.get(name) === shard) shardOf.set(name, shard);
    }
  }
  for (const [name, shard] of weightMap) {
    if (!shardOf.has(name)) {
      throw new Error(
        `${indexPath} puts tensor "${name}" in shard ${shard}, but that shard has no such tensor`,
      );
    }
  }
  return { shards, shardOf };
}

export class ModelFolder {
  readonly dir: string;
  readonly config: Record<string, unknown>;
  /** `model.safetensors`, or the index file for sharded weights; named in missing-key errors. */
  readonly weightsPath: string;
  /** Shard file name (relative to `dir`) -> open file, in shard-name order. */
  readonly #shards: Map<string, SafetensorsFile>;
  /** Tensor name -> shard file name, in shard then file order. */
  readonly #shardOf: Map<string, string>;

  private constructor(
    dir: string,
    config: Record<string, unknown>,
    weightsPath: string,
    shards: Map<string, SafetensorsFile>,
    shardOf: Map<string, string>,
  ) {
    this.dir = dir;
    this.config = config;
    this.weightsPath = weightsPath;
    this.#shards = shards;
    this.#shardOf = shardOf;
  }

  /** Reads config.json and the headers of the weights in `dir`; see the module comment. */
  static async open(dir: string, opts: ModelFolderOptions = {}): Promise<ModelFolder> {
    const config = await readConfig(dir);
    const stem = opts.weightsName ?? "model";
    const single = `${stem}.safetensors`;
    const indexPath = join(dir, `${stem}.safetensors.index.json`);
    // Like transformers, a single file wins over an index.
    if (await exists(join(dir, single))) {
      const file = await openHeaderOnly(join(dir, single));
      const shardOf = new Map(file.names().map((name) => [name, single]));
      return new ModelFolder(dir, config, file.path, new Map([[single, file]]), shardOf);
    }
    if (await exists(indexPath)) {
      const { shards, shardOf } = await openShards(dir, indexPath);
      return new ModelFolder(dir, config, indexPath, shards, shardOf);
    }
    const found = (await Array.fromAsync(Deno.readDir(dir)))
      .map((entry) => entry.name)
      .filter((name) => name.endsWith(".safetensors"))
      .sort();
    const hint = found.length
      ? ` It has ${found.join(", ")}: pass the stem ` +
        `(e.g. "${found[0].replace(/\.safetensors$/, "")}") as weightsName.`
      : "";
    throw new Error(`${dir}: neither ${single} nor ${stem}.safetensors.index.json found.${hint}`);
  }

  /** Tensor names, shard by shard in file order. */
  names(): string[] {
    return [...this.#shardOf.keys()];
  }

  has(name: string): boolean {
    return this.#shardOf.has(name);
  }

  /** Shard file names (relative to `dir`) in name order; one entry for unsharded weights. */
  shards(): string[] {
    return [...this.#shards.keys()];
  }

  /** The shard file (relative to `dir`) that holds `name`. */
  shardOf(name: string): string {
    const shard = this.#shardOf.get(name);
    if (shard === undefined) {
      throw new Error(
        `${this.weightsPath}: no tensor "${name}". ${closeNamesHint(name, this.#shardOf.keys())}`,
      );
    }
    return shard;
  }

  /** Names of the tensors in `shard`, in file order. */
  namesInShard(shard: string): string[] {
    return this.#shard(shard).names().filter((name) => this.#shardOf.get(name) === shard);
  }

  info(name: string): ShardedTensorInfo {
    const shard = this.shardOf(name);
    return { ...this.#shards.get(shard)!.info(name), shard };
  }

  async readBytes(name: string): Promise<Uint8Array> {
    return await this.#fileOf(name).readBytes(name);
  }

  /** `byteLength` bytes of `name`'s data from `byteOffset`; see `SafetensorsFile.readRange`. */
  async readRange(name: string, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    return await this.#fileOf(name).readRange(name, byteOffset, byteLength);
  }

  /** `name` as f32, decoded into `into` when given; see `SafetensorsFile.readF32`. */
  async readF32(name: string, into?: Float32Array): Promise<Float32Array> {
    return await this.#fileOf(name).readF32(name, into);
  }

  async readIntegers(name: string): Promise<number[]> {
    return await this.#fileOf(name).readIntegers(name);
  }

  /** Releases `shard`'s file handle (a later read reopens it). */
  closeShard(shard: string): void {
    this.#shard(shard).close();
  }

  /** Releases every shard's file handle. */
  close(): void {
    for (const file of this.#shards.values()) file.close();
  }

  /** A number from config.json; `fallback` when the key is absent or null. */
  configNumber(key: string, fallback?: number): number {
    return this.#configValue(key, "a number", (v) => typeof v === "number", fallback);
  }

  /** An integer from config.json (sizes, counts); `fallback` when the key is absent or null. */
  configInteger(key: string, fallback?: number): number {
    const value = this.configNumber(key, fallback);
    if (!Number.isInteger(value)) {
      throw new Error(
        `${join(this.dir, "config.json")}: "${key}" is ${value}, expected an integer`,
      );
    }
    return value;
  }

  /** A string from config.json; `fallback` when the key is absent or null. */
  configString(key: string, fallback?: string): string {
    return this.#configValue(key, "a string", (v) => typeof v === "string", fallback);
  }

  #configValue<T>(
    key: string,
    kind: string,
    isKind: (value: unknown) => value is T,
    fallback: T | undefined,
  ): T {
    const path = join(this.dir, "config.json");
    const value = this.config[key];
    if (value === undefined || value === null) {
      if (fallback !== undefined) return fallback;
      throw new Error(
        `${path} has no "${key}" (${kind} is required). ${
          closeNamesHint(key, Object.keys(this.config))
        }`,
      );
    }
    if (!isKind(value)) {
      throw new Error(`${path}: "${key}" is ${JSON.stringify(value)}, expected ${kind}`);
    }
    return value;
  }

  #shard(shard: string): SafetensorsFile {
    const file = this.#shards.get(shard);
    if (!file) {
      throw new Error(`${this.dir}: no shard ${shard}; the shards are ${this.shards().join(", ")}`);
    }
    return file;
  }

  #fileOf(name: string): SafetensorsFile {
    return this.#shards.get(this.shardOf(name))!;
  }
}
