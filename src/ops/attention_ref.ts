/** Plain TypeScript reference for attention (f64 loops, a full softmax per query row). */
import { ATTENTION_EMPTY_LSE } from "./attention.ts";

export interface AttentionRefShape {
  batch: number;
  tq: number;
  tk: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

export interface AttentionRefMasks {
  scale?: number;
  causal?: boolean;
  keyLengths?: ArrayLike<number>;
  alwaysVisibleFrom?: number;
  /** [B, Tk], nonzero = visible. */
  keyMask?: ArrayLike<number>;
}

/** q [B, Tq, nq*hd], k/v [B, Tk, nkv*hd] -> out [B, Tq, nq*hd] and lse [B, nq, Tq]. */
export function attentionRef(
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  s: AttentionRefShape,
  masks: AttentionRefMasks = {},
): { out: Float32Array; lse: Float32Array } {
  const { batch, tq, tk, numHeads: nq, numKvHeads: nkv, headDim: hd } = s;
  const scale = masks.scale ?? 1 / Math.sqrt(hd);
  const visibleFrom = masks.alwaysVisibleFrom ?? tk;
  const out = new Float32Array(batch * tq * nq * hd);
  const lse = new Float32Array(batch * nq * tq);
  const visible = (b: number, i: number, j: number) =>
    (!masks.causal || j <= i) &&
    (!masks.keyLengths || j < masks.keyLengths[b] || j >= visibleFrom) &&
    (!masks.keyMask || masks.keyMask[b * tk + j] !== 0);
  const scores = new Float64Array(tk);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < nq; h++) {
      const kvh = Math.floor(h / (nq / nkv));
      for (let i = 0; i < tq; i++) {
        const qOff = ((b * tq + i) * nq + h) * hd;
        let max = -Infinity;
        for (let j = 0; j < tk; j++) {
          scores[j] = -Infinity;
          if (!visible(b, i, j)) continue;
          const kOff = ((b * tk + j) * nkv + kvh) * hd;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qOff + d] * k[kOff + d];
          scores[j] = dot * scale;
          max = Math.max(max, scores[j]);
        }
        if (max === -Infinity) {
          lse[(b * nq + h) * tq + i] = ATTENTION_EMPTY_LSE;
          continue;
        }
        let sum = 0;
        for (let j = 0; j < tk; j++) {
          scores[j] = Math.exp(scores[j] - max);
          sum += scores[j];
        }
        lse[(b * nq + h) * tq + i] = max + Math.log(sum);
        for (let d = 0; d < hd; d++) {
          let acc = 0;
          for (let j = 0; j < tk; j++) acc += scores[j] * v[((b * tk + j) * nkv + kvh) * hd + d];
          out[qOff + d] = acc / sum;
        }
      }
    }
  }
  return { out, lse };
}
