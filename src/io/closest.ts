/** "Did you mean" hints for error messages about missing keys. */

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const substitution = previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1);
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, substitution);
    }
    previous = current;
  }
  return previous[b.length];
}

/** The `count` candidates nearest to `target` by edit distance, nearest first. */
export function closestNames(target: string, candidates: Iterable<string>, count = 3): string[] {
  return [...candidates]
    .map((name) => ({ name, distance: editDistance(target, name) }))
    .sort((a, b) => a.distance - b.distance)
    .slice(0, count)
    .map(({ name }) => name);
}

/** A sentence to append to a "no such key" error: the closest keys, or that there are none. */
export function closeNamesHint(target: string, candidates: Iterable<string>): string {
  const close = closestNames(target, candidates);
  return close.length === 0
    ? "It holds no keys at all."
    : `Closest keys: ${close.map((name) => JSON.stringify(name)).join(", ")}.`;
}
