/** Float64 references for the activation kernels (erf to ~1e-15, far beyond f32). */

const TWO_OVER_SQRT_PI = 2 / Math.sqrt(Math.PI);

/** erfc(a) for a >= 3 by its continued fraction, evaluated bottom-up (converges fast there). */
function erfcTail(a: number): number {
  let f = a;
  for (let n = 200; n >= 1; n--) f = a + n / 2 / f;
  return Math.exp(-a * a) / (Math.sqrt(Math.PI) * f);
}

/** erf(a) for 0 <= a < 3 by the all-positive series exp(-a^2) sum 2^n a^(2n+1) / (2n+1)!!. */
function erfSeries(a: number): number {
  let term = a;
  let sum = a;
  for (let n = 0; term > 1e-17 * sum; n++) {
    term *= (2 * a * a) / (2 * n + 3);
    sum += term;
  }
  return TWO_OVER_SQRT_PI * Math.exp(-a * a) * sum;
}

export function erfRef(x: number): number {
  const a = Math.abs(x);
  const e = a < 3 ? erfSeries(a) : 1 - erfcTail(a);
  return x < 0 ? -e : e;
}

/** erfc with relative accuracy in the right tail. */
export function erfcRef(x: number): number {
  return x >= 3 ? erfcTail(x) : 1 - erfRef(x);
}

export function sigmoidRef(x: number): number {
  return x >= 0 ? 1 / (1 + Math.exp(-x)) : Math.exp(x) / (1 + Math.exp(x));
}

export function siluRef(x: number): number {
  return x * sigmoidRef(x);
}

/** 0.5 x (1 + erf(x / sqrt 2)) = 0.5 x erfc(-x / sqrt 2). */
export function geluRef(x: number): number {
  return 0.5 * x * erfcRef(-x / Math.SQRT2);
}

export function quickGeluRef(x: number): number {
  return x * sigmoidRef(1.702 * x);
}

export function swigluRef(gate: Float32Array, up: Float32Array): Float32Array {
  return gate.map((g, i) => siluRef(g) * up[i]);
}

/** Standard normal density. */
function normalPdfRef(x: number): number {
  return Math.exp(-0.5 * x * x) / Math.sqrt(2 * Math.PI);
}

/** d/dx x sigmoid(x) = sigmoid(x) + x sigmoid(x) sigmoid(-x). */
export function siluGradRef(x: number): number {
  return sigmoidRef(x) * (1 + x * sigmoidRef(-x));
}

/** d/dx x Phi(x) = Phi(x) + x phi(x). */
export function geluGradRef(x: number): number {
  return 0.5 * erfcRef(-x / Math.SQRT2) + x * normalPdfRef(x);
}

/** d/dx x sigmoid(k x) = sigmoid(k x) + k x sigmoid(k x) sigmoid(-k x), k = 1.702. */
export function quickGeluGradRef(x: number): number {
  const k = 1.702;
  return sigmoidRef(k * x) * (1 + k * x * sigmoidRef(-k * x));
}

export function swigluBackwardRef(
  dOut: ArrayLike<number>,
  gate: ArrayLike<number>,
  up: ArrayLike<number>,
): { dGate: Float64Array; dUp: Float64Array } {
  const dGate = new Float64Array(gate.length);
  const dUp = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) {
    dGate[i] = dOut[i] * up[i] * siluGradRef(gate[i]);
    dUp[i] = dOut[i] * siluRef(gate[i]);
  }
  return { dGate, dUp };
}
