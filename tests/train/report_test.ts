import assert from "node:assert/strict";
import { join } from "node:path";
import { DEFAULT_CHROMIUM, screenshotHtml } from "../../scripts/render_report.ts";
import {
  formatMetricsLine,
  METRICS_FILE,
  type MetricsRecord,
  readMetrics,
  type StepRecord,
} from "../../src/train/metrics.ts";
import { formatNumber } from "../../src/train/chart.ts";
import { renderReport, REPORT_FILE, writeReport } from "../../src/train/report.ts";
import { syntheticRun } from "./synthetic_run.ts";

/** A data point's dot (legend dots have no tooltip). */
const DATA_DOT = /<circle class="dot"[^>]*><title>/;
const CHART_IDS = ["loss", "heldout", "r2", "retrieval", "cosine", "grad-norm", "lr", "throughput"];

function count(text: string, pattern: RegExp): number {
  return text.match(new RegExp(pattern.source, "g"))?.length ?? 0;
}

/** The sanity checks every report must pass, whatever its data. */
function assertWellFormed(html: string): void {
  assert.ok(html.startsWith("<!doctype html>"));
  assert.equal(count(html, /<svg\b/), count(html, /<\/svg>/), "balanced <svg> tags");
  assert.equal(count(html, /<svg\b/), CHART_IDS.length);
  for (const tag of ["html", "head", "body", "style", "table", "figure", "g", "text"]) {
    assert.equal(count(html, new RegExp(`<${tag}\\b`)), count(html, new RegExp(`</${tag}>`)), tag);
  }
  for (const id of CHART_IDS) assert.ok(html.includes(`<figure id="${id}">`), id);
  // Self-contained: nothing to fetch, nothing to run.
  assert.doesNotMatch(html, /<script|<link|<img|@import|https?:|\bsrc=|\bhref=/);
  assert.doesNotMatch(html, /url\((?!#)/);
  // Every coordinate is a number.
  for (const [, value] of html.matchAll(/\b(?:[xy][12]?|c[xy]|d|width|height)="([^"]*)"/g)) {
    assert.doesNotMatch(value, /NaN|Infinity|undefined/, value);
  }
}

const stepsOf = (records: MetricsRecord[]) =>
  records.filter((r): r is StepRecord => r.type === "step");

Deno.test("report: plots, summary and config of a 500-step run with 10 evals", () => {
  const records = syntheticRun({ steps: 500, evals: 10 });
  const html = renderReport(records, { title: "run <one> & co" });
  assertWellFormed(html);
  assert.ok(html.includes("<title>run &#60;one&#62; &#38; co</title>"), "title escaped");

  // Series: 4 in loss, 3 + 2 references held-out, 2 + 3 references in R² and in retrieval,
  // 2 cosine, 3 grad norm, 2 lr, 1 throughput.
  assert.equal(count(html, /<g class="s\d( sparse| ref)?" clip-path/), 27);
  assert.equal(count(html, /<g class="s\d ref" clip-path/), 8);
  assert.equal(count(html, /<g class="s\d( ref)? legend">/), 27);
  // Dense step series are drawn raw and smoothed; evals as dots (10 eval series x 10), the
  // references as dashed lines without dots.
  assert.equal(count(html, /class="line raw"/), 7);
  assert.equal(count(html, DATA_DOT), 10 * 10);
  assert.match(
    html,
    /Held-out R², last<\/th><td>seq [-\d.]+, pooled [-\d.]+ \(mean predictor 0; word neighbours seq 0\.3, pooled 0\.35\)/,
  );
  assert.match(html, /Retrieval top-1 \/ top-5, last<\/th><td>seq [\d.]+ \/ not defined/);
  assert.match(html, /MSE \(log scale\)/, "loss spanning decades gets a log axis");
  assert.match(html, /L2 norm \(log scale\)/);
  assert.doesNotMatch(html, /learning rate \(log scale\)/);

  const steps = stepsOf(records);
  const evals = records.filter((r) => r.type === "eval");
  assert.equal(evals.length, 10);
  const best = evals.reduce((b, r) => (r.heldout_loss < b.heldout_loss ? r : b));
  assert.match(html, /<th>Steps<\/th><td>500 \(500 logged\)<\/td>/);
  assert.ok(html.includes(`<td>${steps.at(-1)!.samples}</td>`));
  assert.ok(html.includes(`<td>${formatNumber(evals[0].heldout_loss)} at step 50</td>`));
  assert.ok(html.includes(`${formatNumber(evals[9].heldout_loss)} at step 500 (seq`));
  assert.ok(
    html.includes(
      `Held-out loss, best</th><td>${formatNumber(best.heldout_loss)} at step ${best.step}`,
    ),
  );
  assert.match(html, /Wall time<\/th><td>1 min \d\d s/);
  assert.match(html, /<th>lr\.resampler<\/th><td>0\.0001<\/td>/, "config flattened");
  assert.doesNotMatch(html, /class="warn"/, "nothing left out");
});

Deno.test("report: no evals yet, and no steps yet", () => {
  const noEval = renderReport(syntheticRun({ steps: 30, evals: 0 }), { title: "t" });
  assertWellFormed(noEval);
  assert.equal(count(noEval, />No evaluation yet</), 4);
  assert.match(noEval, /Held-out loss<\/th><td>no evaluation yet/);
  assert.doesNotMatch(noEval, />held-out</, "an absent series has no legend entry");

  const empty = renderReport([], { title: "t" });
  assertWellFormed(empty);
  assert.equal(count(empty, />No steps logged yet</), 4);
  assert.match(empty, /none logged yet/);
  assert.match(empty, /No config logged/);
});

Deno.test("report: one step and one eval", () => {
  const html = renderReport(syntheticRun({ steps: 1, evals: 1 }), { title: "t" });
  assertWellFormed(html);
  // Every series but the dashed references is a lone dot, and the step axis has whole-number
  // ticks around it.
  assert.equal(count(html, DATA_DOT), 19);
  assert.doesNotMatch(html, /text-anchor="middle">0\.5</);
  assert.match(html, /text-anchor="middle">1</);
});

Deno.test("report: non-finite values are left out of the lines and marked", () => {
  const records = syntheticRun({ steps: 200, evals: 4 });
  for (const r of stepsOf(records)) {
    if (r.step === 50 || r.step === 51) r.loss = NaN;
    if (r.step === 60) r.grad_norm.total = Infinity;
  }
  const eval0 = records.find((r) => r.type === "eval")!;
  if (eval0.type === "eval") eval0.cos_seq = NaN;
  const html = renderReport(records, { title: "t" });
  assertWellFormed(html);
  assert.match(html, /train: 2 values left out \(NaN at step 50, 51\)/);
  assert.match(html, /total: 1 value left out \(Infinity at step 60\)/);
  assert.match(html, /seq \(mean per token\): 1 value left out \(NaN at step 50\)/);
  // Steps 50 and 51 fall in separate pixel columns: two marks on the loss plot.
  assert.equal(count(html, /<path class="skip"/), 4);
  assert.match(html, /Non-finite loss or grad norm<\/th><td>3 steps \(50, 51, 60\)/);
  // The train line breaks at the gap: its raw path starts anew after step 51.
  const rawLoss = html.match(/<figure id="loss">.*?<path class="line raw" d="([^"]*)"/s)![1];
  assert.equal(count(rawLoss, /M/), 2);
});

Deno.test("report: thousands of steps are decimated and keep their spikes", () => {
  const records = syntheticRun({ steps: 20_000, evals: 20 });
  const spike = stepsOf(records)[12_345];
  spike.samples_per_s = 1000;
  const html = renderReport(records, { title: "t" });
  assertWellFormed(html);
  assert.ok(html.length < 2_000_000, `report is ${html.length} characters`);
  const raw = html.match(/<figure id="throughput">.*?<path class="line raw" d="([^"]*)"/s)![1];
  const ys = [...raw.matchAll(/[ML][\d.]+ ([\d.]+)/g)].map((m) => Number(m[1]));
  assert.ok(ys.length <= 2 * 500, `${ys.length} points drawn for 20000`);
  assert.ok(Math.min(...ys) < 50, "the spike to 1000 samples/s reaches the top of the plot");
});

Deno.test("report: writeReport renders the run folder's log to report.html", async () => {
  const dir = await Deno.makeTempDir({ prefix: "distill-report-" });
  const records = syntheticRun({ steps: 50, evals: 5 });
  await Deno.writeTextFile(join(dir, METRICS_FILE), records.map(formatMetricsLine).join(""));
  const path = await writeReport(dir, { title: "my run" });
  assert.equal(path, join(dir, REPORT_FILE));
  const html = await Deno.readTextFile(path);
  assert.equal(html, renderReport(await readMetrics(dir), { title: "my run" }));
  assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), [
    METRICS_FILE,
    REPORT_FILE,
  ]);
  await Deno.remove(dir, { recursive: true });
});

/** Decodes an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes) to RGBA pixels. */
async function decodePng(bytes: Uint8Array) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let width = 0;
  let height = 0;
  let channels = 0;
  const idat: Uint8Array[] = [];
  for (let at = 8; at < bytes.length;) {
    const length = view.getUint32(at);
    const type = new TextDecoder().decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    if (type === "IHDR") {
      width = view.getUint32(at + 8);
      height = view.getUint32(at + 12);
      assert.equal(data[8], 8, "bit depth");
      assert.equal(data[12], 0, "interlace");
      channels = { 2: 3, 6: 4 }[data[9]] ?? 0;
      assert.ok(channels, `colour type ${data[9]}`);
    }
    if (type === "IDAT") idat.push(data);
    at += 12 + length;
  }
  const inflated = new Uint8Array(
    await new Response(
      new Blob(idat as BlobPart[]).stream().pipeThrough(new DecompressionStream("deflate")),
    ).arrayBuffer(),
  );
  const stride = width * channels;
  const rows = new Uint8Array(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = inflated[y * (stride + 1)];
    const line = inflated.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? rows[y * stride + i - channels] : 0;
      const b = y > 0 ? rows[(y - 1) * stride + i] : 0;
      const c = i >= channels && y > 0 ? rows[(y - 1) * stride + i - channels] : 0;
      const p = a + b - c;
      const paeth = Math.abs(p - a) <= Math.abs(p - b) && Math.abs(p - a) <= Math.abs(p - c)
        ? a
        : Math.abs(p - b) <= Math.abs(p - c)
        ? b
        : c;
      const predicted = [0, a, b, (a + b) >> 1, paeth][filter];
      rows[y * stride + i] = (line[i] + predicted) & 255;
    }
  }
  const pixel = (x: number, y: number) =>
    Array.from(rows.subarray((y * width + x) * channels, (y * width + x) * channels + 3));
  return { width, height, pixel };
}

const HAS_CHROMIUM = await Deno.stat(DEFAULT_CHROMIUM).then(() => true, () => false);

Deno.test({
  name: `report: renders in headless Chromium, light and dark${
    HAS_CHROMIUM ? "" : ` (ignored: ${DEFAULT_CHROMIUM} is absent; apt-get install chromium)`
  }`,
  ignore: !HAS_CHROMIUM,
}, async () => {
  const records = syntheticRun({ steps: 500, evals: 10 });
  const html = renderReport(records, { title: "chromium check" });
  assertWellFormed(html);
  const dir = await Deno.makeTempDir({ prefix: "distill-report-chromium-" });
  const htmlPath = join(dir, REPORT_FILE);
  await Deno.writeTextFile(htmlPath, html);
  const near = (a: number[], b: number[]) => a.every((v, i) => Math.abs(v - b[i]) <= 8);
  for (
    const { dark, background, firstSeries } of [
      { dark: false, background: [0xff, 0xff, 0xff], firstSeries: [0x1f, 0x6f, 0xd1] },
      { dark: true, background: [0x15, 0x18, 0x1e], firstSeries: [0x6e, 0xa8, 0xfe] },
    ]
  ) {
    const png = join(dir, dark ? "dark.png" : "light.png");
    await screenshotHtml(htmlPath, png, { dark });
    const image = await decodePng(await Deno.readFile(png));
    assert.equal(image.width, 1200);
    assert.equal(image.height, 2000);
    assert.deepEqual(image.pixel(2, 2), background, `${dark ? "dark" : "light"} background`);
    // Plots drew: the first series' colour covers many pixels (lines, dots, legends).
    let coloured = 0;
    for (let y = 0; y < image.height; y += 2) {
      for (let x = 0; x < image.width; x += 2) if (near(image.pixel(x, y), firstSeries)) coloured++;
    }
    assert.ok(coloured > 500, `${coloured} sampled pixels of the first series' colour`);
  }
  await Deno.remove(dir, { recursive: true });
});
