/** Plain TypeScript references for the elementwise kernels. */

export function addRef(a: Float32Array, b: Float32Array): Float32Array {
  return a.map((x, i) => x + b[i]);
}

export function mulRef(a: Float32Array, b: Float32Array): Float32Array {
  return a.map((x, i) => x * b[i]);
}

export function scaleRef(a: Float32Array, s: number): Float32Array {
  return a.map((x) => x * s);
}

function pcgHash(v: number): number {
  const state = (Math.imul(v >>> 0, 747796405) + 2891336453) >>> 0;
  const word = Math.imul(((state >>> ((state >>> 28) + 4)) ^ state) >>> 0, 277803737) >>> 0;
  return ((word >>> 22) ^ word) >>> 0;
}

export function dropoutRef(x: Float32Array, p: number, seed: number): Float32Array {
  const keepScale = Math.fround(1 / (1 - p));
  return x.map((v, i) => {
    const r = (pcgHash((pcgHash(i) ^ seed) >>> 0) >>> 8) / 16777216;
    return r >= p ? Math.fround(v * keepScale) : 0;
  });
}
