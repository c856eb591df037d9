/**
 * Finds a Python that can import torch for the integration tests: $DISTILL_PYTHON, then
 * python3 on PATH, then Debian's /usr/bin/python3 (where `apt-get install python3-torch`
 * puts torch when PATH leads to another Python first).
 */
function importsTorch(python: string): boolean {
  try {
    const { success } = new Deno.Command(python, {
      args: ["-c", "import torch"],
      stdout: "null",
      stderr: "null",
    }).outputSync();
    return success;
  } catch {
    return false;
  }
}

const candidates = [Deno.env.get("DISTILL_PYTHON"), "python3", "/usr/bin/python3"];

/** The first candidate that imports torch, or null (the tests are then ignored). */
export const torchPython: string | null =
  candidates.find((p): p is string => !!p && importsTorch(p)) ?? null;

/** Runs a Python script from the repository root; throws with its output unless it exits 0. */
export async function runPython(script: string, env: Record<string, string>): Promise<string> {
  const { code, stdout, stderr } = await new Deno.Command(torchPython!, {
    args: [script],
    // No __pycache__ folders in the source tree.
    env: { PYTHONDONTWRITEBYTECODE: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const output = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
  if (code !== 0) throw new Error(`${script} exited with ${code}:\n${output}`);
  return output;
}
