/**
 * Kohya-style folders: `img001.png` + `img001.txt`, in any subfolder (`10_concept/`). As in
 * kohya's sd-scripts, a caption file counts only beside a same-name image and its caption is
 * the file's first line. Images are never opened.
 */

import { join } from "node:path";
import { type CaptionCollector, decodeUtf8 } from "./collect.ts";

/** Kohya's image extensions (plus gif/tiff), matched case-insensitively. */
const IMAGE_EXTENSIONS = new Set([
  "png",
  "jpg",
  "jpeg",
  "webp",
  "bmp",
  "gif",
  "avif",
  "jxl",
  "tif",
  "tiff",
]);

function stem(rel: string): string {
  const dot = rel.lastIndexOf(".");
  return dot > rel.lastIndexOf("/") ? rel.slice(0, dot) : rel;
}

export function isImagePath(rel: string): boolean {
  const dot = rel.lastIndexOf(".");
  return dot > rel.lastIndexOf("/") && IMAGE_EXTENSIONS.has(rel.slice(dot + 1).toLowerCase());
}

export function isKohyaCaptionPath(rel: string): boolean {
  return rel.endsWith(".txt");
}

/**
 * Reads the captions among `rels` (all files under `root`, relative, sorted). Ids: the caption
 * path without `.txt` (`10_concept/img001`). A `.txt` with no image beside it (a README, kohya's
 * `sample_prompts.txt`) is skipped and counted; lines after the first are ignored with a warning.
 */
export async function readKohyaFolder(
  root: string,
  rels: readonly string[],
  collector: CaptionCollector,
): Promise<void> {
  const imageStems = new Set(rels.filter(isImagePath).map(stem));
  const captionStems = new Set<string>();
  let multiLine = 0;
  for (const rel of rels.filter(isKohyaCaptionPath)) {
    const id = stem(rel);
    if (!imageStems.has(id)) {
      collector.countSkipped("noImage", rel);
      continue;
    }
    captionStems.add(id);
    const path = join(root, rel);
    const [first, ...rest] = decodeUtf8(await Deno.readFile(path), (line) => `${path}:${line}`)
      .split("\n");
    if (rest.some((line) => line.trim() !== "")) multiLine++;
    collector.add(path, id, first);
  }
  if (multiLine > 0) {
    collector.warnOnce(
      `${multiLine} caption files have more than one line: only the first line is the caption, ` +
        `as in kohya's sd-scripts`,
    );
  }
  const uncaptioned = [...imageStems].filter((id) => !captionStems.has(id)).length;
  if (uncaptioned > 0) collector.warnOnce(`${uncaptioned} images have no .txt caption`);
}
