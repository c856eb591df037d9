/**
 * The student's encoder: a Qwen3 decoder stack run to its final-norm hidden state
 * (docs/numerics.md §3), with frozen NF4 (or f32) linears and optional LoRA on any of them.
 */
import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { attentionBackward, attentionWithStats } from "../ops/attention.ts";
import { add, addInPlace, dropout } from "../ops/elementwise.ts";
import { embeddingGather } from "../ops/embedding.ts";
import { matmul } from "../ops/matmul.ts";
import { nf4Matmul, nf4MatmulInputGrad } from "../ops/nf4_matmul.ts";
import { rmsNormBackward, rmsNormWithStats } from "../ops/norm.ts";
import { rope, ropeBackward, type RopeTable, ropeTable } from "../ops/rope.ts";
import { swiglu, swigluBackward } from "../ops/activation.ts";
import {
  type LinearName,
  type LoraAdapter,
  type LoraPair,
  loraSlot,
  QWEN3_LINEARS,
} from "./lora.ts";
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
  checkBatch(batch);
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

function checkBatch(b: TokenBatch): void {
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

/** Training-time settings: LoRA dropout is drawn from `seed` so a backward pass can redraw it. */
export interface TrainMode {
  dropoutSeed: number;
}

/** What a LoRA branch keeps for its backward: its (dropped-out) input and x Aᵀ. */
interface LoraActs {
  input: Tensor;
  down: Tensor;
  seed: number;
}

/** Everything a decoder layer's backward reads, recorded by its forward. */
export interface Qwen3LayerActs {
  rstd1: Tensor;
  h: Tensor;
  q: Tensor;
  rstdQ: Tensor;
  k: Tensor;
  rstdK: Tensor;
  qr: Tensor;
  kr: Tensor;
  v: Tensor;
  a: Tensor;
  lse: Tensor;
  x1: Tensor;
  rstd2: Tensor;
  h2: Tensor;
  gate: Tensor;
  up: Tensor;
  m: Tensor;
  lora: Map<LinearName, LoraActs>;
}

const LINEAR_INDEX: Record<LinearName, number> = Object.fromEntries(
  Object.keys(QWEN3_LINEARS).map((name, i) => [name, i]),
) as Record<LinearName, number>;

function dropoutSeed(train: TrainMode, layer: number, linear: LinearName): number {
  return (train.dropoutSeed + Math.imul(layer, 0x9e3779b1) +
    Math.imul(LINEAR_INDEX[linear] + 1, 0x85ebca6b)) >>>
    0;
}

/**
 * y = x Wᵀ through a frozen linear, plus scaling · (dropout(x) Aᵀ) Bᵀ when LoRA adapts it.
 * With `acts` the LoRA branch's intermediates are kept there for the backward pass.
 */
export function frozenLinear(
  gpu: Gpu,
  x: Tensor,
  linear: FrozenLinear,
  pair?: LoraPair,
  lora?: LoraAdapter,
  train?: { seed: number; acts: Map<LinearName, LoraActs>; name: LinearName },
): Tensor {
  const y = linear.kind === "nf4"
    ? nf4Matmul(gpu, x, linear.weight)
    : matmul(gpu, x, linear.weight);
  if (!pair || !lora) return y;
  const p = train ? lora.config.dropout : 0;
  const input = p > 0 ? dropout(gpu, x, p, train!.seed) : x;
  const down = matmul(gpu, input, pair.a);
  matmul(gpu, down, pair.b, { alpha: lora.scaling, out: y, accumulate: true });
  if (train) {
    train.acts.set(train.name, { input, down, seed: train.seed });
  } else {
    down.destroy();
    if (input !== x) input.destroy();
  }
  return y;
}

/**
 * One decoder layer; returns the new residual stream and leaves `x` untouched. In train
 * mode it also returns the activations its backward needs (the caller frees them).
 */
export function qwen3Layer(
  gpu: Gpu,
  w: Qwen3Weights,
  index: number,
  x: Tensor,
  ctx: Qwen3Context,
  lora?: LoraAdapter,
  train?: TrainMode,
): { out: Tensor; acts?: Qwen3LayerActs } {
  const c = w.config;
  const layer: Qwen3Layer = w.layers[index];
  const loraActs = new Map<LinearName, LoraActs>();
  const lin = (input: Tensor, name: LinearName) =>
    frozenLinear(
      gpu,
      input,
      layer.linears[name],
      lora?.pairs.get(loraSlot(index, name)),
      lora,
      train && { seed: dropoutSeed(train, index, name), acts: loraActs, name },
    );
  const { batch, seqLen } = ctx.batch;
  const qWidth = c.numHeads * c.headDim;
  const kvWidth = c.numKvHeads * c.headDim;

  const { y: h, rstd: rstd1 } = rmsNormWithStats(gpu, x, layer.inputNorm, c.rmsNormEps);
  const q = lin(h, "q_proj");
  const k = lin(h, "k_proj");
  const v = lin(h, "v_proj");
  const { y: qr, rstd: rstdQ } = rmsNormWithStats(gpu, q, layer.qNorm, c.rmsNormEps);
  const { y: kr, rstd: rstdK } = rmsNormWithStats(gpu, k, layer.kNorm, c.rmsNormEps);
  rope(gpu, qr, ctx.rope, { heads: c.numHeads, seqLen, out: qr });
  rope(gpu, kr, ctx.rope, { heads: c.numKvHeads, seqLen, out: kr });
  const { out: a, lse } = attentionWithStats(
    gpu,
    qr.reshape([batch, seqLen, qWidth]),
    kr.reshape([batch, seqLen, kvWidth]),
    v.reshape([batch, seqLen, kvWidth]),
    { numHeads: c.numHeads, numKvHeads: c.numKvHeads, causal: true, keyLengths: ctx.keyLengths },
  );
  const attnOut = lin(a.reshape([batch * seqLen, qWidth]), "o_proj");
  const x1 = add(gpu, x, attnOut);
  attnOut.destroy();

  const { y: h2, rstd: rstd2 } = rmsNormWithStats(gpu, x1, layer.postNorm, c.rmsNormEps);
  const gate = lin(h2, "gate_proj");
  const up = lin(h2, "up_proj");
  const m = swiglu(gpu, gate, up);
  const down = lin(m, "down_proj");
  const out = add(gpu, x1, down);
  down.destroy();
  const acts: Qwen3LayerActs = {
    rstd1,
    h,
    q,
    rstdQ,
    k,
    rstdK,
    qr,
    kr,
    v,
    a,
    lse,
    x1,
    rstd2,
    h2,
    gate,
    up,
    m,
    lora: loraActs,
  };
  if (train) return { out, acts };
  destroyLayerActs(acts);
  return { out };
}

export function destroyLayerActs(acts: Qwen3LayerActs): void {
  for (const [key, t] of Object.entries(acts)) if (key !== "lora") (t as Tensor).destroy();
  for (const { input, down } of acts.lora.values()) {
    down.destroy();
    // Without dropout the LoRA input is the layer's own activation, freed above.
    if (!Object.values(acts).includes(input)) input.destroy();
  }
}

/** Gradients of the LoRA matrices, keyed like `LoraAdapter.pairs`; backward adds into them. */
export type LoraGrads = Map<string, { a: Tensor; b: Tensor }>;

/**
 * Backward of `frozenLinear`: returns dx = dy W (+ the LoRA branch's dx) and adds the LoRA
 * gradients into `grads`. `dxInto` accumulates dx into an existing tensor instead.
 */
function frozenLinearBackward(
  gpu: Gpu,
  dy: Tensor,
  linear: FrozenLinear,
  lora: LoraAdapter | undefined,
  pair: LoraPair | undefined,
  acts: LoraActs | undefined,
  grad: { a: Tensor; b: Tensor } | undefined,
  dxInto?: Tensor,
): Tensor {
  let dx: Tensor;
  if (linear.kind === "nf4") {
    dx = nf4MatmulInputGrad(
      gpu,
      dy,
      linear.weight,
      dxInto ? { out: dxInto, accumulate: true } : {},
    );
  } else {
    dx = matmul(gpu, dy, linear.weight, { transposeW: false });
    if (dxInto) {
      addInPlace(gpu, dxInto, dx);
      dx.destroy();
      dx = dxInto;
    }
  }
  if (!pair || !lora || !acts || !grad) return dx;
  // y += s (a Bᵀ) with a = x' Aᵀ: dB += s dyᵀ a, da = s dy B, dA += daᵀ x', dx' = da A.
  const s = lora.scaling;
  matmul(gpu, dy, acts.down, {
    transposeX: true,
    transposeW: false,
    alpha: s,
    out: grad.b,
    accumulate: true,
  });
  const dDown = matmul(gpu, dy, pair.b, { transposeW: false, alpha: s });
  matmul(gpu, dDown, acts.input, {
    transposeX: true,
    transposeW: false,
    out: grad.a,
    accumulate: true,
  });
  const p = lora.config.dropout;
  if (p > 0) {
    const dInput = matmul(gpu, dDown, pair.a, { transposeW: false });
    const dxLora = dropout(gpu, dInput, p, acts.seed);
    addInPlace(gpu, dx, dxLora);
    dInput.destroy();
    dxLora.destroy();
  } else {
    matmul(gpu, dDown, pair.a, { transposeW: false, out: dx, accumulate: true });
  }
  dDown.destroy();
  return dx;
}

/**
 * Backward of one decoder layer. `dOut` (the gradient of the layer's output) is consumed:
 * the returned tensor, the gradient of the layer's input, reuses its memory.
 */
export function qwen3LayerBackward(
  gpu: Gpu,
  w: Qwen3Weights,
  index: number,
  x: Tensor,
  acts: Qwen3LayerActs,
  dOut: Tensor,
  ctx: Qwen3Context,
  lora: LoraAdapter | undefined,
  grads: LoraGrads,
): Tensor {
  const c = w.config;
  const layer = w.layers[index];
  const { batch, seqLen } = ctx.batch;
  const qWidth = c.numHeads * c.headDim;
  const kvWidth = c.numKvHeads * c.headDim;
  const back = (dy: Tensor, name: LinearName, dxInto?: Tensor) => {
    const slot = loraSlot(index, name);
    return frozenLinearBackward(
      gpu,
      dy,
      layer.linears[name],
      lora,
      lora?.pairs.get(slot),
      acts.lora.get(name),
      grads.get(slot),
      dxInto,
    );
  };

  // x2 = x1 + down(swiglu(gate(h2), up(h2))), h2 = rmsNorm(x1)
  const dm = back(dOut, "down_proj");
  const { dGate, dUp } = swigluBackward(gpu, dm, acts.gate, acts.up);
  dm.destroy();
  const dh2 = back(dGate, "gate_proj");
  back(dUp, "up_proj", dh2);
  dGate.destroy();
  dUp.destroy();
  const dx1 = dOut;
  rmsNormBackward(gpu, dh2, acts.x1, layer.postNorm, acts.rstd2, { out: dx1, accumulate: true });
  dh2.destroy();

  // x1 = x + o(attention(rope(qnorm(q(h))), rope(knorm(k(h))), v(h))), h = rmsNorm(x)
  const da = back(dx1, "o_proj");
  const { dq, dk, dv } = attentionBackward(
    gpu,
    da.reshape([batch, seqLen, qWidth]),
    acts.qr.reshape([batch, seqLen, qWidth]),
    acts.kr.reshape([batch, seqLen, kvWidth]),
    acts.v.reshape([batch, seqLen, kvWidth]),
    acts.a.reshape([batch, seqLen, qWidth]),
    acts.lse,
    { numHeads: c.numHeads, numKvHeads: c.numKvHeads, causal: true, keyLengths: ctx.keyLengths },
  );
  da.destroy();
  ropeBackward(gpu, dq, ctx.rope, { heads: c.numHeads, seqLen, out: dq });
  ropeBackward(gpu, dk, ctx.rope, { heads: c.numKvHeads, seqLen, out: dk });
  const { dx: dqPre } = rmsNormBackward(gpu, dq, acts.q, layer.qNorm, acts.rstdQ);
  const { dx: dkPre } = rmsNormBackward(gpu, dk, acts.k, layer.kNorm, acts.rstdK);
  dq.destroy();
  dk.destroy();
  const dh = back(dqPre.reshape([batch * seqLen, qWidth]), "q_proj");
  back(dkPre.reshape([batch * seqLen, kvWidth]), "k_proj", dh);
  back(dv.reshape([batch * seqLen, kvWidth]), "v_proj", dh);
  for (const t of [dqPre, dkPre, dv]) t.destroy();
  rmsNormBackward(gpu, dh, x, layer.inputNorm, acts.rstd1, { out: dx1, accumulate: true });
  dh.destroy();
  return dx1;
}

/** What `qwen3Backward` needs from a training forward pass. */
export interface Qwen3TrainState {
  ctx: Qwen3Context;
  /** Input of each layer, then the last layer's output. */
  layerInputs: Tensor[];
  /** Per-layer activations, or null for layers to recompute (gradient checkpointing). */
  acts: Array<Qwen3LayerActs | null>;
  finalRstd: Tensor;
  train: TrainMode;
}

export interface Qwen3TrainOptions {
  lora: LoraAdapter;
  train: TrainMode;
  /** Keep only each layer's input and recompute its activations during backward. */
  checkpoint: boolean;
}

/** Forward for training: the last hidden state plus what the backward pass needs. */
export function qwen3ForwardTrain(
  gpu: Gpu,
  w: Qwen3Weights,
  batch: TokenBatch,
  options: Qwen3TrainOptions,
): { hidden: Tensor; state: Qwen3TrainState } {
  const c = w.config;
  const ctx = qwen3Context(gpu, w, batch);
  const layerInputs = [embeddingGather(gpu, w.embed, batch.ids)];
  const acts: Array<Qwen3LayerActs | null> = [];
  for (let i = 0; i < c.numLayers; i++) {
    const { out, acts: layerActs } = qwen3Layer(
      gpu,
      w,
      i,
      layerInputs[i],
      ctx,
      options.lora,
      options.train,
    );
    if (options.checkpoint) {
      destroyLayerActs(layerActs!);
      acts.push(null);
    } else acts.push(layerActs!);
    layerInputs.push(out);
  }
  const { y: hidden, rstd: finalRstd } = rmsNormWithStats(
    gpu,
    layerInputs[c.numLayers],
    w.norm,
    c.rmsNormEps,
  );
  return { hidden, state: { ctx, layerInputs, acts, finalRstd, train: options.train } };
}

/** Adds the LoRA gradients of d(loss)/d(hidden) into `grads` and frees the training state. */
export function qwen3Backward(
  gpu: Gpu,
  w: Qwen3Weights,
  state: Qwen3TrainState,
  dHidden: Tensor,
  lora: LoraAdapter,
  grads: LoraGrads,
): void {
  const c = w.config;
  const { dx } = rmsNormBackward(
    gpu,
    dHidden,
    state.layerInputs[c.numLayers],
    w.norm,
    state.finalRstd,
  );
  let grad = dx;
  state.finalRstd.destroy();
  state.layerInputs[c.numLayers].destroy();
  for (let i = c.numLayers - 1; i >= 0; i--) {
    let acts = state.acts[i];
    if (!acts) {
      const recomputed = qwen3Layer(gpu, w, i, state.layerInputs[i], state.ctx, lora, state.train);
      recomputed.out.destroy();
      acts = recomputed.acts!;
    }
    grad = qwen3LayerBackward(gpu, w, i, state.layerInputs[i], acts, grad, state.ctx, lora, grads);
    destroyLayerActs(acts);
    state.layerInputs[i].destroy();
  }
  grad.destroy();
  state.ctx.keyLengths.destroy();
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
    const { out } = qwen3Layer(gpu, w, i, x, ctx, options.lora);
    x.destroy();
    x = out;
  }
  ctx.keyLengths.destroy();
  if (options.stopAfterLayer !== undefined) return x;
  const { y, rstd } = rmsNormWithStats(gpu, x, w.norm, c.rmsNormEps);
  x.destroy();
  rstd.destroy();
  return y;
}
