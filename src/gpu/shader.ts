/**
 * The one way a kernel is specialised. Numbers (tile sizes, workgroup sizes, vector widths,
 * flags) are WGSL `override` constants, set per pipeline by `Kernel.constants`. What an override
 * cannot express — the element type of a storage array, a shared piece of WGSL such as the
 * workgroup reductions — is a `$NAME` marker in the source, replaced here from `Kernel.markers`
 * when the pipeline is built. Replacement is one pass: marker values are not searched again.
 */

const MARKER = /\$([A-Z][A-Z0-9_]*)/g;

/** WGSL text for each `$NAME` marker of a kernel source, keyed by NAME. */
export type Markers = Readonly<Record<string, string>>;

/**
 * `code` with every `$NAME` replaced by `markers[NAME]`; a marker without a value, or a value
 * for a marker the code lacks, is an error naming the kernel (both are typos, not options).
 */
export function specialise(kernel: string, code: string, markers: Markers = {}): string {
  const unused = new Set(Object.keys(markers));
  const source = code.replace(MARKER, (_, name: string) => {
    const value = markers[name];
    if (value === undefined) {
      throw new Error(
        `kernel '${kernel}': no value for marker $${name}; give it in Kernel.markers`,
      );
    }
    unused.delete(name);
    return value;
  });
  if (unused.size > 0) {
    throw new Error(
      `kernel '${kernel}': its source has no marker ${[...unused].map((n) => "$" + n)}`,
    );
  }
  return source;
}

/** Whether two marker sets give the same values (the pipeline cache's check on a name). */
export function sameMarkers(a: Markers = {}, b: Markers = {}): boolean {
  if (a === b) return true; // the usual case: a kernel passes the same shared object each time
  const keys = Object.keys(a);
  return keys.length === Object.keys(b).length && keys.every((key) => a[key] === b[key]);
}
