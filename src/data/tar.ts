/**
 * Streaming tar reader (POSIX ustar, pax extended headers, GNU long names and base-256 sizes).
 * Headers are read one 512-byte block at a time and member data only on request, so a shard
 * of images is walked by seeking past them: memory stays at one member, whatever the tar size.
 */

import { DataError } from "./collect.ts";

const BLOCK = 512;
/** Pax and GNU long-name bodies are metadata; anything bigger is a corrupt size field. */
const MAX_META_BYTES = 1 << 20;

export interface TarMember {
  /** Path inside the tar (pax `path` / GNU long name applied, ustar prefix joined). */
  name: string;
  size: number;
  /** Byte offset of the member's header block. */
  offset: number;
  /** Reads the member's data; members never read are skipped with a seek. */
  read(): Promise<Uint8Array>;
}

const latin1 = new TextDecoder("latin1");
const utf8 = new TextDecoder("utf-8");

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

function cString(block: Uint8Array, start: number, length: number): string {
  const field = block.subarray(start, start + length);
  const end = field.indexOf(0);
  return utf8.decode(end < 0 ? field : field.subarray(0, end));
}

/** A numeric field: octal text (NUL/space padded), or base-256 when the top bit is set. */
function tarNumber(block: Uint8Array, start: number, length: number): number {
  if (block[start] & 0x80) {
    let value = block[start] & 0x7f;
    for (let k = 1; k < length; k++) value = value * 256 + block[start + k];
    return value;
  }
  const text = latin1.decode(block.subarray(start, start + length)).replace(/[\0 ]+$/, "")
    .replace(/^ +/, "");
  return /^[0-7]+$/.test(text) ? parseInt(text, 8) : text === "" ? 0 : NaN;
}

function checksumMatches(block: Uint8Array): boolean {
  const stored = tarNumber(block, 148, 8);
  let unsigned = 0;
  let signed = 0;
  for (let k = 0; k < BLOCK; k++) {
    const byte = k >= 148 && k < 156 ? 0x20 : block[k];
    unsigned += byte;
    signed += byte > 127 ? byte - 256 : byte;
  }
  // Some old writers summed signed bytes; both sums are accepted, as GNU tar does.
  return stored === unsigned || stored === signed;
}

/** Pax records: "LEN key=value\n", LEN counting the whole record in bytes. */
function parsePax(body: Uint8Array, where: () => string): Map<string, string> {
  const records = new Map<string, string>();
  let at = 0;
  while (at < body.length) {
    const space = body.indexOf(0x20, at);
    const length = space < 0 ? NaN : Number(latin1.decode(body.subarray(at, space)));
    const end = at + length;
    if (!(length > 0) || end > body.length || body[end - 1] !== 0x0a) {
      throw new DataError(`${where()}: malformed pax extended header record. ${REFETCH}`);
    }
    const record = utf8.decode(body.subarray(space + 1, end - 1));
    const eq = record.indexOf("=");
    if (eq > 0) records.set(record.slice(0, eq), record.slice(eq + 1));
    at = end;
  }
  return records;
}

const REFETCH = "Fix: download or write the shard again; `tar -tvf FILE` shows where it breaks.";

/**
 * Yields the regular-file members of the tar at `path`, in archive order. A corrupt header
 * (bad checksum or size) or a member that runs past the end of the file is an error naming the
 * file and the byte offset. A tar that just ends without the two zero blocks is accepted.
 */
export async function* tarMembers(path: string): AsyncGenerator<TarMember> {
  using file = await Deno.open(path, { read: true });
  const fileSize = (await file.stat()).size;
  const header = new Uint8Array(BLOCK);
  let offset = 0;
  let longName: string | undefined;
  let pax = new Map<string, string>();

  const at = (where: number) => `${path}: byte offset ${where}`;
  const readBody = async (dataOffset: number, size: number, name: string, headerAt: number) => {
    const body = new Uint8Array(size);
    await file.seek(dataOffset, Deno.SeekMode.Start);
    if (await readFull(file, body) < size) {
      throw new DataError(`${at(headerAt)}: member "${name}" is cut short. ${REFETCH}`);
    }
    return body;
  };

  while (true) {
    await file.seek(offset, Deno.SeekMode.Start);
    const got = await readFull(file, header);
    if (got === 0) return;
    if (got < BLOCK) {
      throw new DataError(
        `${at(offset)}: the file ends inside a tar header (truncated). ${REFETCH}`,
      );
    }
    if (header.every((byte) => byte === 0)) return;
    if (!checksumMatches(header)) {
      const gzip = offset === 0 && header[0] === 0x1f && header[1] === 0x8b;
      throw new DataError(
        gzip
          ? `${path}: is gzip-compressed, not a plain tar. Fix: gunzip it to a .tar first.`
          : `${at(offset)}: not a tar header (checksum mismatch): the file is not a tar ` +
            `archive or is corrupt here. ${REFETCH}`,
      );
    }
    const type = String.fromCharCode(header[156]);
    const meta = type === "x" || type === "L" || type === "g";
    // A pax "size" record describes the next file member, never a metadata header.
    const size = Number((!meta && pax.get("size")) || tarNumber(header, 124, 12));
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new DataError(`${at(offset)}: tar header has an unreadable size field. ${REFETCH}`);
    }
    const dataOffset = offset + BLOCK;
    const next = dataOffset + Math.ceil(size / BLOCK) * BLOCK;
    const ustarName = () => {
      const magic = latin1.decode(header.subarray(257, 263));
      const prefix = magic === "ustar\0" ? cString(header, 345, 155) : "";
      const name = cString(header, 0, 100);
      return prefix ? `${prefix}/${name}` : name;
    };
    const name = pax.get("path") ?? longName ?? ustarName();
    if (dataOffset + size > fileSize) {
      throw new DataError(
        `${at(offset)}: member "${name}" needs ${size} bytes but the file ends at byte ` +
          `${fileSize} (truncated). ${REFETCH}`,
      );
    }
    const headerAt = offset;
    offset = next;

    if (type === "x" || type === "L") {
      if (size > MAX_META_BYTES) {
        throw new DataError(`${at(headerAt)}: oversized tar extended header. ${REFETCH}`);
      }
      const body = await readBody(dataOffset, size, name, headerAt);
      if (type === "x") pax = parsePax(body, () => at(headerAt));
      else longName = cString(body, 0, body.length);
      continue;
    }
    // Global pax headers ('g'), links, folders and devices carry no file data to caption.
    if (type === "0" || type === "\0" || type === "7") {
      yield {
        name,
        size,
        offset: headerAt,
        read: () => readBody(dataOffset, size, name, headerAt),
      };
    }
    longName = undefined;
    pax = new Map();
  }
}
