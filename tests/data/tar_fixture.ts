/**
 * Builds small tar archives for tests: ustar headers, pax extended headers and GNU long names,
 * written to the byte layout of POSIX.1-2001 / GNU tar.
 */

const BLOCK = 512;
const encoder = new TextEncoder();

export interface TarEntryOptions {
  /** Typeflag; "0" (regular file) by default. */
  type?: string;
  /** The ustar prefix field (joined to the name with "/"). */
  prefix?: string;
  /** Writes the size field in GNU base-256 instead of octal. */
  base256Size?: boolean;
}

function putString(block: Uint8Array, at: number, length: number, text: string): void {
  const bytes = encoder.encode(text);
  if (bytes.length > length) throw new Error(`tar field too long: ${text}`);
  block.set(bytes, at);
}

function putOctal(block: Uint8Array, at: number, length: number, value: number): void {
  putString(block, at, length, value.toString(8).padStart(length - 1, "0") + "\0");
}

/** One 512-byte header block with a valid checksum. */
export function tarHeader(name: string, size: number, options: TarEntryOptions = {}): Uint8Array {
  const block = new Uint8Array(BLOCK);
  putString(block, 0, 100, name);
  putOctal(block, 100, 8, 0o644);
  putOctal(block, 108, 8, 0);
  putOctal(block, 116, 8, 0);
  if (options.base256Size) {
    block[124] = 0x80;
    let rest = size;
    for (let k = 135; k > 124; k--) {
      block[k] = rest % 256;
      rest = Math.floor(rest / 256);
    }
  } else {
    putOctal(block, 124, 12, size);
  }
  putOctal(block, 136, 12, 0);
  putString(block, 156, 1, options.type ?? "0");
  putString(block, 257, 6, "ustar\0");
  putString(block, 263, 2, "00");
  putString(block, 345, 155, options.prefix ?? "");
  block.fill(0x20, 148, 156);
  const sum = block.reduce((total, byte) => total + byte, 0);
  putString(block, 148, 8, sum.toString(8).padStart(6, "0") + "\0 ");
  return block;
}

function padded(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(Math.ceil(data.length / BLOCK) * BLOCK);
  out.set(data);
  return out;
}

/** A pax record "LEN key=value\n", LEN counting its own digits. */
function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  let length = encoder.encode(body).length;
  while (String(length).length + encoder.encode(body).length !== length) {
    length = String(length).length + encoder.encode(body).length;
  }
  return `${length}${body}`;
}

export type TarEntry =
  | { name: string; data: Uint8Array | string; options?: TarEntryOptions }
  | { pax: Record<string, string> }
  | { gnuLongName: string };

/** Header and data blocks of each entry, then the two zero blocks that end an archive. */
export function tarBytes(entries: TarEntry[]): Uint8Array {
  const parts: Uint8Array[] = [];
  const add = (name: string, data: Uint8Array, options?: TarEntryOptions) => {
    parts.push(tarHeader(name, data.length, options), padded(data));
  };
  for (const entry of entries) {
    if ("pax" in entry) {
      const records = Object.entries(entry.pax).map(([k, v]) => paxRecord(k, v)).join("");
      add("PaxHeaders/entry", encoder.encode(records), { type: "x" });
    } else if ("gnuLongName" in entry) {
      add("././@LongLink", encoder.encode(entry.gnuLongName + "\0"), { type: "L" });
    } else {
      const data = typeof entry.data === "string" ? encoder.encode(entry.data) : entry.data;
      add(entry.name, data, entry.options);
    }
  }
  parts.push(new Uint8Array(2 * BLOCK));
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** A WebDataset sample as SPRIGHT writes it: image, captions JSON, metadata JSON. */
export function sprightSample(key: string, captions: Record<string, unknown>): TarEntry[] {
  const image = new Uint8Array(3000).fill(0xd8); // stands in for a JPEG; never read
  return [
    { name: `${key}.jpg`, data: image },
    { name: `${key}.json`, data: JSON.stringify(captions) },
    { name: `${key}.metadata.json`, data: JSON.stringify({ width: 640, height: 480 }) },
  ];
}
