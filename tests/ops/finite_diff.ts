/** Finite-difference gradients for checking the float64 backward references. */

/** sum(a[i] * b[i]): the scalar loss whose gradient with respect to y is `a`. */
export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i] * b[i];
  return sum;
}

/** Central differences (f(x + h e_i) - f(x - h e_i)) / 2h for every i (error O(h^2)). */
export function numericGrad(
  f: (x: Float64Array) => number,
  x: ArrayLike<number>,
  h = 1e-6,
): Float64Array {
  const at = Float64Array.from(x);
  const grad = new Float64Array(at.length);
  for (let i = 0; i < at.length; i++) {
    const v = at[i];
    at[i] = v + h;
    const up = f(at);
    at[i] = v - h;
    const down = f(at);
    at[i] = v;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}
