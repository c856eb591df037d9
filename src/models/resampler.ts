/**
 * The Perceiver Resampler (docs/numerics.md §4): learned latent queries cross-attend to the
 * student's hidden states and become SDXL's conditioning, `seq` [B, Q, dim_seq] (prompt_embeds)
 * and `pooled` [B, dim_pooled] (pooled text embeds). It is trained, so the forward can keep
 * what the backward reads (`ResamplerActivations`, llm.c style) and `resamplerBackward`
 * returns the gradient of every parameter and of the input hidden states (which flows on into
 * the student's LoRA).
 *
 * Parameters live in one map keyed by their safetensors names (the oracle's, see
 * tests/fixtures/resampler/README.md), which is also what the optimiser and the gradient map
 * use. A checkpoint folder holds `resampler_config.json` and `resampler.safetensors`.
 */
import type { Gpu } from "../gpu/device.ts";
import { Tensor } from "../gpu/tensor.ts";
import { gelu, geluBackward } from "../ops/activation.ts";
import { attentionBackward, attentionWithStats } from "../ops/attention.ts";
import { addInPlace } from "../ops/elementwise.ts";
import { type IndexInput, type IndexTensor, indexTensor } from "../ops/indices.ts";
import {
  concatLastAxis,
  concatRows,
  concatRowsBackward,
  meanOverSequence,
  meanOverSequenceBackward,
  splitLastAxis,
} from "../ops/layout.ts";
import { matmul } from "../ops/matmul.ts";
import {
  layerNormBackward,
  type LayerNormBackwardOptions,
  type LayerNormResult,
  layerNormWithStats,
} from "../ops/norm.ts";
import { columnSum } from "../ops/reduce.ts";
import { checkResamplerFitsStudent } from "./resampler_config.ts";
import { resamplerParam, type ResamplerWeights } from "./resampler_weights.ts";

/** All LayerNorms of the resampler use this eps. */
const LN_EPS = 1e-5;

/** What one block's backward reads. */
interface BlockActivations {
  /** The latents entering the block, [B, Q, dim]. */
  latentsIn: Tensor;
  /** norm_x statistics over x (its output lives on only inside `kvInput`). */
  normX: { mean: Tensor; rstd: Tensor };
  /** norm_l(latentsIn): y [B, Q, dim] and statistics. */
  normL: LayerNormResult;
  /** concat_seq(norm_x(x), norm_l(latents)) [B, T + Q, dim]. */
  kvInput: Tensor;
  q: Tensor;
  k: Tensor;
  v: Tensor;
  /** Attention output [B, Q, inner] and its log-sum-exp [B, heads, Q]. */
  attn: Tensor;
  lse: Tensor;
  /** Latents after the attention residual, [B, Q, dim]. */
  latentsMid: Tensor;
  normFf: LayerNormResult;
  /** w1 output before GELU [B, Q, dim * ff_mult], and after. */
  ffHidden: Tensor;
  ffAct: Tensor;
}

/** Everything `resamplerBackward` needs from the forward; free it with `destroyResamplerActivations`. */
export interface ResamplerActivations {
  batch: number;
  seqLen: number;
  /** The caller's input [B, T, dim_in]: borrowed, not destroyed with the activations. */
  hidden: Tensor;
  keyLengths: IndexTensor;
  /** proj_in(hidden) [B, T, dim]. */
  x: Tensor;
  blocks: BlockActivations[];
  /** Latents after the last block [B, Q, dim]. */
  latentsOut: Tensor;
  /** mean over Q of latentsOut [B, dim] and norm_pool of it. */
  pooledMean: Tensor;
  normPool: LayerNormResult;
}

export interface ResamplerOutputs {
  /** [B, Q, dim_seq] */
  seq: Tensor;
  /** [B, dim_pooled] */
  pooled: Tensor;
}

export interface ResamplerTrainOutputs extends ResamplerOutputs {
  acts: ResamplerActivations;
}

function destroyBlock(block: BlockActivations): void {
  for (const value of Object.values(block)) {
    const tensors = value instanceof Tensor ? [value] : Object.values(value) as Tensor[];
    for (const t of tensors) t.destroy();
  }
}

export function destroyResamplerActivations(acts: ResamplerActivations): void {
  if (acts.keyLengths.owned) acts.keyLengths.tensor.destroy();
  for (const block of acts.blocks) destroyBlock(block);
  for (const t of [acts.x, acts.latentsOut, acts.pooledMean, ...Object.values(acts.normPool)]) {
    t.destroy();
  }
}

/** The first `rows` rows of a parameter [R, n] copied for every batch row: [B, rows, n]. */
function repeatForBatch(gpu: Gpu, param: Tensor, rows: number, batch: number): Tensor {
  const width = param.shape[1];
  const bytes = rows * width * 4;
  const out = gpu.empty([batch, rows, width], "f32", param.name);
  for (let b = 0; b < batch; b++) gpu.copy(param, 0, out, b * bytes, bytes);
  return out;
}

/**
 * Adds to `grad` [R, n] the gradient of a parameter whose first `rows` rows were repeated over
 * the batch: the sum over batch rows of dy [B, rows, n]; the rows past `rows` get nothing.
 */
function repeatForBatchBackward(gpu: Gpu, dy: Tensor, grad: Tensor): void {
  const [batch, rows, width] = dy.shape;
  const sum = columnSum(gpu, dy.reshape([batch, rows * width]));
  addInPlace(gpu, grad.leading(sum.shape), sum);
  sum.destroy();
}

/** A view of t as [rows, last axis], the 2-D operand a weight gradient needs. */
function rows2d(t: Tensor): Tensor {
  const last = t.shape.at(-1)!;
  return t.reshape([t.size / last, last]);
}

function resamplerForwardImpl(
  gpu: Gpu,
  w: ResamplerWeights,
  hidden: Tensor,
  keyLengths: IndexInput,
  keep: boolean,
): ResamplerTrainOutputs {
  const c = w.config;
  const op = "resamplerForward";
  if (hidden.dtype !== "f32" || hidden.shape.length !== 3) {
    throw new Error(
      `${op}: hidden '${hidden.name}' [${hidden.shape}] ${hidden.dtype} must be f32 [B, T, dim_in]`,
    );
  }
  const [batch, seqLen, width] = hidden.shape;
  checkResamplerFitsStudent(c, width, op);
  const lengths = indexTensor(gpu, op, "keyLengths", keyLengths, {
    length: { count: batch, meaning: "one number of real student positions per batch row" },
    check: (len, b) => {
      if (len < 0 || len > seqLen) {
        throw new Error(`${op}: keyLengths[${b}] = ${len} is outside [0, ${seqLen}]`);
      }
    },
  });
  const inner = c.heads * c.dimHead;
  const attnOptions = { numHeads: c.heads, keyLengths: lengths.tensor, alwaysVisibleFrom: seqLen };
  if (c.numPositions > 0 && seqLen > c.numPositions) {
    throw new Error(
      `${op}: ${seqLen} student positions, but this resampler has positions for at most ` +
        `${c.numPositions} (num_positions); cut prompts to ${c.numPositions} tokens (--max-tokens)`,
    );
  }
  const x = matmul(gpu, hidden, resamplerParam(w, "proj_in.weight"), {
    bias: resamplerParam(w, "proj_in.bias"),
  });
  if (c.numPositions > 0) {
    const positions = repeatForBatch(gpu, resamplerParam(w, "pos_emb"), seqLen, batch);
    addInPlace(gpu, x, positions);
    positions.destroy();
  }
  const latentsParam = resamplerParam(w, "latents");
  let latents = repeatForBatch(gpu, latentsParam, latentsParam.shape[0], batch);
  const blocks: BlockActivations[] = [];
  for (let i = 0; i < c.depth; i++) {
    const p = (name: string) => resamplerParam(w, `layers.${i}.${name}`);
    const latentsIn = latents;
    const normX = layerNormWithStats(
      gpu,
      x,
      p("attn.norm_x.weight"),
      p("attn.norm_x.bias"),
      LN_EPS,
    );
    const normL = layerNormWithStats(
      gpu,
      latentsIn,
      p("attn.norm_l.weight"),
      p("attn.norm_l.bias"),
      LN_EPS,
    );
    const q = matmul(gpu, normL.y, p("attn.to_q.weight"));
    const kvInput = concatRows(gpu, normX.y, normL.y);
    normX.y.destroy();
    const kv = matmul(gpu, kvInput, p("attn.to_kv.weight"));
    const [k, v] = splitLastAxis(gpu, kv, [inner, inner]);
    kv.destroy();
    const { out: attn, lse } = attentionWithStats(gpu, q, k, v, attnOptions);
    const latentsMid = matmul(gpu, attn, p("attn.to_out.weight"));
    addInPlace(gpu, latentsMid, latentsIn);
    const normFf = layerNormWithStats(
      gpu,
      latentsMid,
      p("ff.norm.weight"),
      p("ff.norm.bias"),
      LN_EPS,
    );
    const ffHidden = matmul(gpu, normFf.y, p("ff.w1.weight"));
    const ffAct = gelu(gpu, ffHidden);
    latents = matmul(gpu, ffAct, p("ff.w2.weight"));
    addInPlace(gpu, latents, latentsMid);
    const block: BlockActivations = {
      latentsIn,
      normX: { mean: normX.mean, rstd: normX.rstd },
      normL,
      kvInput,
      q,
      k,
      v,
      attn,
      lse,
      latentsMid,
      normFf,
      ffHidden,
      ffAct,
    };
    if (keep) blocks.push(block);
    else destroyBlock(block);
  }
  const seq = matmul(gpu, latents, resamplerParam(w, "proj_out.weight"), {
    bias: resamplerParam(w, "proj_out.bias"),
  });
  if (c.seqBias) {
    const offsets = repeatForBatch(gpu, resamplerParam(w, "seq_bias"), c.numQueries, batch);
    addInPlace(gpu, seq, offsets);
    offsets.destroy();
  }
  const pooledMean = meanOverSequence(gpu, latents);
  const normPool = layerNormWithStats(
    gpu,
    pooledMean,
    resamplerParam(w, "norm_pool.weight"),
    resamplerParam(w, "norm_pool.bias"),
    LN_EPS,
  );
  const pooled = matmul(gpu, normPool.y, resamplerParam(w, "proj_pooled.weight"), {
    bias: resamplerParam(w, "proj_pooled.bias"),
  });
  const acts: ResamplerActivations = {
    batch,
    seqLen,
    hidden,
    keyLengths: lengths,
    x,
    blocks,
    latentsOut: latents,
    pooledMean,
    normPool,
  };
  return { seq, pooled, acts };
}

/**
 * hidden [B, T, dim_in] (the student's last hidden states) and keyLengths [B] (real positions
 * per row; the padded ones are hidden from the attention) -> seq and pooled, keeping the
 * activations `resamplerBackward` needs.
 */
export function resamplerForwardTrain(
  gpu: Gpu,
  weights: ResamplerWeights,
  hidden: Tensor,
  keyLengths: IndexInput,
): ResamplerTrainOutputs {
  return resamplerForwardImpl(gpu, weights, hidden, keyLengths, true);
}

/** The forward for inference: each block's intermediates are freed as soon as it is done. */
export function resamplerForward(
  gpu: Gpu,
  weights: ResamplerWeights,
  hidden: Tensor,
  keyLengths: IndexInput,
): ResamplerOutputs {
  const { seq, pooled, acts } = resamplerForwardImpl(gpu, weights, hidden, keyLengths, false);
  destroyResamplerActivations(acts);
  return { seq, pooled };
}

/** Zeroed f32 gradient buffers for every resampler parameter, by the parameters' names. */
export function zeroResamplerGrads(gpu: Gpu, w: ResamplerWeights): Map<string, Tensor> {
  return new Map(
    [...w.params].map(([name, p]) => [name, gpu.zeros(p.shape, "f32", `grad.${name}`)]),
  );
}

/**
 * Backward of `resamplerForwardTrain` from dSeq [B, Q, dim_seq] and dPooled [B, dim_pooled]
 * (the loss gradients): adds d loss / d parameter into `grads` (one f32 buffer per parameter,
 * by name, e.g. from `zeroResamplerGrads`; the weight gradients accumulate in place, so
 * micro-batches add up without temporaries) and returns d loss / d hidden [B, T, dim_in]
 * (zero at padded positions). The activations are only read: free them afterwards.
 */
export function resamplerBackward(
  gpu: Gpu,
  w: ResamplerWeights,
  acts: ResamplerActivations,
  dSeq: Tensor,
  dPooled: Tensor,
  grads: ReadonlyMap<string, Tensor>,
): Tensor {
  const c = w.config;
  const op = "resamplerBackward";
  const { batch, seqLen } = acts;
  const expect = (arg: string, t: Tensor, shape: number[]) => {
    if (t.dtype !== "f32" || t.shape.join(",") !== shape.join(",")) {
      throw new Error(`${op}: ${arg} '${t.name}' [${t.shape}] ${t.dtype} must be f32 [${shape}]`);
    }
  };
  expect("dSeq", dSeq, [batch, c.numQueries, c.dimSeq]);
  expect("dPooled", dPooled, [batch, c.dimPooled]);
  if (acts.blocks.length !== c.depth) {
    throw new Error(
      `${op}: the activations hold ${acts.blocks.length} blocks, not ${c.depth}: pass those of resamplerForwardTrain`,
    );
  }
  for (const [name, p] of w.params) {
    const g = grads.get(name);
    if (!g) throw new Error(`${op}: no gradient buffer for parameter '${name}'`);
    expect(`gradient of '${name}'`, g, [...p.shape]);
  }
  const grad = (name: string) => grads.get(name)!;
  /** Adds a freshly computed gradient vector (a bias, a norm weight) into its buffer. */
  const addGrad = (name: string, t: Tensor) => {
    addInPlace(gpu, grad(name), t);
    t.destroy();
  };
  /** dW += dYᵀ X for a Linear y = x Wᵀ, over all rows. */
  const weightGrad = (name: string, dy: Tensor, input: Tensor) =>
    matmul(gpu, rows2d(dy), rows2d(input), {
      transposeX: true,
      transposeW: false,
      out: grad(name),
      accumulate: true,
    });
  const inputGrad = (dy: Tensor, name: string) =>
    matmul(gpu, dy, resamplerParam(w, name), { transposeW: false });
  /** Backward of the LayerNorm `name` from its forward statistics; adds its grads, gives dx. */
  const normBackward = (
    name: string,
    dy: Tensor,
    x: Tensor,
    stats: { mean: Tensor; rstd: Tensor },
    options: LayerNormBackwardOptions = {},
  ) => {
    const weight = resamplerParam(w, `${name}.weight`);
    const g = layerNormBackward(gpu, dy, x, weight, stats.mean, stats.rstd, options);
    addGrad(`${name}.weight`, g.dweight!);
    addGrad(`${name}.bias`, g.dbias!);
    return g.dx;
  };

  // Heads: seq = proj_out(latents), pooled = proj_pooled(norm_pool(mean_q(latents))).
  weightGrad("proj_out.weight", dSeq, acts.latentsOut);
  addGrad("proj_out.bias", columnSum(gpu, dSeq));
  if (c.seqBias) repeatForBatchBackward(gpu, dSeq, grad("seq_bias"));
  const dLatents = inputGrad(dSeq, "proj_out.weight");
  weightGrad("proj_pooled.weight", dPooled, acts.normPool.y);
  addGrad("proj_pooled.bias", columnSum(gpu, dPooled));
  const dNormPool = inputGrad(dPooled, "proj_pooled.weight");
  const dPooledMean = normBackward("norm_pool", dNormPool, acts.pooledMean, acts.normPool);
  const dFromMean = meanOverSequenceBackward(gpu, dPooledMean, c.numQueries);
  addInPlace(gpu, dLatents, dFromMean);
  for (const t of [dNormPool, dPooledMean, dFromMean]) t.destroy();

  let dX: Tensor | undefined;
  for (let i = c.depth - 1; i >= 0; i--) {
    const a = acts.blocks[i];
    const name = (suffix: string) => `layers.${i}.${suffix}`;
    // latents += w2(gelu(w1(norm_ff(latents)))); dLatents holds d latents_out.
    weightGrad(name("ff.w2.weight"), dLatents, a.ffAct);
    const dAct = inputGrad(dLatents, name("ff.w2.weight"));
    const dFfHidden = geluBackward(gpu, dAct, a.ffHidden);
    weightGrad(name("ff.w1.weight"), dFfHidden, a.normFf.y);
    const dNormFf = inputGrad(dFfHidden, name("ff.w1.weight"));
    const addToLatents = { out: dLatents, accumulate: true };
    normBackward(name("ff.norm"), dNormFf, a.latentsMid, a.normFf, addToLatents);
    for (const t of [dAct, dFfHidden, dNormFf]) t.destroy();

    // latents += to_out(attention(q, k, v)); dLatents now holds d latents_mid.
    weightGrad(name("attn.to_out.weight"), dLatents, a.attn);
    const dAttn = inputGrad(dLatents, name("attn.to_out.weight"));
    const { dq, dk, dv } = attentionBackward(gpu, dAttn, a.q, a.k, a.v, a.attn, a.lse, {
      numHeads: c.heads,
      keyLengths: acts.keyLengths.tensor,
      alwaysVisibleFrom: seqLen,
    });
    weightGrad(name("attn.to_q.weight"), dq, a.normL.y);
    const dNormL = inputGrad(dq, name("attn.to_q.weight"));
    const dKv = concatLastAxis(gpu, dk, dv);
    weightGrad(name("attn.to_kv.weight"), dKv, a.kvInput);
    const dKvInput = inputGrad(dKv, name("attn.to_kv.weight"));
    const { da: dNormX, db: dNormLFromKv } = concatRowsBackward(
      gpu,
      dKvInput,
      [batch, seqLen, c.dim],
      a.normL.y.shape,
    );
    addInPlace(gpu, dNormL, dNormLFromKv);
    normBackward(name("attn.norm_l"), dNormL, a.latentsIn, a.normL, addToLatents);
    const addToX = dX ? { out: dX, accumulate: true } : {};
    dX = normBackward(name("attn.norm_x"), dNormX, acts.x, a.normX, addToX);
    for (const t of [dAttn, dq, dk, dv, dNormL, dKv, dKvInput, dNormX, dNormLFromKv]) t.destroy();
  }

  // The latents parameter is shared by every batch row: its gradient is the sum over rows.
  repeatForBatchBackward(gpu, dLatents, grad("latents"));
  dLatents.destroy();
  const dx = dX!;
  if (c.numPositions > 0) repeatForBatchBackward(gpu, dx, grad("pos_emb"));
  weightGrad("proj_in.weight", dx, acts.hidden);
  addGrad("proj_in.bias", columnSum(gpu, dx));
  const dHidden = inputGrad(dx, "proj_in.weight");
  dx.destroy();
  return dHidden;
}
