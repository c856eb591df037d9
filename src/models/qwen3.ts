/**
 * The student's encoder: a Qwen3 decoder stack run to its final-norm hidden state
 * (SPEC section 3), with frozen NF4 (or f32) linears and optional LoRA on any of them.
 */
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { attention } from "../ops/attention.ts";
import { add, addInPlace, scale } from "../ops/elementwise.ts";
import { embeddingGather } from "../ops/embedding.ts";
import { matmul } from "../ops/matmul.ts";
import { nf4Matmul } from "../ops/nf4_matmul.ts";
import { rmsNorm } from "../ops/norm.ts";
import { rope, type RopeTable, ropeTable } from "../ops/rope.ts";
import { swiglu } from "../ops/activation.ts";
import { type LinearName, type LoraAdapter, loraSlot } from "./lora.ts";
import type { FrozenLinear, Qwen3Layer, Qwen3Weights } from "./qwen3_weights.ts";

/** A right-padded batch of token ids. */
export interface TokenBatch {
  /** [batch * seqLen], row-major, padding after each sequence's `lengths[b]` tokens. */
  ids: Int32Array;
  lengths: readonly number[];
  batch: number;
  seqLen: number;
}

export interface Qwen3ForwardOptions {
  lora?: LoraAdapter;
  /**
   * Stop after this decoder layer (0-based) and return its raw output, without the final
   * norm; e.g. numLayers - 2 for the penultimate layer. Default: all layers, then the norm.
   */
  stopAfterLayer?: number;
}

/** Per-batch tensors every layer reads. */
export interface Qwen3Context {
  batch: TokenBatch;
  rope: RopeTable;
  keyLengths: Tensor;
}

const ropeTables = new WeakMap<Qwen3Weights, RopeTable>();

/** Uploads what a batch needs once (each upload submits pending work). */
export function qwen3Context(gpu: Gpu, w: Qwen3Weights, batch: TokenBatch): Qwen3Context {
  checkBatch(w, batch);
  let table = ropeTables.get(w);
  if (!table || table.maxPositions < batch.seqLen) {
    table?.cosSin.destroy();
    table = ropeTable(gpu, {
      headDim: w.config.headDim,
      theta: w.config.ropeTheta,
      maxPositions: Math.max(256, batch.seqLen),
    });
    ropeTables.set(w, table);
  }
  const keyLengths = gpu.upload(Int32Array.from(batch.lengths), [batch.batch], "i32", "lengths");
  return { batch, rope: table, keyLengths };
}

function checkBatch(w: Qwen3Weights, b: TokenBatch): void {
  if (b.ids.length !== b.batch * b.seqLen || b.lengths.length !== b.batch) {
    throw new Error(
      `token batch: ${b.ids.length} ids and ${b.lengths.length} lengths for ` +
        `batch ${b.batch} x ${b.seqLen}`,
    );
  }
  for (const len of b.lengths) {
    if (!Number.isInteger(len) || len < 1 || len > b.seqLen) {
      throw new Error(`token batch: length ${len} outside 1..${b.seqLen}`);
    }
  }
}

/** y = x Wᵀ through a frozen linear, plus scaling · (x Aᵀ) Bᵀ when it has a LoRA pair. */
export function frozenLinear(
  gpu: Gpu,
  x: Tensor,
  linear: FrozenLinear,
  lora?: LoraAdapter,
  slot?: string,
): Tensor {
  const y = linear.kind === "nf4" ? nf4Matmul(gpu, x, linear.weight) : matmul(gpu, x, linear.weight);
  const pair = lora && slot ? lora.pairs.get(slot) : undefined;
  if (pair) {
    const down = matmul(gpu, x, pair.a);
    const up = matmul(gpu, down, pair.b);
    const scaled = scale(gpu, up, lora!.scaling);
    addInPlace(gpu, y, scaled);
    for (const t of [down, up, scaled]) t.destroy();
  }
  return y;
}

/** One decoder layer; returns the new residual stream and leaves `x` untouched. */
export function qwen3Layer(
  gpu: Gpu,
  w: Qwen3Weights,
  index: number,
  x: Tensor,
  ctx: Qwen3Context,
  lora?: LoraAdapter,
): Tensor {
  const c = w.config;
  const layer: Qwen3Layer = w.layers[index];
  const lin = (input: Tensor, name: LinearName) =>
    frozenLinear(gpu, input, layer.linears[name], lora, loraSlot(index, name));
  const { batch, seqLen } = ctx.batch;

  const h = rmsNorm(gpu, x, layer.inputNorm, c.rmsNormEps);
  const q = lin(h, "q_proj");
  const k = lin(h, "k_proj");
  const v = lin(h, "v_proj");
  h.destroy();
  const qn = rmsNorm(gpu, q, layer.qNorm, c.rmsNormEps);
  const kn = rmsNorm(gpu, k, layer.kNorm, c.rmsNormEps);
  q.destroy();
  k.destroy();
  rope(gpu, qn, ctx.rope, { heads: c.numHeads, seqLen, out: qn });
  rope(gpu, kn, ctx.rope, { heads: c.numKvHeads, seqLen, out: kn });
  const a = attention(
    gpu,
    qn.reshape([batch, seqLen, c.numHeads * c.headDim]),
    kn.reshape([batch, seqLen, c.numKvHeads * c.headDim]),
    v.reshape([batch, seqLen, c.numKvHeads * c.headDim]),
    { numHeads: c.numHeads, numKvHeads: c.numKvHeads, causal: true, keyLengths: ctx.keyLengths },
  );
  for (const t of [qn, kn, v]) t.destroy();
  const attnOut = lin(a.reshape([batch * seqLen, c.numHeads * c.headDim]), "o_proj");
  a.destroy();
  const x1 = add(gpu, x, attnOut);
  attnOut.destroy();

  const h2 = rmsNorm(gpu, x1, layer.postNorm, c.rmsNormEps);
  const gate = lin(h2, "gate_proj");
  const up = lin(h2, "up_proj");
  h2.destroy();
  const m = swiglu(gpu, gate, up);
  gate.destroy();
  up.destroy();
  const down = lin(m, "down_proj");
  m.destroy();
  addInPlace(gpu, x1, down);
  down.destroy();
  return x1;
}

/**
 * The last hidden state [batch * seqLen, hidden] (rows at padded positions carry no
 * meaning), or the raw output of layer `stopAfterLayer`.
 */
export function qwen3Forward(
  gpu: Gpu,
  w: Qwen3Weights,
  batch: TokenBatch,
  options: Qwen3ForwardOptions = {},
): Tensor {
  const c = w.config;
  const last = options.stopAfterLayer ?? c.numLayers - 1;
  if (!Number.isInteger(last) || last < 0 || last >= c.numLayers) {
    throw new Error(`stopAfterLayer ${last} outside 0..${c.numLayers - 1}`);
  }
  const ctx = qwen3Context(gpu, w, batch);
  let x = embeddingGather(gpu, w.embed, batch.ids);
  for (let i = 0; i <= last; i++) {
    const next = qwen3Layer(gpu, w, i, x, ctx, options.lora);
    x.destroy();
    x = next;
  }
  ctx.keyLengths.destroy();
  if (options.stopAfterLayer !== undefined) return x;
  const out = rmsNorm(gpu, x, w.norm, c.rmsNormEps);
  x.destroy();
  return out;
}
