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
