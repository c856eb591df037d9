/**
 * Plain float64 reference of the Perceiver Resampler forward (docs/numerics.md §4), one batch row at
 * a time with obvious loops: the oracle for the GPU forward on small configs, and (being f64)
 * the function the GPU backward is checked against by finite differences.
 */
import { geluRef } from "../ops/activation_ref.ts";
import { layerNormRef } from "../ops/norm_ref.ts";
import type { ResamplerConfig } from "./resampler_config.ts";

const LN_EPS = 1e-5;

export interface ResamplerRefOutputs {
  /** [B, Q, dim_seq] */
  seq: Float64Array;
  /** [B, dim_pooled] */
  pooled: Float64Array;
  /** Latents after the last block, [B, Q, dim]. */
  latents: Float64Array;
}

/** x [rows, in] -> x Wᵀ (+ bias), W [out, in]. */
function linear(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  out: number,
  bias?: ArrayLike<number>,
): Float64Array {
  const inF = w.length / out;
  const rows = x.length / inF;
  const y = new Float64Array(rows * out);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < out; o++) {
      let sum = bias ? bias[o] : 0;
      for (let k = 0; k < inF; k++) sum += x[r * inF + k] * w[o * inF + k];
      y[r * out + o] = sum;
    }
  }
  return y;
}

/**
 * hidden [B, T, dim_in] with keyLengths[b] real positions per row -> seq, pooled and the final
 * latents. `params` maps the safetensors names (as `resamplerParamShapes`) to values.
 */
export function resamplerForwardRef(
  c: ResamplerConfig,
  params: ReadonlyMap<string, ArrayLike<number>>,
  hidden: ArrayLike<number>,
  keyLengths: ArrayLike<number>,
): ResamplerRefOutputs {
  const get = (name: string) => {
    const value = params.get(name);
    if (!value) throw new Error(`resamplerForwardRef: no parameter '${name}'`);
    return value;
  };
  const batch = keyLengths.length;
  const t = hidden.length / (batch * c.dimIn);
  const { numQueries: nq, dim, heads, dimHead: hd } = c;
  const inner = heads * hd;
  const seq = new Float64Array(batch * nq * c.dimSeq);
  const pooled = new Float64Array(batch * c.dimPooled);
  const latentsOut = new Float64Array(batch * nq * dim);
  for (let b = 0; b < batch; b++) {
    const x = linear(
      Array.prototype.slice.call(hidden, b * t * c.dimIn, (b + 1) * t * c.dimIn),
      get("proj_in.weight"),
      dim,
      get("proj_in.bias"),
    );
    if (c.numPositions > 0) {
      const positions = get("pos_emb");
      for (let j = 0; j < t * dim; j++) x[j] += positions[j];
    }
    const latents = Float64Array.from(get("latents"));
    for (let i = 0; i < c.depth; i++) {
      const p = (name: string) => get(`layers.${i}.${name}`);
      const xn = layerNormRef(x, p("attn.norm_x.weight"), p("attn.norm_x.bias"), LN_EPS).y;
      const ln = layerNormRef(latents, p("attn.norm_l.weight"), p("attn.norm_l.bias"), LN_EPS).y;
      const q = linear(ln, p("attn.to_q.weight"), inner);
      const kvInput = new Float64Array((t + nq) * dim);
      kvInput.set(xn);
      kvInput.set(ln, t * dim);
      const kv = linear(kvInput, p("attn.to_kv.weight"), 2 * inner);
      const attn = new Float64Array(nq * inner);
      const visible = (j: number) => j < keyLengths[b] || j >= t;
      for (let h = 0; h < heads; h++) {
        for (let r = 0; r < nq; r++) {
          const scores = new Float64Array(t + nq).fill(-Infinity);
          let max = -Infinity;
          for (let j = 0; j < t + nq; j++) {
            if (!visible(j)) continue;
            let dot = 0;
            for (let d = 0; d < hd; d++) {
              dot += q[r * inner + h * hd + d] * kv[j * 2 * inner + h * hd + d];
            }
            scores[j] = dot / Math.sqrt(hd);
            max = Math.max(max, scores[j]);
          }
          let sum = 0;
          for (let j = 0; j < t + nq; j++) sum += scores[j] = Math.exp(scores[j] - max);
          for (let d = 0; d < hd; d++) {
            let acc = 0;
            for (let j = 0; j < t + nq; j++) {
              acc += scores[j] * kv[j * 2 * inner + inner + h * hd + d];
            }
            attn[r * inner + h * hd + d] = acc / sum;
          }
        }
      }
      const attnOut = linear(attn, p("attn.to_out.weight"), dim);
      attnOut.forEach((v, j) => latents[j] += v);
      const fn = layerNormRef(latents, p("ff.norm.weight"), p("ff.norm.bias"), LN_EPS).y;
      const act = linear(fn, p("ff.w1.weight"), dim * c.ffMult).map(geluRef);
      const ffOut = linear(act, p("ff.w2.weight"), dim);
      ffOut.forEach((v, j) => latents[j] += v);
    }
    latentsOut.set(latents, b * nq * dim);
    const rowSeq = linear(latents, get("proj_out.weight"), c.dimSeq, get("proj_out.bias"));
    if (c.seqBias) {
      const offsets = get("seq_bias");
      rowSeq.forEach((_, j) => rowSeq[j] += offsets[j]);
    }
    seq.set(rowSeq, b * nq * c.dimSeq);
    const mean = new Float64Array(dim);
    for (let r = 0; r < nq; r++) for (let d = 0; d < dim; d++) mean[d] += latents[r * dim + d] / nq;
    const pn = layerNormRef(mean, get("norm_pool.weight"), get("norm_pool.bias"), LN_EPS).y;
    pooled.set(
      linear(pn, get("proj_pooled.weight"), c.dimPooled, get("proj_pooled.bias")),
      b * c.dimPooled,
    );
  }
  return { seq, pooled, latents: latentsOut };
}
