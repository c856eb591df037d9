/**
 * Writes a run's HTML report (src/train/report.ts) and, with --png, a screenshot of it taken
 * by headless Chromium (Debian: `apt-get install chromium`), to check by eye that it renders.
 *
 *   deno run --allow-read --allow-write --allow-run --allow-env scripts/render_report.ts \
 *     --run runs/my-run [--png report.png] [--dark] [--chromium /usr/bin/chromium]
 */
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseCommandArgs, UsageError } from "../src/cli/args.ts";
import { METRICS_FILE } from "../src/train/metrics.ts";
import { writeReport } from "../src/train/report.ts";

export const DEFAULT_CHROMIUM = "/usr/bin/chromium";

export interface ScreenshotOptions {
  chromium?: string;
  width?: number;
  height?: number;
  /** Render with `prefers-color-scheme: dark`. */
  dark?: boolean;
  timeoutMs?: number;
}

/**
 * Screenshots a local HTML file with headless Chromium into `pngPath`. Everything that would
 * reach the network (updates, sync, QUIC, background fetches) is off; the page itself has no
 * external resources.
 */
export async function screenshotHtml(
  htmlPath: string,
  pngPath: string,
  options: ScreenshotOptions = {},
): Promise<void> {
  const {
    chromium = DEFAULT_CHROMIUM,
    width = 1200,
    height = 2000,
    dark = false,
    timeoutMs = 60_000,
  } = options;
  const profile = await Deno.makeTempDir({ prefix: "distill-chromium-" });
  const out = resolve(pngPath);
  try {
    const args = [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--hide-scrollbars",
      "--force-device-scale-factor=1",
      `--user-data-dir=${profile}`,
      `--screenshot=${out}`,
      `--window-size=${width},${height}`,
      ...(dark ? ["--force-dark-mode", "--blink-settings=preferredColorScheme=0"] : []),
      pathToFileURL(resolve(htmlPath)).href,
    ];
    await Deno.remove(out).catch(() => undefined);
    let result: Deno.CommandOutput;
    try {
      result = await new Deno.Command(chromium, {
        args,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(timeoutMs),
      }).output();
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) {
        throw new Error(`${chromium} not found: install Chromium (apt-get install chromium)`);
      }
      throw err;
    }
    const written = await Deno.stat(out).then((s) => s.size > 0).catch(() => false);
    if (!result.success || !written) {
      const log = new TextDecoder().decode(result.stderr).trim().split("\n").slice(-20).join("\n");
      throw new Error(
        `${chromium} exited with code ${result.code} and ${
          written ? "" : "no "
        }screenshot at ${out}:\n${log}`,
      );
    }
  } finally {
    await Deno.remove(profile, { recursive: true }).catch(() => undefined);
  }
}

const USAGE =
  "usage: render_report.ts --run DIR [--title TEXT] [--png OUT.png] [--dark] [--chromium PATH]";

async function main(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseCommandArgs("render_report", argv, {
      run: { type: "string" },
      title: { type: "string" },
      png: { type: "string" },
      dark: { type: "boolean", default: false },
      chromium: { type: "string", default: DEFAULT_CHROMIUM },
    }));
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`${err.message}\n${USAGE}`);
    return 2;
  }
  if (values.help || !values.run) {
    console.error(USAGE);
    return values.help ? 0 : 2;
  }
  if (!existsSync(join(values.run, METRICS_FILE))) {
    console.error(`${values.run} has no ${METRICS_FILE}: pass the folder of a training run`);
    return 1;
  }
  const report = await writeReport(values.run, values.title ? { title: values.title } : {});
  console.log(`wrote ${report}`);
  if (values.png) {
    await screenshotHtml(report, values.png, { chromium: values.chromium, dark: values.dark });
    console.log(`wrote ${values.png}`);
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
