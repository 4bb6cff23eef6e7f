// Benchmark of the browser package: median time of prepareImage on the 12 MP phone photo in
// headless Chromium beside the platform path measured in the same page (createImageBitmap with
// imageOrientation "from-image" → OffscreenCanvas → convertToBlob, JPEG q0.85), the .wasm size
// gzipped, and the widget's first load gzipped (JS + WASM fetched before a JPEG can be
// prepared), against the targets.
//
//   node tests/browser/bench.mjs [--runs 11] [--warmup 2] [--pkg wasm-client/pkg] [--strict] [--json FILE]
//
// Serves the package and the sample from a tiny static server on 127.0.0.1 (random port).
// --strict exits 1 when a target is not met (by default the figures are only reported).
import http from 'node:http';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import path from 'node:path';
import { PKG, ROOT, SAMPLES, launchChromium, serveStatic } from './lib.mjs';

const TARGET_MS = 150;
const TARGET_GZ_KB = 150;

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const runs = Math.max(9, Number(opt('--runs', 11)));
const warmup = Math.max(1, Number(opt('--warmup', 2)));
const pkgDir = path.resolve(ROOT, opt('--pkg', path.relative(ROOT, PKG)));
const strict = args.includes('--strict');
const jsonOut = opt('--json', '');
const samplePath = path.join(SAMPLES, 'large/phone12mp.jpg');

const wasmFile = path.join(pkgDir, 'sightline_wasm_bg.wasm');
if (!existsSync(wasmFile)) {
  console.error(`${path.relative(ROOT, wasmFile)} not found: run scripts/wasm-build.sh first`);
  process.exit(1);
}
const wasmBytes = readFileSync(wasmFile);
const gzBytes = gzipSync(wasmBytes, { level: 9 }).length;
// What a page loads before the widget can prepare a JPEG: the element, its worker, the
// wasm-bindgen glue and the .wasm (CSS excluded: it does not gate preparing).
const WWW = path.join(ROOT, 'wasm-client/www');
const firstLoad = [
  path.join(WWW, 'sightline-uploader.js'),
  path.join(WWW, 'worker.js'),
  path.join(pkgDir, 'sightline_wasm.js'),
  wasmFile,
];
const firstLoadGz = firstLoad
  .filter((f) => existsSync(f))
  .reduce((n, f) => n + gzipSync(readFileSync(f), { level: 9 }).length, 0);

const PAGE = '<!doctype html><meta charset="utf-8"><title>sightline bench</title><p>bench</p>';
const server = http.createServer((req, res) => {
  const p = new URL(req.url, 'http://x').pathname;
  if (p === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(PAGE);
    return;
  }
  if (p === '/sample.jpg') {
    const b = readFileSync(samplePath);
    res.writeHead(200, { 'content-type': 'image/jpeg', 'content-length': b.length });
    res.end(b);
    return;
  }
  if (serveStatic(req, res, [['/pkg/', pkgDir]])) return;
  res.writeHead(404);
  res.end();
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;

let browser;
let result;
try {
  browser = await launchChromium();
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/`);
  result = await page.evaluate(async ({ runs, warmup }) => {
    const t0 = performance.now();
    const m = await import('/pkg/sightline_wasm.js');
    await m.default();
    const initMs = performance.now() - t0;
    const bytes = new Uint8Array(await (await fetch('/sample.jpg')).arrayBuffer());
    const opts = { maxEdge: 1024, models: ['gpt-4.1-mini', 'gpt-4o'] };
    let last;
    for (let i = 0; i < warmup; i++) last = m.prepareImage(bytes, opts);
    const times = [];
    for (let i = 0; i < runs; i++) {
      const s = performance.now();
      last = m.prepareImage(bytes, opts);
      times.push(performance.now() - s);
    }
    // The platform path on the same bytes, back to back in the same page.
    const blob = new Blob([bytes], { type: 'image/jpeg' });
    const platform = async () => {
      const bmp = await createImageBitmap(blob, { imageOrientation: 'from-image' });
      const scale = Math.min(1, 1024 / Math.max(bmp.width, bmp.height));
      const w = Math.round(bmp.width * scale);
      const h = Math.round(bmp.height * scale);
      const canvas = new OffscreenCanvas(w, h);
      canvas.getContext('2d').drawImage(bmp, 0, 0, w, h);
      bmp.close();
      const out = await canvas.convertToBlob({ type: 'image/jpeg', quality: 0.85 });
      return { w, h, size: out.size };
    };
    for (let i = 0; i < warmup; i++) await platform();
    const platformTimes = [];
    let platformLast;
    for (let i = 0; i < runs; i++) {
      const s = performance.now();
      platformLast = await platform();
      platformTimes.push(performance.now() - s);
    }
    return {
      initMs,
      times,
      platformTimes,
      platformSize: platformLast,
      width: last.width,
      height: last.height,
      bytesAfter: last.bytesAfter,
      version: m.version(),
      userAgent: navigator.userAgent,
    };
  }, { runs, warmup });
  if (errors.length) throw new Error(errors.join('\n'));
} finally {
  if (browser) await browser.close();
  server.close();
}

const sorted = [...result.times].sort((a, b) => a - b);
const median = sorted[Math.floor(sorted.length / 2)];
const p90 = sorted[Math.min(sorted.length - 1, Math.ceil(sorted.length * 0.9) - 1)];
const gzKb = gzBytes / 1024;
const psorted = [...result.platformTimes].sort((a, b) => a - b);
const platformMedian = psorted[Math.floor(psorted.length / 2)];
const firstLoadKb = firstLoadGz / 1024;
const timeMet = median <= TARGET_MS;
const sizeMet = gzKb <= TARGET_GZ_KB;

console.log(`browser:   ${result.userAgent.match(/(Headless)?Chrome\/[\d.]+/)?.[0] || result.userAgent}`);
console.log(`package:   ${path.relative(ROOT, pkgDir)} (simd: ${result.version.simd}), init ${result.initMs.toFixed(0)} ms`);
console.log(`input:     ${path.relative(ROOT, samplePath)} (${(readFileSync(samplePath).length / 1048576).toFixed(1)} MB, 4032×3024, EXIF 6)`);
console.log(`output:    ${result.width}×${result.height}, ${result.bytesAfter} bytes`);
console.log(`prepareImage over ${runs} runs after ${warmup} warm-up: median ${median.toFixed(1)} ms, min ${sorted[0].toFixed(1)} ms, p90 ${p90.toFixed(1)} ms`);
console.log(`  runs: ${result.times.map((t) => t.toFixed(0)).join(' ')}`);
console.log(`wasm size: ${wasmBytes.length} bytes raw (${(wasmBytes.length / 1024).toFixed(0)} KB), ${gzBytes} bytes gzipped (${gzKb.toFixed(1)} KB)`);
console.log(`platform path (createImageBitmap + OffscreenCanvas.convertToBlob): median ${platformMedian.toFixed(1)} ms (${result.platformSize.w}×${result.platformSize.h}, ${result.platformSize.size} bytes); prepareImage / platform = ${(median / platformMedian).toFixed(2)}`);
console.log(`first load (uploader + worker + glue + wasm), gzipped: ${firstLoadKb.toFixed(1)} KB`);
console.log(`target: median <= ${TARGET_MS} ms: ${timeMet ? 'met' : 'NOT met'} (${median.toFixed(1)} ms)`);
console.log(`target: wasm gzipped <= ${TARGET_GZ_KB} KB: ${sizeMet ? 'met' : 'NOT met'} (${gzKb.toFixed(1)} KB)`);
if (jsonOut) {
  writeFileSync(jsonOut, JSON.stringify({
    medianMs: median, minMs: sorted[0], p90Ms: p90, runs: result.times, wasmBytes: wasmBytes.length,
    platformMedianMs: platformMedian, platformRuns: result.platformTimes, firstLoadGzipBytes: firstLoadGz,
    wasmGzipBytes: gzBytes, simd: result.version.simd, targets: { ms: TARGET_MS, gzKb: TARGET_GZ_KB },
  }, null, 2));
}
const unmet = (timeMet ? 0 : 1) + (sizeMet ? 0 : 1);
console.log(`targets: ${2 - unmet} of 2 met`);
process.exitCode = strict && unmet ? 1 : 0;
