/**
 * Byte input for the caption readers. A file that starts with the gzip magic bytes (1f 8b) is
 * inflated on the fly, whatever its name, by node:zlib's streaming inflater (the README's
 * dependency table says why this one); nothing holds more than a chunk of either form.
 */

import { createReadStream } from "node:fs";
import { createGunzip } from "node:zlib";
import { DataError } from "./collect.ts";

const CHUNK = 1 << 20;

/** Whether the file starts with gzip's magic bytes. */
export async function isGzipFile(path: string): Promise<boolean> {
  using file = await Deno.open(path, { read: true });
  const head = new Uint8Array(2);
  return await readFull(file, head) === 2 && head[0] === 0x1f && head[1] === 0x8b;
}

/** Fills `buf` from the current position; returns how many bytes the file still had. */
async function readFull(file: Deno.FsFile, buf: Uint8Array): Promise<number> {
  let done = 0;
  while (done < buf.length) {
    const n = await file.read(buf.subarray(done));
    if (n === null) break;
    done += n;
  }
  return done;
}

const REGET = "Fix: download or copy the file again; `gzip -t FILE` checks a gzip file.";

/** The inflater's error as a DataError naming the file and the compressed byte offset. */
function gzipError(path: string, error: unknown, consumed: number, inflated: number): DataError {
  const { code, message } = error as { code?: string; message: string };
  if (code === "Z_BUF_ERROR") {
    return new DataError(
      `${path}: the gzip data ends at byte ${Deno.statSync(path).size} before the stream is ` +
        `complete (truncated; ${inflated} bytes inflated). ${REGET}`,
    );
  }
  // zlib finds damage where the data stops decoding or, at the latest, at the checksum.
  return new DataError(
    `${path}: corrupt gzip data (${message}), detected past compressed byte offset ` +
      `${consumed} of ${Deno.statSync(path).size} (${inflated} bytes inflated). ${REGET}`,
  );
}

/**
 * The inflated bytes of a gzip file, in chunks. Concatenated gzip members (`cat a.gz b.gz`)
 * read as one stream, as `gzip -d` reads them; a truncated file or a bad checksum is an error.
 */
async function* gunzipChunks(path: string): AsyncGenerator<Uint8Array> {
  const gunzip = createGunzip({ chunkSize: 1 << 16 });
  const input = createReadStream(path, { highWaterMark: CHUNK });
  input.on("error", (error) => gunzip.destroy(error));
  input.pipe(gunzip);
  let inflated = 0;
  try {
    for await (const chunk of gunzip) {
      inflated += chunk.length;
      yield chunk;
    }
  } catch (error) {
    // zlib's codes start with Z_; anything else (a read error) is not about the data.
    if (!String((error as { code?: unknown }).code).startsWith("Z_")) throw error;
    throw gzipError(path, error, gunzip.bytesWritten, inflated);
  } finally {
    input.destroy();
    gunzip.destroy();
  }
}

async function* chunksOf(file: Deno.FsFile): AsyncGenerator<Uint8Array> {
  for (;;) {
    const buffer = new Uint8Array(CHUNK);
    const n = await file.read(buffer);
    if (n === null) return;
    yield buffer.subarray(0, n);
  }
}

async function* plainChunks(path: string): AsyncGenerator<Uint8Array> {
  using file = await Deno.open(path, { read: true });
  yield* chunksOf(file);
}

/** The file's bytes in chunks, inflated when the file is gzip. */
export async function* fileChunks(path: string): AsyncGenerator<Uint8Array> {
  yield* (await isGzipFile(path)) ? gunzipChunks(path) : plainChunks(path);
}

/** Sequential reads and skips over a file's (inflated) bytes. */
export interface ByteReader {
  /** Whether the bytes are inflated from gzip (offsets then count inflated bytes). */
  readonly gzip: boolean;
  /** The byte count when known before reading (a plain file), for early truncation checks. */
  readonly size: number | undefined;
  /** Fills `buf` from the current position; returns how many bytes there were. */
  read(buf: Uint8Array): Promise<number>;
  /** Moves `n` bytes on; returns how many there were. */
  skip(n: number): Promise<number>;
  close(): Promise<void>;
}

/**
 * Reads and skips over chunks. A plain file's skip past the chunk in hand is a seek, so data
 * never read is never loaded; inflated gzip is inflated and dropped, one chunk at a time.
 */
class ChunkByteReader implements ByteReader {
  #chunk: Uint8Array = new Uint8Array(0);

  constructor(
    private chunks: AsyncGenerator<Uint8Array>,
    private file?: { handle: Deno.FsFile; size: number },
  ) {}

  get gzip(): boolean {
    return this.file === undefined;
  }

  get size(): number | undefined {
    return this.file?.size;
  }

  /** Moves up to `n` bytes on, copying them into `into` when given. */
  async #take(n: number, into?: Uint8Array): Promise<number> {
    let done = 0;
    while (done < n) {
      if (this.#chunk.length === 0) {
        if (!into && this.file && n - done > CHUNK) return done + await this.#seek(n - done);
        const next = await this.chunks.next();
        if (next.done) break;
        this.#chunk = next.value;
      }
      const k = Math.min(n - done, this.#chunk.length);
      into?.set(this.#chunk.subarray(0, k), done);
      this.#chunk = this.#chunk.subarray(k);
      done += k;
    }
    return done;
  }

  async #seek(n: number): Promise<number> {
    const { handle, size } = this.file!;
    const from = await handle.seek(0, Deno.SeekMode.Current);
    const to = Math.min(size, from + n);
    await handle.seek(to, Deno.SeekMode.Start);
    return to - from;
  }

  read(buf: Uint8Array): Promise<number> {
    return this.#take(buf.length, buf);
  }

  skip(n: number): Promise<number> {
    return this.#take(n);
  }

  async close(): Promise<void> {
    await this.chunks.return(undefined);
    this.file?.handle.close();
  }
}

/** A reader over the file's bytes, inflated when the file is gzip. */
export async function openByteReader(path: string): Promise<ByteReader> {
  if (await isGzipFile(path)) return new ChunkByteReader(gunzipChunks(path));
  const handle = await Deno.open(path, { read: true });
  const size = (await handle.stat()).size;
  return new ChunkByteReader(chunksOf(handle), { handle, size });
}
