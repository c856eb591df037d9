/** The 300-prompt PartiPrompts excerpt in tests/fixtures/prompts (see its SOURCES.md). */
export async function readPromptSample(): Promise<string[]> {
  const url = new URL("../fixtures/prompts/PartiPrompts.sample300.tsv", import.meta.url);
  const [header, ...rows] = (await Deno.readTextFile(url)).split("\n").filter((line) => line);
  if (!header.startsWith("Prompt\t")) throw new Error(`${url.pathname}: unexpected header`);
  return rows.map((row) => row.split("\t")[0]);
}
