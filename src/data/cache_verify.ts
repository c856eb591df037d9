/**
 * Checks cache shards against the SHA-256 the manifest records before training reads them, so
 * a shard changed in place or swapped with another is refused instead of trained on. Hashing a
 * large cache takes a while, so a caller may name a file (in a folder it writes, such as the
 * run folder) that remembers each verified shard by size, mtime and inode: a second open of an
 * unchanged cache then hashes nothing, while any rewrite, rename or swap changes the stamp and
 * hashes that shard again.
 */

import { sha256File } from "../util/hash.ts";
import { resolve } from "node:path";
import { writeFileAtomic } from "../io/atomic.ts";

/** The file name training uses (in the run folder) for the verified-shard memo. */
export const VERIFIED_SHARDS_FILE = "verified-shards.json";

/** What identifies one verified shard file on disk. */
interface ShardStamp {
  file: string;
  bytes: number;
  mtimeMs: number;
  ino: number;
  sha256: string;
}

interface VerifiedShards {
  /** The cache folder's absolute path: a memo of another cache is not used. */
  cache: string;
  shards: ShardStamp[];
}

function sameStamp(a: ShardStamp, b: ShardStamp): boolean {
  return a.file === b.file && a.bytes === b.bytes && a.mtimeMs === b.mtimeMs &&
    a.ino === b.ino && a.sha256 === b.sha256;
}

/** Hash checks of one cache's shards, with the optional memo of those already verified. */
export class ShardHashCheck {
  readonly #cache: string;
  readonly #memoFile: string | undefined;
  readonly #known: Map<string, ShardStamp>;
  #changed = false;

  private constructor(cache: string, memoFile: string | undefined, known: ShardStamp[]) {
    this.#cache = cache;
    this.#memoFile = memoFile;
    this.#known = new Map(known.map((s) => [s.file, s]));
  }

  /** Reads the memo; a missing, unreadable or other cache's memo counts as empty. */
  static async load(dir: string, memoFile?: string): Promise<ShardHashCheck> {
    const cache = resolve(dir);
    let known: ShardStamp[] = [];
    if (memoFile) {
      try {
        const memo = JSON.parse(await Deno.readTextFile(memoFile)) as VerifiedShards;
        if (memo.cache === cache && Array.isArray(memo.shards)) known = memo.shards;
      } catch {
        // Only a speed-up: without it every shard is hashed.
      }
    }
    return new ShardHashCheck(cache, memoFile, known);
  }

  /**
   * What is wrong with `path` (listed as `file` with SHA-256 `sha256`), or undefined when its
   * bytes hash to the manifest's value; `stat` is the file's current stat.
   */
  async problem(
    path: string,
    file: string,
    sha256: string,
    stat: Deno.FileInfo,
  ): Promise<string | undefined> {
    const stamp: ShardStamp | undefined = stat.mtime && stat.ino !== null
      ? { file, bytes: stat.size, mtimeMs: stat.mtime.getTime(), ino: stat.ino, sha256 }
      : undefined;
    const known = this.#known.get(file);
    if (stamp && known && sameStamp(stamp, known)) return undefined;
    const actual = await sha256File(path);
    if (actual !== sha256) {
      return `SHA-256 ${actual}, the manifest says ${sha256}: the file was changed or replaced`;
    }
    if (stamp) {
      this.#known.set(file, stamp);
      this.#changed = true;
    }
    return undefined;
  }

  /** Writes the memo (atomically) when a shard was newly verified. */
  async save(): Promise<void> {
    if (!this.#memoFile || !this.#changed) return;
    const memo: VerifiedShards = { cache: this.#cache, shards: [...this.#known.values()] };
    await writeFileAtomic(this.#memoFile, JSON.stringify(memo, null, 2) + "\n");
    this.#changed = false;
  }
}
