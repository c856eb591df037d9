/**
 * Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
 * an 8-byte little-endian header length N, N bytes of JSON header
 * `{"__metadata__": {str: str}, name: {dtype, shape, data_offsets: [begin, end]}, ...}`, then
 * the data area, where offsets are relative to its start.
 *
 * `SafetensorsFile.open` reads only the header (checkpoints are several GB) and checks it as
 * strictly as the reference implementation: the tensors must tile the data area exactly, with
 * no overlap, gap or trailing bytes. Tensor data is read on demand with positioned reads.
 */
import { writeAll, writeAtomic } from "./atomic.ts";
import { closeNamesHint } from "./closest.ts";
import {
  dataTypeMismatch,
  decodeF32,
  decodeIntegers,
  DTYPE_BYTES,
  encodeLittleEndian,
  isSafeDType,
  type SafeDType,
  type SafeTensorData,
} from "./dtype.ts";

export type { SafeDType, SafeTensorData } from "./dtype.ts";

/** Where one tensor lives in a file. */
export interface TensorInfo {
  name: string;
  dtype: SafeDType;
  shape: number[];
  /** Absolute position of the first byte in the file. */
  byteOffset: number;
  byteLength: number;
}

/** One tensor for `writeSafetensors`. */
export interface TensorToWrite {
  name: string;
  dtype: SafeDType;
  shape: number[];
  /** Host values in the array `dtype` takes (see `encodeLittleEndian`), or little-endian bytes. */
  data: SafeTensorData;
}

/** The reference implementation refuses larger headers; so do we, before allocating one. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;
const SUPPORTED_DTYPES = Object.keys(DTYPE_BYTES).join(", ");
const INTEGER_DTYPES: ReadonlySet<SafeDType> = new Set(["I64", "I32", "I16", "I8", "U8", "BOOL"]);

function fileError(path: string, message: string): Error {
  return new Error(`${path}: ${message}`);
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isShape(value: unknown): value is number[] {
  return Array.isArray(value) && value.every((d) => Number.isSafeInteger(d) && d >= 0);
}

function elementCount(shape: readonly number[]): number {
  return shape.reduce((product, dim) => product * dim, 1);
}

function checkMetadata(path: string, metadata: unknown): Record<string, string> {
  if (!isRecord(metadata)) {
    throw fileError(
      path,
      `"__metadata__" must be a map of strings, got ${JSON.stringify(metadata)}`,
    );
  }
  for (const [key, value] of Object.entries(metadata)) {
    if (typeof value !== "string") {
      throw fileError(
        path,
        `"__metadata__" key "${key}" holds ${
          JSON.stringify(value)
        }; metadata values must be strings`,
      );
    }
  }
  return metadata as Record<string, string>;
}

function parseTensorEntry(
  path: string,
  name: string,
  entry: unknown,
  dataStart: number,
  dataSize: number,
): TensorInfo {
  const where = `tensor "${name}"`;
  if (!isRecord(entry)) {
    throw fileError(
      path,
      `${where}: expected {dtype, shape, data_offsets}, got ${JSON.stringify(entry)}`,
    );
  }
  const { dtype, shape, data_offsets: offsets } = entry;
  if (typeof dtype !== "string" || !isSafeDType(dtype)) {
    throw fileError(
      path,
      `${where} has unknown dtype ${JSON.stringify(dtype)}; supported: ${SUPPORTED_DTYPES}`,
    );
  }
  if (!isShape(shape)) {
    throw fileError(
      path,
      `${where}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`,
    );
  }
  if (!isShape(offsets) || offsets.length !== 2 || offsets[0] > offsets[1]) {
    throw fileError(
      path,
      `${where}: data_offsets ${JSON.stringify(offsets)} is not [begin, end] with begin <= end`,
    );
  }
  const [begin, end] = offsets;
  const span = end - begin;
  const needed = elementCount(shape) * DTYPE_BYTES[dtype];
  if (span !== needed) {
    const layout = `shape [${shape}] of ${dtype} needs ${needed} bytes`;
    throw fileError(path, `${where}: ${layout}, but data_offsets [${begin}, ${end}] span ${span}`);
  }
  if (end > dataSize) {
    throw fileError(
      path,
      `${where}: data_offsets [${begin}, ${end}] run past the end of the data area ` +
        `(${dataSize} bytes); the file is truncated or its header is wrong`,
    );
  }
  return { name, dtype, shape, byteOffset: dataStart + begin, byteLength: span };
}

/**
 * Checks a header and returns its metadata and tensors in file order. `dataStart` is the file
 * position of the data area and `dataSize` its length. Every error names the file and the key.
 */
function parseHeader(
  path: string,
  headerBytes: Uint8Array,
  dataStart: number,
  dataSize: number,
): { metadata: Record<string, string>; tensors: TensorInfo[] } {
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes));
  } catch (error) {
    throw fileError(
      path,
      `the header is not valid JSON (${(error as Error).message}); ` +
        "the file is damaged or not safetensors",
    );
  }
  if (!isRecord(header)) throw fileError(path, "the header is not a JSON object");

  let metadata: Record<string, string> = {};
  const tensors: TensorInfo[] = [];
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") metadata = checkMetadata(path, entry);
    else tensors.push(parseTensorEntry(path, name, entry, dataStart, dataSize));
  }

  // The tensors must tile the data area: sorted by offset, each starts where the previous ended.
  tensors.sort((a, b) => a.byteOffset - b.byteOffset || a.byteLength - b.byteLength);
  let covered = 0; // data bytes accounted for, relative to the data area
  let previous: TensorInfo | undefined;
  for (const tensor of tensors) {
    const begin = tensor.byteOffset - dataStart;
    if (previous && begin < covered) {
      throw fileError(
        path,
        `tensor "${tensor.name}" data_offsets [${begin}, ${begin + tensor.byteLength}] overlap ` +
          `tensor "${previous.name}", which ends at ${covered}`,
      );
    }
    if (begin > covered) {
      throw fileError(
        path,
        `data bytes [${covered}, ${begin}) before tensor "${tensor.name}" belong to no tensor; ` +
          "the header offsets are wrong",
      );
    }
    covered = begin + tensor.byteLength;
    previous = tensor;
  }
  if (covered !== dataSize) {
    const last = previous
      ? `after the last tensor "${previous.name}"`
      : "in a file with no tensors";
    throw fileError(
      path,
      `${dataSize - covered} trailing data bytes ${last} belong to no tensor; ` +
        "the header offsets are wrong",
    );
  }
  return { metadata, tensors };
}

/** Reads exactly `length` bytes at `position`; `what` names them in the truncation error. */
async function readExactly(
  file: Deno.FsFile,
  path: string,
  position: number,
  length: number,
  what: string,
): Promise<Uint8Array> {
  const bytes = new Uint8Array(length);
  await file.seek(position, Deno.SeekMode.Start);
  let done = 0;
  while (done < length) {
    const n = await file.read(bytes.subarray(done));
    if (n === null) {
      throw fileError(
        path,
        `the file ends at byte ${position + done}, inside ${what}; it was truncated`,
      );
    }
    done += n;
  }
  return bytes;
}

async function openForReading(path: string): Promise<Deno.FsFile> {
  try {
    return await Deno.open(path, { read: true });
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) throw fileError(path, "no such file");
    throw error;
  }
}

/**
 * An open safetensors file whose header has been read and checked. The OS file handle stays
 * open for reads; `close()` releases it, and a later read reopens the file (checking that its
 * size has not changed), so a loader can hold many files but keep only one handle open.
 */
export class SafetensorsFile {
  readonly path: string;
  readonly metadata: Readonly<Record<string, string>>;
  readonly #size: number;
  readonly #tensors: Map<string, TensorInfo>;
  #file: Deno.FsFile | undefined;
  /** Reads are seek + read on one handle, so they run one at a time through this chain. */
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(
    path: string,
    size: number,
    metadata: Record<string, string>,
    tensors: TensorInfo[],
    file: Deno.FsFile,
  ) {
    this.path = path;
    this.#size = size;
    this.metadata = metadata;
    this.#tensors = new Map(tensors.map((t) => [t.name, t]));
    this.#file = file;
  }

  /** Opens `path` and reads and checks its header (not the tensor data). */
  static async open(path: string): Promise<SafetensorsFile> {
    const file = await openForReading(path);
    try {
      const size = (await file.stat()).size;
      if (size < 8) {
        throw fileError(
          path,
          `only ${size} bytes long; a safetensors file starts with an 8-byte header length (truncated, or not safetensors)`,
        );
      }
      const lengthBytes = await readExactly(file, path, 0, 8, "the header length");
      const headerLength = new DataView(lengthBytes.buffer).getBigUint64(0, true);
      if (headerLength > BigInt(size - 8)) {
        throw fileError(
          path,
          `the header length ${headerLength} runs past the end of the file (${size} bytes): truncated, or not safetensors`,
        );
      }
      if (headerLength > BigInt(MAX_HEADER_BYTES)) {
        throw fileError(
          path,
          `the header length ${headerLength} exceeds the ${MAX_HEADER_BYTES}-byte limit`,
        );
      }
      const n = Number(headerLength);
      const header = await readExactly(file, path, 8, n, "the header");
      const { metadata, tensors } = parseHeader(path, header, 8 + n, size - 8 - n);
      return new SafetensorsFile(path, size, metadata, tensors, file);
    } catch (error) {
      file.close();
      throw error;
    }
  }

  /** Tensor names in file order. */
  names(): string[] {
    return [...this.#tensors.keys()];
  }

  has(name: string): boolean {
    return this.#tensors.has(name);
  }

  /** Where `name` lives; throws naming the file, the key and the closest keys when missing. */
  info(name: string): TensorInfo {
    const info = this.#tensors.get(name);
    if (!info) {
      throw fileError(
        this.path,
        `no tensor "${name}". ${closeNamesHint(name, this.#tensors.keys())}`,
      );
    }
    return info;
  }

  /** The tensor's raw little-endian bytes (a fresh buffer, only this tensor's bytes are read). */
  async readBytes(name: string): Promise<Uint8Array> {
    return await this.readRange(name, 0, this.info(name).byteLength);
  }

  /**
   * `byteLength` bytes of the tensor's data from `byteOffset` (relative to the tensor's first
   * byte) in a fresh buffer, so a large tensor such as an embedding table can be streamed in
   * pieces. Throws when the range does not lie inside the tensor.
   */
  async readRange(name: string, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    const info = this.info(name);
    if (
      !Number.isSafeInteger(byteOffset) || !Number.isSafeInteger(byteLength) || byteOffset < 0 ||
      byteLength < 0 || byteOffset + byteLength > info.byteLength
    ) {
      throw fileError(
        this.path,
        `tensor "${name}" holds ${info.byteLength} bytes; the range of ${byteLength} bytes ` +
          `from byte ${byteOffset} is not inside it (offset and length must be non-negative ` +
          "integers with offset + length <= the tensor's byte length)",
      );
    }
    const where = byteOffset === 0 && byteLength === info.byteLength
      ? `tensor "${name}"`
      : `bytes [${byteOffset}, ${byteOffset + byteLength}) of tensor "${name}"`;
    const read = this.#queue.then(async () =>
      readExactly(await this.#handle(), this.path, info.byteOffset + byteOffset, byteLength, where)
    );
    this.#queue = read.catch(() => undefined);
    return await read;
  }

  /**
   * The tensor as f32: exact for F32/F16/BF16, rounded to nearest for F64 and integers. With
   * `into` (at least as long as the tensor) the values are decoded into its start and that
   * subarray is returned, so a loader can reuse one scratch array for many tensors.
   */
  async readF32(name: string, into?: Float32Array): Promise<Float32Array> {
    const { dtype } = this.info(name);
    const bytes = await this.readBytes(name);
    try {
      return decodeF32(bytes, dtype, into);
    } catch (error) {
      throw fileError(this.path, `tensor "${name}": ${(error as Error).message}`);
    }
  }

  /** The values of an integer (I64/I32/I16/I8/U8/BOOL) tensor, e.g. token ids. */
  async readIntegers(name: string): Promise<number[]> {
    const { dtype } = this.info(name);
    if (!INTEGER_DTYPES.has(dtype)) {
      throw fileError(
        this.path,
        `tensor "${name}" is ${dtype}, not an integer dtype; read it with readF32`,
      );
    }
    const bytes = await this.readBytes(name);
    try {
      return decodeIntegers(bytes, dtype);
    } catch (error) {
      throw fileError(this.path, `tensor "${name}": ${(error as Error).message}`);
    }
  }

  /** Releases the OS file handle; later reads reopen it. Wait for pending reads first. */
  close(): void {
    this.#file?.close();
    this.#file = undefined;
  }

  async #handle(): Promise<Deno.FsFile> {
    if (this.#file) return this.#file;
    const file = await openForReading(this.path);
    const size = (await file.stat()).size;
    if (size !== this.#size) {
      file.close();
      throw fileError(
        this.path,
        `the file changed size (${this.#size} -> ${size} bytes) since its header was read; open it again`,
      );
    }
    this.#file = file;
    return file;
  }
}

/** The header bytes (length prefix, JSON padded with spaces to a multiple of 8) for `tensors`. */
function encodeHeader(
  path: string,
  tensors: readonly TensorToWrite[],
  metadata: Record<string, string> | undefined,
): Uint8Array<ArrayBuffer> {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = checkMetadata(path, metadata);
  let offset = 0;
  for (const { name, dtype, shape, data } of tensors) {
    const where = `tensor "${name}"`;
    if (name === "" || name === "__metadata__" || Object.hasOwn(header, name)) {
      throw fileError(path, `${where}: names must be non-empty, unique and not "__metadata__"`);
    }
    if (!isSafeDType(dtype)) {
      throw fileError(path, `${where} has unknown dtype ${JSON.stringify(dtype)}`);
    }
    if (!isShape(shape)) {
      throw fileError(
        path,
        `${where}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`,
      );
    }
    const mismatch = dataTypeMismatch(data, dtype);
    if (mismatch) throw fileError(path, `${where}: ${mismatch}`);
    const byteLength = elementCount(shape) * DTYPE_BYTES[dtype];
    if (data.byteLength !== byteLength) {
      throw fileError(
        path,
        `${where}: shape [${shape}] of ${dtype} needs ${byteLength} bytes, but its data has ${data.byteLength}`,
      );
    }
    header[name] = { dtype, shape, data_offsets: [offset, offset + byteLength] };
    offset += byteLength;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const paddedLength = Math.ceil(json.byteLength / 8) * 8;
  const bytes = new Uint8Array(8 + paddedLength).fill(0x20, 8 + json.byteLength);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(paddedLength), true);
  bytes.set(json, 8);
  return bytes;
}

/**
 * A whole safetensors file in memory: for small outputs sent elsewhere than a file (a server's
 * response). `where` names the destination in errors.
 */
export function safetensorsBytes(
  where: string,
  tensors: readonly TensorToWrite[],
  metadata?: Record<string, string>,
): Uint8Array<ArrayBuffer> {
  const header = encodeHeader(where, tensors, metadata);
  const parts = tensors.map(({ data, dtype }) => encodeLittleEndian(data, dtype));
  const bytes = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, header.byteLength));
  bytes.set(header);
  let offset = header.byteLength;
  for (const part of parts) {
    bytes.set(part, offset);
    offset += part.byteLength;
  }
  return bytes;
}

/**
 * Writes `tensors` (packed in the given order) and optional string `metadata` to `path`
 * atomically: everything is checked first, then written to a temp file beside `path` that is
 * renamed over it only once complete.
 */
export async function writeSafetensors(
  path: string,
  tensors: readonly TensorToWrite[],
  metadata?: Record<string, string>,
): Promise<void> {
  const header = encodeHeader(path, tensors, metadata);
  await writeAtomic(path, async (file) => {
    await writeAll(file, header);
    for (const { data, dtype } of tensors) await writeAll(file, encodeLittleEndian(data, dtype));
  });
}
