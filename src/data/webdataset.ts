/**
 * WebDataset shards, plain or gzip: as SPRIGHT ships them (`{key}.jpg`, `{key}.json` with the
 * captions, `{key}.metadata.json`) or as img2dataset writes them (`{key}.jpg`, `{key}.txt` with
 * the caption, `{key}.json` with metadata). Only `{key}.json` and `{key}.txt` members are read;
 * images are skipped by seeking past them (or inflating and dropping them).
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

interface CaptionMember {
  text: string;
  where: string;
}

/** The caption members of one sample (a sample's members are adjacent in a shard). */
interface Sample {
  key: string;
  json?: CaptionMember;
  txt?: CaptionMember;
}

/**
 * Captions from `{key}.txt` (the whole member is the caption) or `{key}.json` (a record, read
 * like a JSONL line). When a sample has both, `.txt` wins unless `--caption-field`/`--spright`
 * asks for a field: `.txt` is what WebDataset loaders train on (`to_tuple("jpg", "txt")`) and
 * what img2dataset writes the caption to, while its `.json` is download metadata that may lack
 * the caption. Ids: `rel:key`, plus `#field` for SPRIGHT choices (`00000.tar:123#spatial_caption`).
 */
export async function readWebDatasetShard(
  file: SourceFile,
  selection: CaptionSelection,
  collector: CaptionCollector,
): Promise<void> {
  const byField = selection.captionField !== undefined || selection.spright !== undefined;
  let pick: CaptionPick | undefined;
  const addSample = ({ key, json, txt }: Sample) => {
    if (txt && !(byField && json)) {
      collector.add(file.path, `${file.rel}:${key}`, txt.text);
      return;
    }
    if (!json) return;
    const fields = parseRecord(json);
    pick ??= resolvePick(Object.keys(fields), selection, json.where, collector);
    for (const { field, suffix, value } of pickValues(fields, pick, json.where)) {
      collector.add(
        file.path,
        `${file.rel}:${key}${suffix}`,
        captionText(value, field, json.where),
      );
    }
  };
  const seen = new Set<string>();
  let sample: Sample | undefined;
  for await (const member of tarMembers(file.path)) {
    const { key, ext } = splitSampleName(member.name);
    seen.add(ext);
    if (ext !== "json" && ext !== "txt") continue;
    if (sample?.key !== key) {
      if (sample) addSample(sample);
      sample = { key };
    }
    const where = `${file.path}: member "${member.name}" (byte offset ${member.offset})`;
    const text = decodeUtf8(await member.read(), (line) => `${where}, line ${line}`);
    sample[ext] = { text, where };
  }
  if (sample) addSample(sample);
  if (!seen.has("json") && !seen.has("txt")) {
    const exts = [...seen].sort().map((e) => `.${e}`).join(", ") || "none";
    collector.warnOnce(
      `${file.path}: no {key}.json or {key}.txt caption members (member extensions: ${exts})`,
    );
  }
}

function parseRecord({ text, where }: CaptionMember): Record<string, unknown> {
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
  return record as Record<string, unknown>;
}
