/**
 * The op test harness, in the style of ggml's test-backend-ops: each case names an op, a shape
 * and a dtype, draws its inputs from a seed derived from that name, runs the GPU op and compares
 * every output with the TypeScript reference by NMSE. Ops with a backward also get a case that
 * checks the float64 backward reference against central differences of the forward reference.
 * The GPU is whichever adapter `DENO_WEBGPU_BACKEND` selects; failures name it.
 */
import assert from "node:assert/strict";
import type { Gpu, GpuFeatures, HostArray } from "../../src/gpu/device.ts";
import type { DType, Tensor } from "../../src/gpu/tensor.ts";
import { Rng } from "../../src/util/rng.ts";
import { assertNmse, randn } from "../helpers.ts";
import { dot, numericGrad } from "./finite_diff.ts";

/** FNV-1a of a string: a seed that depends on nothing but the case's own name. */
function nameSeed(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 8;
}

/** A case's random inputs: draw k is seeded by the hash of "name#k", never by other cases. */
export class Draw {
  #draws = 0;

  constructor(readonly name: string) {}

  #nextSeed(): number {
    return nameSeed(`${this.name}#${this.#draws++}`);
  }

  /** n normal samples with standard deviation `std`. */
  randn(n: number, std = 1): Float32Array {
    return randn(n, this.#nextSeed(), std);
  }

  /** A generator for other distributions (masks, ids). */
  rng(): Rng {
    return new Rng(this.#nextSeed());
  }
}

/** Tensors a case uploads or creates; all destroyed when the case ends, whatever happens. */
export class Scope {
  readonly #tensors: Tensor[] = [];

  constructor(readonly gpu: Gpu) {}

  upload(data: HostArray, shape: readonly number[], dtype: DType, name: string): Tensor {
    return this.own(this.gpu.upload(data, shape, dtype, name));
  }

  /** Takes ownership of `t` (an op's output) and returns it. */
  own<T extends Tensor | undefined>(t: T): T {
    if (t) this.#tensors.push(t);
    return t;
  }

  destroy(): void {
    for (const t of new Set(this.#tensors)) t.destroy();
  }
}

/** One op run on the GPU and checked against its reference. H: the host inputs. */
export interface GpuCase<H> {
  /** `op variant shape dtype`, e.g. `matmul nt 33x65x17 f32`: the test's name and its seed. */
  name: string;
  /** An optional adapter feature the case needs; without it the test is ignored, saying why. */
  needs?: keyof GpuFeatures;
  /** Why the case is ignored on OpenGL (DENO_WEBGPU_BACKEND=gl), if it is. */
  glIgnore?: string;
  /** Host inputs, drawn from the case's own stream. */
  inputs(draw: Draw): H;
  /** Uploads the inputs (through `scope`), records the op and returns its outputs by name. */
  gpu(scope: Scope, host: H): Record<string, Tensor>;
  /** The TypeScript reference of each output compared by NMSE. */
  reference(host: H): Record<string, ArrayLike<number>>;
  /** NMSE bound for every reference output, or per name (one left out is for `check` alone). */
  nmse: number | Record<string, number>;
  /** [output, other]: output must equal other bit for bit (a variant entry, a repeat run). */
  same?: Array<[string, string]>;
  /** Outputs that must be exactly 0 wherever their reference is (masked keys, padding). */
  exactZeros?: string[];
  /** Further assertions on the values read back. */
  check?(
    got: Record<string, Float32Array>,
    host: H,
    expected: Record<string, ArrayLike<number>>,
  ): void;
}

/** A float64 backward reference checked against central differences of its forward. */
export interface FiniteDiffCase<H> {
  /** `op backward shape f64 fd`. */
  name: string;
  /** Host inputs, drawn from the case's own stream (small: each element costs two forwards). */
  inputs(draw: Draw): H;
  /** The input arrays to differentiate with respect to. */
  wrt: ReadonlyArray<keyof H & string>;
  /** The forward reference; the loss is dot(dOut, forward). */
  forward(host: H): ArrayLike<number>;
  /** The backward reference: gradient of that loss with respect to each `wrt` input. */
  backward(host: H, dOut: Float32Array): Record<string, ArrayLike<number>>;
  /** Step of the central differences (default 1e-6). */
  h?: number;
  /** NMSE bound (default 1e-14). */
  nmse?: number;
}

/** A registered check: its type parameter erased, ready for Deno.test. */
export interface OpCheck {
  name: string;
  needs?: keyof GpuFeatures;
  glIgnore?: string;
  /** Whether it runs on the GPU (its failures then name the adapter). */
  onGpu: boolean;
  run(gpu: Gpu): Promise<void> | void;
}

/** WebGPU's names of the optional features, for the reason a case is ignored. */
const FEATURE_NAMES: Record<keyof GpuFeatures, string> = {
  f16: "shader-f16",
  timestampQuery: "timestamp-query",
  subgroups: "subgroups",
};

export function gpuCase<H>(c: GpuCase<H>): OpCheck {
  return {
    name: c.name,
    needs: c.needs,
    glIgnore: c.glIgnore,
    onGpu: true,
    async run(gpu) {
      const scope = new Scope(gpu);
      try {
        const host = c.inputs(new Draw(c.name));
        const outputs = c.gpu(scope, host);
        for (const t of Object.values(outputs)) scope.own(t);
        const names = Object.keys(outputs);
        const read = await gpu.readAll(names.map((n) => outputs[n])) as Float32Array[];
        const got = Object.fromEntries(names.map((n, i) => [n, read[i]]));
        const expected = c.reference(host);
        for (const [name, values] of Object.entries(expected)) {
          assert.ok(got[name], `${c.name}: the GPU gave no output '${name}'`);
          const bound = typeof c.nmse === "number" ? c.nmse : c.nmse[name];
          if (bound !== undefined) assertNmse(values, got[name], bound, name);
        }
        for (const [name, other] of c.same ?? []) {
          assert.deepEqual(got[name], got[other], `${name} must equal ${other} bit for bit`);
        }
        for (const name of c.exactZeros ?? []) {
          assert.ok(expected[name], `exactZeros names '${name}', which has no reference`);
          for (let i = 0; i < got[name].length; i++) {
            if (expected[name][i] === 0 && got[name][i] !== 0) {
              assert.fail(`${name}[${i}] = ${got[name][i]} where the reference is exactly 0`);
            }
          }
        }
        c.check?.(got, host, expected);
      } finally {
        scope.destroy();
      }
    },
  };
}

export function finiteDiffCase<H>(c: FiniteDiffCase<H>): OpCheck {
  return {
    name: c.name,
    onGpu: false,
    run() {
      const host = c.inputs(new Draw(c.name));
      const dOut = new Draw(`${c.name} dOut`).randn(c.forward(host).length);
      const grads = c.backward(host, dOut);
      for (const name of c.wrt) {
        const loss = (x: Float64Array) => dot(dOut, c.forward({ ...host, [name]: x }));
        const numeric = numericGrad(loss, host[name] as ArrayLike<number>, c.h);
        assertNmse(numeric, grads[name], c.nmse ?? 1e-14, `d${name}`);
      }
    },
  };
}

function describeAdapter(gpu: Gpu): string {
  const { vendor, architecture, device, description } = gpu.adapterInfo;
  const backend = Deno.env.get("DENO_WEBGPU_BACKEND") ?? "unset";
  return `adapter: ${description || "unnamed"} (vendor ${vendor}, device ${device}, ` +
    `architecture ${architecture || "-"}; DENO_WEBGPU_BACKEND ${backend})`;
}

/** Registers one Deno.test per check, named by the check; failures name the adapter. */
export function registerOpChecks(gpu: Gpu, checks: OpCheck[]): void {
  const seen = new Set<string>();
  for (const check of checks) {
    assert.ok(!seen.has(check.name), `two op checks are named '${check.name}'`);
    seen.add(check.name);
    // DISTILL_DISABLE (see testGpu) turns a feature off as if the adapter lacked it.
    const missing = check.needs && !gpu.features[check.needs];
    const onGl = Deno.env.get("DENO_WEBGPU_BACKEND") === "gl";
    const reason = missing
      ? `ignored: ${FEATURE_NAMES[check.needs!]} missing or disabled`
      : onGl && check.glIgnore
      ? `ignored on OpenGL: ${check.glIgnore}`
      : undefined;
    Deno.test({
      name: reason ? `${check.name} (${reason})` : check.name,
      ignore: Boolean(reason),
      async fn() {
        try {
          await check.run(gpu);
        } catch (error) {
          if (!check.onGpu) throw error;
          const message = error instanceof Error ? error.message : String(error);
          throw new Error(`${check.name}: ${message}\n${describeAdapter(gpu)}`, { cause: error });
        }
      },
    });
  }
}
