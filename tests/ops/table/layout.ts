/** Layout copies (concat, split, concatRows, meanOverSequence), embeddingGather and rope. */
import assert from "node:assert/strict";
import type { DType, Tensor } from "../../../src/gpu/tensor.ts";
import {
  bf16ArrayToF32,
  f16ArrayToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
} from "../../../src/io/dtype.ts";
import { embeddingGather } from "../../../src/ops/embedding.ts";
import { embeddingGatherRef } from "../../../src/ops/embedding_ref.ts";
import {
  concatLastAxis,
  concatRows,
  concatRowsBackward,
  meanOverSequence,
  meanOverSequenceBackward,
  splitLastAxis,
} from "../../../src/ops/layout.ts";
import {
  concatLastAxisRef,
  concatRowsBackwardRef,
  concatRowsRef,
  meanOverSequenceBackwardRef,
  meanOverSequenceRef,
  splitLastAxisRef,
} from "../../../src/ops/layout_ref.ts";
import {
  rope,
  ropeAngle,
  type RopeAngles,
  ropeBackward,
  ropeInvFreq,
  ropeTable,
} from "../../../src/ops/rope.ts";
import { ropeBackwardRef, ropeRef } from "../../../src/ops/rope_ref.ts";
import { type Draw, finiteDiffCase, gpuCase, type OpCheck } from "../harness.ts";

/** a [..., da] and b [..., db] joined on the last axis, then split back into `sizes`. */
function concatSplitCase(lead: number[], da: number, db: number, sizes: number[]): OpCheck {
  const rows = lead.reduce((x, y) => x * y, 1);
  const nonEmpty = sizes.map((n, i) => [n, i]).filter(([n]) => n > 0).map(([, i]) => i);
  return gpuCase<{ a: Float32Array; b: Float32Array }>({
    name: `concatLastAxis splitLastAxis ${lead.join("x")}x(${da}+${db}) f32`,
    inputs: (draw) => ({ a: draw.randn(rows * da), b: draw.randn(rows * db) }),
    gpu(scope, h) {
      const a = scope.upload(h.a, [...lead, da], "f32", "a");
      const b = scope.upload(h.b, [...lead, db], "f32", "b");
      const cat = concatLastAxis(scope.gpu, a, b);
      assert.deepEqual(cat.shape, [...lead, da + db]);
      const parts = splitLastAxis(scope.gpu, cat, sizes).map((p) => scope.own(p));
      assert.deepEqual(parts.map((p) => p.shape), sizes.map((n) => [...lead, n]));
      return { cat, ...Object.fromEntries(nonEmpty.map((i) => [`part${i}`, parts[i]])) };
    },
    reference(h) {
      const cat = concatLastAxisRef(h.a, da, h.b, db);
      const parts = splitLastAxisRef(cat, sizes);
      return { cat, ...Object.fromEntries(nonEmpty.map((i) => [`part${i}`, parts[i]])) };
    },
    nmse: 1e-14,
  });
}

/** [B, Ta, D] rows then b's rows: per batch row ([B, Tb, D]) or b shared ([1, Tb, D] or [Tb, D]). */
function concatRowsCases(batch: number, ta: number, tb: number, dim: number): OpCheck[] {
  const bShapes: Array<[string, number[]]> = [
    ["per-row", [batch, tb, dim]],
    ["shared3d", [1, tb, dim]],
    ["shared2d", [tb, dim]],
  ];
  // A 2-D a makes a 2-D result; only the shared 2-D b goes with it.
  const flat: Array<[string, number[], number[]]> = [["2d", [ta, dim], [tb, dim]]];
  const variants = [
    ...bShapes.map(([what, b]): [string, number[], number[]] => [what, [batch, ta, dim], b]),
    ...flat,
  ];
  return variants.flatMap(([what, aShape, bShape]) => {
    const bRows = bShape.length === 3 ? bShape[0] : 1;
    const shared = bShape.length === 2 || bShape[0] === 1 && batch > 1;
    const rows = aShape.length === 3 ? batch : 1;
    const name = `${rows}x(${ta}+${tb})x${dim} ${what} f32`;
    const inputs = (draw: Draw) => ({
      a: draw.randn(rows * ta * dim),
      b: draw.randn(bRows * tb * dim),
      dOut: draw.randn(rows * (ta + tb) * dim),
    });
    return [
      gpuCase({
        name: `concatRows ${name}`,
        inputs,
        gpu: (scope, h) => ({
          y: concatRows(
            scope.gpu,
            scope.upload(h.a, aShape, "f32", "a"),
            scope.upload(h.b, bShape, "f32", "b"),
          ),
        }),
        reference: (h) => ({ y: concatRowsRef(h.a, h.b, rows, ta, tb, dim, shared) }),
        nmse: 1e-14,
      }),
      gpuCase({
        name: `concatRowsBackward ${name}`,
        inputs,
        gpu(scope, h) {
          const dOut = scope.upload(h.dOut, [...aShape.slice(0, -2), ta + tb, dim], "f32", "dOut");
          const grads = concatRowsBackward(scope.gpu, dOut, aShape, bShape);
          assert.deepEqual(grads.da.shape, aShape);
          assert.deepEqual(grads.db.shape, bShape);
          return { ...grads };
        },
        reference: (h) => concatRowsBackwardRef(h.dOut, rows, ta, tb, dim, shared),
        // The shared b's gradient is an f32 sum over the batch.
        nmse: { da: 1e-14, db: 1e-12 },
      }),
    ];
  });
}

/** Masked means with host and tensor lengths (0 included), or the plain mean over T. */
function meanOverSequenceCases(
  batch: number,
  t: number,
  dim: number,
  lengths?: number[],
): OpCheck[] {
  const name = `${batch}x${t}x${dim}${lengths ? ` lengths${lengths.join(",")}` : ""} f32`;
  const inputs = (draw: Draw) => ({ x: draw.randn(batch * t * dim), dy: draw.randn(batch * dim) });
  return [
    gpuCase({
      name: `meanOverSequence ${name}`,
      inputs,
      gpu(scope, h): Record<string, Tensor> {
        const x = scope.upload(h.x, [batch, t, dim], "f32", "x");
        if (!lengths) return { y: meanOverSequence(scope.gpu, x) };
        const tensor = scope.upload(Uint32Array.from(lengths), [batch], "u32", "lengths");
        return {
          y: meanOverSequence(scope.gpu, x, lengths),
          fromTensor: meanOverSequence(scope.gpu, x, tensor),
        };
      },
      reference: (h) => ({ y: meanOverSequenceRef(h.x, batch, t, dim, lengths) }),
      nmse: 1e-12,
      same: lengths ? [["fromTensor", "y"]] : [],
    }),
    gpuCase({
      name: `meanOverSequenceBackward ${name}`,
      inputs,
      gpu(scope, h): Record<string, Tensor> {
        const dy = scope.upload(h.dy, [batch, dim], "f32", "dy");
        if (!lengths) return { dx: meanOverSequenceBackward(scope.gpu, dy, t) };
        const tensor = scope.upload(Int32Array.from(lengths), [batch], "i32", "lengths");
        return {
          dx: meanOverSequenceBackward(scope.gpu, dy, t, lengths),
          fromTensor: meanOverSequenceBackward(scope.gpu, dy, t, tensor),
        };
      },
      reference: (h) => ({ dx: meanOverSequenceBackwardRef(h.dy, batch, t, dim, lengths) }),
      nmse: 1e-12,
      same: lengths ? [["fromTensor", "dx"]] : [],
      // Padded rows get exactly 0.
      exactZeros: ["dx"],
    }),
  ];
}

/** A [vocab, dim] table of the given dtype (as stored, and widened to f32) and the ids. */
interface EmbeddingHost {
  bits: Float32Array | Uint16Array;
  values: Float32Array;
  ids: number[];
}

/** Every row once (so every window boundary is crossed), then `extra` random repeats. */
function embeddingInputs(vocab: number, dim: number, dtype: DType, extra: number) {
  return (draw: Draw): EmbeddingHost => {
    const x = draw.randn(vocab * dim);
    const rng = draw.rng();
    const ids = rng.permutation(vocab);
    for (let i = 0; i < extra; i++) ids.push(Math.floor(rng.next() * vocab));
    if (dtype === "f32") return { bits: x, values: x, ids };
    const bits = dtype === "f16" ? f32ArrayToF16(x) : f32ArrayToBf16(x);
    return { bits, values: dtype === "f16" ? f16ArrayToF32(bits) : bf16ArrayToF32(bits), ids };
  };
}

/** Gathers through windows of at most `maxWindowBytes` of the table (undefined: whole). */
function embeddingCase(vocab: number, dim: number, dtype: DType, maxWindowBytes?: number) {
  const windows = maxWindowBytes ? ` window${maxWindowBytes}` : "";
  return gpuCase<EmbeddingHost>({
    name: `embeddingGather ${vocab}x${dim}${windows} ${dtype}`,
    inputs: embeddingInputs(vocab, dim, dtype, maxWindowBytes ? 53 : 0),
    gpu(scope, h) {
      const table = scope.upload(h.bits, [vocab, dim], dtype, "table");
      const before = scope.gpu.stats.dispatches;
      const y = embeddingGather(scope.gpu, table, Int32Array.from(h.ids), { maxWindowBytes });
      if (maxWindowBytes) assert.ok(scope.gpu.stats.dispatches - before > 10, "many windows");
      assert.deepEqual(y.shape, [h.ids.length, dim]);
      return { y };
    },
    reference: (h) => ({ y: embeddingGatherRef(h.values, dim, h.ids) }),
    nmse: 1e-14,
  });
}

/** Ids from a tensor: out-of-range ones cannot be checked on the host and give zero rows. */
const embeddingIdTensorCase = gpuCase<EmbeddingHost>({
  name: "embeddingGather 1000x38 id-tensor-3x4 bf16",
  inputs: (draw) => ({
    ...embeddingInputs(1000, 38, "bf16", 0)(draw),
    ids: [5, 999, 0, 17, -1, 1000, 3, 999, 42, 7, 1, 2],
  }),
  gpu(scope, h) {
    const table = scope.upload(h.bits, [1000, 38], "bf16", "table");
    const ids = scope.upload(Int32Array.from(h.ids), [3, 4], "i32", "ids");
    const y = embeddingGather(scope.gpu, table, ids, { maxWindowBytes: 4096 });
    assert.deepEqual(y.shape, [3, 4, 38]);
    return { y };
  },
  reference(h) {
    const expected = embeddingGatherRef(h.values, 38, h.ids.map((id) => Math.max(0, id)));
    for (const bad of [4, 5]) expected.fill(0, bad * 38, (bad + 1) * 38);
    return { y: expected };
  },
  nmse: 1e-14,
});

interface RopeSpec {
  batch: number;
  t: number;
  heads: number;
  hd: number;
  theta: number;
  angles: RopeAngles;
  /** Explicit (shuffled) positions instead of t % seqLen, applied in place. */
  positions?: number[];
}

function angleOf(s: RopeSpec) {
  const invFreq = ropeInvFreq(s.hd, s.theta, s.angles);
  return (pos: number, i: number) => ropeAngle(pos, invFreq[i], s.angles);
}

function positionsOf(s: RopeSpec): number[] {
  return s.positions ?? Array.from({ length: s.batch * s.t }, (_, k) => k % s.t);
}

function ropeCase(op: "rope" | "ropeBackward", s: RopeSpec): OpCheck {
  const { batch, t, heads, hd } = s;
  const how = s.positions ? "positions in-place" : "";
  const forward = op === "rope";
  return gpuCase<{ x: Float32Array }>({
    name: [op, `${batch}x${t}x${heads}x${hd}`, `theta${s.theta}`, s.angles, how, "f32"]
      .filter(Boolean).join(" "),
    inputs: (draw) => ({ x: draw.randn(batch * t * heads * hd) }),
    gpu(scope, h): Record<string, Tensor> {
      const maxPositions = Math.max(t, ...positionsOf(s)) + 2;
      const table = ropeTable(scope.gpu, {
        headDim: hd,
        theta: s.theta,
        maxPositions,
        angles: s.angles,
      });
      scope.own(table.cosSin);
      const apply = forward ? rope : ropeBackward;
      if (s.positions) {
        // A 4-D [B, T, heads, hd] tensor rotated in place.
        const x = scope.upload(h.x, [batch, t, heads, hd], "f32", "x");
        const positions = scope.upload(Int32Array.from(s.positions), [t], "i32", "positions");
        assert.equal(apply(scope.gpu, x, table, { heads, positions, out: x }), x);
        return { y: x };
      }
      // [B*T, heads*hd] as a projection produces it.
      const x = scope.upload(h.x, [batch * t, heads * hd], "f32", "x");
      const y = apply(scope.gpu, x, table, { heads, seqLen: t });
      if (forward) return { y };
      // Backward of the forward is the identity.
      const roundTrip = ropeBackward(
        scope.gpu,
        scope.own(rope(scope.gpu, x, table, { heads, seqLen: t })),
        table,
        {
          heads,
          seqLen: t,
        },
      );
      return { y, roundTrip };
    },
    reference: (h) => ({
      y: (forward ? ropeRef : ropeBackwardRef)(h.x, heads, hd, positionsOf(s), angleOf(s)),
      ...(forward || s.positions ? {} : { roundTrip: h.x }),
    }),
    nmse: 1e-12,
  });
}

const ROPE: RopeSpec[] = [
  { batch: 1, t: 1, heads: 1, hd: 2, theta: 1e4, angles: "transformers" },
  { batch: 3, t: 7, heads: 5, hd: 24, theta: 1e4, angles: "transformers" },
  { batch: 2, t: 13, heads: 3, hd: 128, theta: 1e6, angles: "transformers" },
  { batch: 1, t: 257, heads: 1, hd: 128, theta: 1e6, angles: "float64" },
  {
    batch: 1,
    t: 9,
    heads: 3,
    hd: 24,
    theta: 1e6,
    angles: "transformers",
    positions: [4, 0, 8, 1, 1, 7, 2, 11, 3],
  },
];

const ROPE_BACKWARD: RopeSpec[] = [
  { batch: 1, t: 1, heads: 1, hd: 2, theta: 1e4, angles: "transformers" },
  { batch: 3, t: 7, heads: 5, hd: 24, theta: 1e6, angles: "transformers" },
  {
    batch: 1,
    t: 7,
    heads: 5,
    hd: 24,
    theta: 1e6,
    angles: "transformers",
    positions: [4, 0, 8, 1, 1, 7, 2],
  },
];

const ropeFiniteDiffSpec: RopeSpec = {
  batch: 1,
  t: 3,
  heads: 2,
  hd: 6,
  theta: 1e4,
  angles: "float64",
  positions: [2, 0, 5],
};

export const LAYOUT_CHECKS: OpCheck[] = [
  concatSplitCase([1], 1, 1, [1, 0, 1]),
  concatSplitCase([3, 11], 37, 53, [29, 5, 0, 56]),
  // SDXL prompt_embeds: penultimate states of CLIP-L [77, 768] and bigG [77, 1280].
  concatSplitCase([77], 768, 1280, [768, 1280]),
  ...concatRowsCases(3, 11, 7, 37),
  ...concatRowsCases(5, 1, 3, 65),
  ...meanOverSequenceCases(3, 13, 37, [13, 5, 0]),
  // The resampler's pooled path: a plain mean over 77 latents.
  ...meanOverSequenceCases(2, 77, 33),
  ...meanOverSequenceCases(1, 1, 1),
  ...([false, true] as const).map((shared) =>
    finiteDiffCase<{ a: Float32Array; b: Float32Array }>({
      name: `concatRowsBackward 3x(4+2)x5 ${shared ? "shared3d" : "per-row"} f64 fd`,
      inputs: (draw) => ({ a: draw.randn(3 * 4 * 5), b: draw.randn((shared ? 1 : 3) * 2 * 5) }),
      wrt: ["a", "b"],
      forward: (h) => concatRowsRef(h.a, h.b, 3, 4, 2, 5, shared),
      backward(_, dOut) {
        const { da: a, db: b } = concatRowsBackwardRef(dOut, 3, 4, 2, 5, shared);
        return { a, b };
      },
    })
  ),
  ...[undefined, [6, 2, 0]].map((lengths) =>
    finiteDiffCase<{ x: Float32Array }>({
      name: `meanOverSequenceBackward 3x6x5${lengths ? " lengths6,2,0" : ""} f64 fd`,
      inputs: (draw) => ({ x: draw.randn(3 * 6 * 5) }),
      wrt: ["x"],
      forward: (h) => meanOverSequenceRef(h.x, 3, 6, 5, lengths),
      backward: (_, dy) => ({ x: meanOverSequenceBackwardRef(dy, 3, 6, 5, lengths) }),
    })
  ),
  embeddingCase(1, 1, "f32"),
  embeddingCase(7, 1, "f16"),
  embeddingCase(7, 3, "bf16"),
  // Position rows 0..76, the whole table.
  embeddingCase(77, 37, "f32"),
  ...([["f32", 37], ["bf16", 37], ["bf16", 38], ["f16", 37], ["f16", 38]] as const).map((
    [dtype, dim],
  ) => embeddingCase(301, dim, dtype, 2000)),
  embeddingIdTensorCase,
  ...ROPE.map((s) => ropeCase("rope", s)),
  ...ROPE_BACKWARD.map((s) => ropeCase("ropeBackward", s)),
  finiteDiffCase<{ x: Float32Array }>({
    name: "ropeBackward 1x3x2x6 theta10000 float64 positions f64 fd",
    inputs: (draw) => ({ x: draw.randn(3 * 2 * 6) }),
    wrt: ["x"],
    forward: (h) => ropeRef(h.x, 2, 6, ropeFiniteDiffSpec.positions!, angleOf(ropeFiniteDiffSpec)),
    backward: (_, dy) => ({
      x: ropeBackwardRef(dy, 2, 6, ropeFiniteDiffSpec.positions!, angleOf(ropeFiniteDiffSpec)),
    }),
  }),
];
