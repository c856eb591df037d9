/** Plain TypeScript references for attention and its backward (f64 loops, a full softmax per row). */
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

export interface AttentionRefGrads {
  dq: Float64Array;
  dk: Float64Array;
  dv: Float64Array;
}

/** Where one (batch, head, query) row lives: element offsets of its q row and KV head. */
interface AttentionRow {
  /** Offset of the row in q (and out, dOut): ((b * Tq + i) * nq + h) * hd. */
  qOff: number;
  /** Offset of key j of this row's KV head in k and v. */
  kvOff: (j: number) => number;
  /** Index of the row in lse [B, nq, Tq]. */
  lseAt: number;
  /** Softmax over the keys (0 for masked ones), or null when no key is visible. */
  probs: Float64Array | null;
  lse: number;
}

/** Calls `visit` for every (batch, head, query) row with its probabilities. */
function forEachAttentionRow(
  q: ArrayLike<number>,
  k: ArrayLike<number>,
  s: AttentionRefShape,
  masks: AttentionRefMasks,
  visit: (row: AttentionRow) => void,
): void {
  const { batch, tq, tk, numHeads: nq, numKvHeads: nkv, headDim: hd } = s;
  const scale = masks.scale ?? 1 / Math.sqrt(hd);
  const visibleFrom = masks.alwaysVisibleFrom ?? tk;
  const visible = (b: number, i: number, j: number) =>
    (!masks.causal || j <= i) &&
    (!masks.keyLengths || j < masks.keyLengths[b] || j >= visibleFrom) &&
    (!masks.keyMask || masks.keyMask[b * tk + j] !== 0);
  const scores = new Float64Array(tk);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < nq; h++) {
      const kvh = Math.floor(h / (nq / nkv));
      const kvOff = (j: number) => ((b * tk + j) * nkv + kvh) * hd;
      for (let i = 0; i < tq; i++) {
        const qOff = ((b * tq + i) * nq + h) * hd;
        const lseAt = (b * nq + h) * tq + i;
        let max = -Infinity;
        for (let j = 0; j < tk; j++) {
          scores[j] = -Infinity;
          if (!visible(b, i, j)) continue;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qOff + d] * k[kvOff(j) + d];
          scores[j] = dot * scale;
          max = Math.max(max, scores[j]);
        }
        if (max === -Infinity) {
          visit({ qOff, kvOff, lseAt, probs: null, lse: ATTENTION_EMPTY_LSE });
          continue;
        }
        let sum = 0;
        const probs = new Float64Array(tk);
        for (let j = 0; j < tk; j++) {
          probs[j] = Math.exp(scores[j] - max);
          sum += probs[j];
        }
        for (let j = 0; j < tk; j++) probs[j] /= sum;
        visit({ qOff, kvOff, lseAt, probs, lse: max + Math.log(sum) });
      }
    }
  }
}

/** q [B, Tq, nq*hd], k/v [B, Tk, nkv*hd] -> out [B, Tq, nq*hd] and lse [B, nq, Tq]. */
export function attentionRef(
  q: ArrayLike<number>,
  k: ArrayLike<number>,
  v: ArrayLike<number>,
  s: AttentionRefShape,
  masks: AttentionRefMasks = {},
): { out: Float64Array; lse: Float64Array } {
  const { batch, tq, tk, numHeads: nq, headDim: hd } = s;
  const out = new Float64Array(batch * tq * nq * hd);
  const lse = new Float64Array(batch * nq * tq);
  forEachAttentionRow(q, k, s, masks, (row) => {
    lse[row.lseAt] = row.lse;
    if (!row.probs) return;
    for (let j = 0; j < tk; j++) {
      const kvOff = row.kvOff(j);
      for (let d = 0; d < hd; d++) out[row.qOff + d] += row.probs[j] * v[kvOff + d];
    }
  });
  return { out, lse };
}

/**
 * Gradients of sum(dOut * attention(q, k, v)) from the recomputed softmax P:
 * dv += P^T dOut, dS = P * (dOut v^T - rowsum(P * dOut v^T)), dq = scale dS k, dk = scale dS^T q.
 * GQA: a KV head's dk and dv sum over the query heads that read it.
 */
export function attentionBackwardRef(
  dOut: ArrayLike<number>,
  q: ArrayLike<number>,
  k: ArrayLike<number>,
  v: ArrayLike<number>,
  s: AttentionRefShape,
  masks: AttentionRefMasks = {},
): AttentionRefGrads {
  const { tk, headDim: hd } = s;
  const scale = masks.scale ?? 1 / Math.sqrt(hd);
  const dq = new Float64Array(q.length);
  const dk = new Float64Array(k.length);
  const dv = new Float64Array(v.length);
  const dP = new Float64Array(tk);
  forEachAttentionRow(q, k, s, masks, ({ qOff, kvOff, probs }) => {
    if (!probs) return;
    let rowDot = 0;
    for (let j = 0; j < tk; j++) {
      let acc = 0;
      for (let d = 0; d < hd; d++) acc += dOut[qOff + d] * v[kvOff(j) + d];
      dP[j] = acc;
      rowDot += probs[j] * acc;
    }
    for (let j = 0; j < tk; j++) {
      const dS = scale * probs[j] * (dP[j] - rowDot);
      const off = kvOff(j);
      for (let d = 0; d < hd; d++) {
        dv[off + d] += probs[j] * dOut[qOff + d];
        dq[qOff + d] += dS * k[off + d];
        dk[off + d] += dS * q[qOff + d];
      }
    }
  });
  return { dq, dk, dv };
}
