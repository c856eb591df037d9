/**
 * WebDataset shards as SPRIGHT ships them: each sample is `{key}.jpg`, `{key}.json` (the
 * captions) and `{key}.metadata.json`. Only `{key}.json` members are read; images are skipped
 * by seeking past them.
 */

import {
  type CaptionCollector,
  type CaptionPick,
  type CaptionSelection,
  captionText,
  DataError,
  decodeUtf8,
  pickValues,
  resolvePick,
} from "./collect.ts";
import type { SourceFile } from "./records.ts";
import { tarMembers } from "./tar.ts";

/**
 * WebDataset's key/extension rule: the extension starts at the first dot of the file name, so
 * `data/9/0.metadata.json` is key `data/9/0`, extension `metadata.json`.
 */
export function splitSampleName(name: string): { key: string; ext: string } {
  const path = name.replace(/^(\.\/)+/, "");
  const slash = path.lastIndexOf("/");
  const dot = path.indexOf(".", slash + 1);
  return dot < 0 ? { key: path, ext: "" } : { key: path.slice(0, dot), ext: path.slice(dot + 1) };
}

/** Ids: `rel:key`, plus `#field` for SPRIGHT choices (e.g. `00000.tar:123#spatial_caption`). */
export async function readWebDatasetShard(
  file: SourceFile,
  selection: CaptionSelection,
  collector: CaptionCollector,
): Promise<void> {
  let pick: CaptionPick | undefined;
  const seen = new Set<string>();
  for await (const member of tarMembers(file.path)) {
    const { key, ext } = splitSampleName(member.name);
    seen.add(ext);
    if (ext !== "json") continue;
    const where = `${file.path}: member "${member.name}" (byte offset ${member.offset})`;
    const text = decodeUtf8(await member.read(), (line) => `${where}, line ${line}`);
    let record: unknown;
    try {
      record = JSON.parse(text);
    } catch (error) {
      throw new DataError(
        `${where}: not valid JSON (${(error as Error).message}). ` +
          `Fix: rewrite the shard; each {key}.json must hold one JSON object.`,
      );
    }
    if (typeof record !== "object" || record === null || Array.isArray(record)) {
      throw new DataError(`${where}: expected a JSON object of captions. Fix: rewrite the shard.`);
    }
    const fields = record as Record<string, unknown>;
    pick ??= resolvePick(Object.keys(fields), selection, where, collector);
    for (const { field, suffix, value } of pickValues(fields, pick, where)) {
      collector.add(file.path, `${file.rel}:${key}${suffix}`, captionText(value, field, where));
    }
  }
  if (!seen.has("json")) {
    const exts = [...seen].sort().map((e) => `.${e}`).join(", ") || "none";
    collector.warnOnce(
      `${file.path}: no {key}.json caption members (member extensions: ${exts})`,
    );
  }
}
