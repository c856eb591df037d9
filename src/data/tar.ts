/**
 * Streaming tar reader (POSIX ustar, pax extended headers, GNU long names and base-256 sizes),
 * plain or gzip. Headers are read one 512-byte block at a time and member data only on request,
 * so a shard of images is walked by seeking past them (or inflating and dropping them): memory
 * stays at one member, whatever the tar size.
 */

import { DataError } from "./collect.ts";
import { type ByteReader, openByteReader } from "./input.ts";

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
 * Yields the regular-file members of the tar at `path` (plain or gzip, by its magic bytes), in
 * archive order. A member's `read` works until the next member is asked for; members not read
 * are skipped (a seek in a plain tar). A corrupt header (bad checksum or size) or a member that
 * runs past the end of the data is an error naming the file and the byte offset (in the
 * inflated tar for gzip). A tar that just ends without the two zero blocks is accepted.
 */
export async function* tarMembers(path: string): AsyncGenerator<TarMember> {
  const input = await openByteReader(path);
  try {
    yield* members(path, input);
    // Inflating what follows the end blocks checks the gzip's length and checksum, so a
    // truncated or corrupt file is an error even when every member came through.
    while (await input.skip(1 << 20) > 0);
  } finally {
    await input.close();
  }
}

async function* members(path: string, input: ByteReader): AsyncGenerator<TarMember> {
  const header = new Uint8Array(BLOCK);
  let offset = 0;
  let longName: string | undefined;
  let pax = new Map<string, string>();

  const at = (where: number) => `${path}: ${input.gzip ? "inflated tar " : ""}byte offset ${where}`;
  const cutShort = (name: string, size: number, headerAt: number, end: number) =>
    new DataError(
      `${at(headerAt)}: member "${name}" needs ${size} bytes but the ` +
        `${input.gzip ? "inflated tar" : "file"} ends at byte ${end} (truncated). ${REFETCH}`,
    );

  while (true) {
    const got = await input.read(header);
    if (got === 0) return;
    if (got < BLOCK) {
      throw new DataError(
        `${at(offset)}: the ${input.gzip ? "data ends" : "file ends"} inside a tar header ` +
          `(truncated). ${REFETCH}`,
      );
    }
    if (header.every((byte) => byte === 0)) return;
    if (!checksumMatches(header)) {
      throw new DataError(
        `${at(offset)}: not a tar header (checksum mismatch): the file is not a tar archive ` +
          `or is corrupt here. ${REFETCH}`,
      );
    }
    const type = String.fromCharCode(header[156]);
    const meta = type === "x" || type === "L" || type === "g";
    // A pax "size" record describes the next file member, never a metadata header.
    const size = Number((!meta && pax.get("size")) || tarNumber(header, 124, 12));
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new DataError(`${at(offset)}: tar header has an unreadable size field. ${REFETCH}`);
    }
    const headerAt = offset;
    const dataOffset = offset + BLOCK;
    const padded = Math.ceil(size / BLOCK) * BLOCK;
    offset = dataOffset + padded;
    const ustarName = () => {
      const magic = latin1.decode(header.subarray(257, 263));
      const prefix = magic === "ustar\0" ? cString(header, 345, 155) : "";
      const name = cString(header, 0, 100);
      return prefix ? `${prefix}/${name}` : name;
    };
    const name = pax.get("path") ?? longName ?? ustarName();
    if (input.size !== undefined && dataOffset + size > input.size) {
      throw cutShort(name, size, headerAt, input.size);
    }
    // Bytes of this member's data and padding taken so far.
    let taken = 0;
    const readBody = async () => {
      if (taken > 0) throw new Error(`tar member "${name}" read twice or after the next one`);
      const body = new Uint8Array(size);
      taken = await input.read(body);
      if (taken < size) throw cutShort(name, size, headerAt, dataOffset + taken);
      return body;
    };

    if (type === "x" || type === "L") {
      if (size > MAX_META_BYTES) {
        throw new DataError(`${at(headerAt)}: oversized tar extended header. ${REFETCH}`);
      }
      const body = await readBody();
      if (type === "x") pax = parsePax(body, () => at(headerAt));
      else longName = cString(body, 0, body.length);
    } else {
      // Global pax headers ('g'), links, folders and devices carry no file data to caption.
      if (type === "0" || type === "\0" || type === "7") {
        yield { name, size, offset: headerAt, read: readBody };
      }
      longName = undefined;
      pax = new Map();
    }
    const rest = padded - taken;
    taken = padded; // a later read() of this member is a caller bug, not a re-read
    const skipped = await input.skip(rest);
    // Only the data itself must be there; a tar cut inside the last padding still reads.
    if (skipped < rest && padded - rest + skipped < size) {
      throw cutShort(name, size, headerAt, dataOffset + padded - rest + skipped);
    }
  }
}
