/** Shortest gap between two progress lines of a long command, so logs stay readable. */
export const PROGRESS_INTERVAL_MS = 2000;

/** A duration for progress lines: `42s`, `3m07s`, `2h05m`; `-` when unknown (no rate yet). */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "-";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
}

/**
 * Returns a function telling whether a progress line is due now: the first call, then at most
 * one every `intervalMs`, and always when `force` is set (the final line, so a run ends on it).
 */
export function progressThrottle(intervalMs = PROGRESS_INTERVAL_MS): (force?: boolean) => boolean {
  let last = -Infinity;
  return (force = false) => {
    const now = performance.now();
    if (!force && now - last < intervalMs) return false;
    last = now;
    return true;
  };
}
