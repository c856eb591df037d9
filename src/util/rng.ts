/**
 * A small seeded generator (mulberry32) whose whole state is one u32, so checkpoints
 * can store it and a resumed run draws exactly the numbers an uninterrupted run would.
 */
export class Rng {
  #state: number;
  #spareNormal: number | null = null;

  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  get state(): { s: number; spare: number | null } {
    return { s: this.#state, spare: this.#spareNormal };
  }

  static fromState(state: { s: number; spare: number | null }): Rng {
    const rng = new Rng(state.s);
    rng.#spareNormal = state.spare;
    return rng;
  }

  /** Uniform in [0, 1). */
  next(): number {
    this.#state = (this.#state + 0x6d2b79f5) >>> 0;
    let t = this.#state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  uniform(lo: number, hi: number): number {
    return lo + (hi - lo) * this.next();
  }

  /** Standard normal (Box-Muller, both values used). */
  normal(): number {
    if (this.#spareNormal !== null) {
      const z = this.#spareNormal;
      this.#spareNormal = null;
      return z;
    }
    const r = Math.sqrt(-2 * Math.log(1 - this.next()));
    const a = 2 * Math.PI * this.next();
    this.#spareNormal = r * Math.sin(a);
    return r * Math.cos(a);
  }

  /** Fisher-Yates shuffle of 0..n-1. */
  permutation(n: number): number[] {
    const p = Array.from({ length: n }, (_, i) => i);
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(this.next() * (i + 1));
      [p[i], p[j]] = [p[j], p[i]];
    }
    return p;
  }

  fillNormal(out: Float32Array, std = 1): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = this.normal() * std;
    return out;
  }

  fillUniform(out: Float32Array, lo: number, hi: number): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = this.uniform(lo, hi);
    return out;
  }
}
