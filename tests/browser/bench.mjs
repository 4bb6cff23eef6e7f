// Benchmark of the browser package: median time of the widget's prepareImage
// (wasm-client/www/prepare.js: the small module's rules, the browser's decoder) on the 12 MP
// phone photo in headless Chromium, beside the platform path in the same page, the runs of the
// two interleaved (createImageBitmap with imageOrientation "from-image" → OffscreenCanvas →
// convertToBlob, JPEG q0.85), and the full module's prepareImage (the lazy fallback) for
// reference; the widget's first load gzipped (JS + WASM fetched before a JPEG can be prepared,
// measured by tests/browser/first-load.mjs), against the targets.
//
//   node tests/browser/bench.mjs [--runs 11] [--warmup 2] [--pkg wasm-client/pkg] [--strict] [--json FILE]
//
// Serves the package and the sample from a tiny static server on 127.0.0.1 (random port).
// --strict exits 1 when a target is not met (by default the figures are only reported).
import http from 'node:http';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import path from 'node:path';
import { PKG, ROOT, SAMPLES, WWW, launchChromium, serveStatic } from './lib.mjs';
import { FIRST_LOAD_LIMIT_KB, measureFirstLoad } from './first-load.mjs';

// prepareImage median ≤ the platform path's (ratio ≤ 1), first load ≤ 150 KB gzipped.
const TARGET_RATIO = 1;
const TARGET_GZ_KB = FIRST_LOAD_LIMIT_KB;

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
const lightFile = path.join(pkgDir, 'sightline_light_bg.wasm');
for (const f of [wasmFile, lightFile]) {
  if (!existsSync(f)) {
    console.error(`${path.relative(ROOT, f)} not found: run scripts/wasm-build.sh first`);
    process.exit(1);
  }
}
const wasmBytes = readFileSync(wasmFile);
const gzBytes = gzipSync(wasmBytes, { level: 9 }).length;
const lightBytes = readFileSync(lightFile);
const lightGz = gzipSync(lightBytes, { level: 9 }).length;

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
  if (serveStatic(req, res, [['/pkg/', pkgDir], ['/www/', WWW]])) return;
  res.writeHead(404);
  res.end();
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;

let browser;
let result;
let firstLoad;
try {
  browser = await launchChromium();
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/`);
  result = await page.evaluate(async ({ runs, warmup }) => {
    const t0 = performance.now();
    const m = await import('/www/prepare.js');
    await m.ready();
    const initMs = performance.now() - t0;
    const full = await m.loadFull();
    const bytes = new Uint8Array(await (await fetch('/sample.jpg')).arrayBuffer());
    const opts = { maxEdge: 1024, models: ['gpt-4.1-mini', 'gpt-4o'] };
    // The platform path on the same bytes, in the same page.
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
    let last;
    let platformLast;
    for (let i = 0; i < warmup; i++) {
      last = await m.prepareImage(bytes, opts);
      platformLast = await platform();
    }
    // Interleaved, so that both see the same machine load.
    const times = [];
    const platformTimes = [];
    for (let i = 0; i < runs; i++) {
      let s = performance.now();
      last = await m.prepareImage(bytes, opts);
      times.push(performance.now() - s);
      s = performance.now();
      platformLast = await platform();
      platformTimes.push(performance.now() - s);
    }
    // The full module (the widget's lazy fallback), for reference.
    let fullLast;
    for (let i = 0; i < warmup; i++) fullLast = full.prepareImage(bytes, opts);
    const fullTimes = [];
    for (let i = 0; i < runs; i++) {
      const s = performance.now();
      fullLast = full.prepareImage(bytes, opts);
      fullTimes.push(performance.now() - s);
    }
    return {
      initMs,
      times,
      platformTimes,
      fullTimes,
      platformSize: platformLast,
      width: last.width,
      height: last.height,
      bytesAfter: last.bytesAfter,
      path: last.path,
      via: last.via,
      fullSize: { w: fullLast.width, h: fullLast.height, size: fullLast.bytesAfter },
      version: full.version(),
      userAgent: navigator.userAgent,
    };
  }, { runs, warmup });
  if (errors.length) throw new Error(errors.join('\n'));
  firstLoad = await measureFirstLoad(browser);
} finally {
  if (browser) await browser.close();
  server.close();
}

const med = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const sorted = [...result.times].sort((a, b) => a - b);
const median = sorted[Math.floor(sorted.length / 2)];
const p90 = sorted[Math.min(sorted.length - 1, Math.ceil(sorted.length * 0.9) - 1)];
const gzKb = gzBytes / 1024;
const platformMedian = med(result.platformTimes);
const fullMedian = med(result.fullTimes);
const ratio = median / platformMedian;
const firstLoadKb = firstLoad.gzipKb;
const timeMet = ratio <= TARGET_RATIO;
const sizeMet = firstLoadKb <= TARGET_GZ_KB;

console.log(`browser:   ${result.userAgent.match(/(Headless)?Chrome\/[\d.]+/)?.[0] || result.userAgent}`);
console.log(`package:   ${path.relative(ROOT, pkgDir)} (simd: ${result.version.simd}), small module init ${result.initMs.toFixed(0)} ms`);
console.log(`input:     ${path.relative(ROOT, samplePath)} (${(readFileSync(samplePath).length / 1048576).toFixed(1)} MB, 4032×3024, EXIF 6)`);
console.log(`output:    ${result.width}×${result.height}, ${result.bytesAfter} bytes (path ${result.path} via ${result.via})`);
console.log(`prepareImage over ${runs} runs after ${warmup} warm-up: median ${median.toFixed(1)} ms, min ${sorted[0].toFixed(1)} ms, p90 ${p90.toFixed(1)} ms`);
console.log(`  runs: ${result.times.map((t) => t.toFixed(0)).join(' ')}`);
console.log(`platform path (createImageBitmap + OffscreenCanvas.convertToBlob), interleaved: median ${platformMedian.toFixed(1)} ms (${result.platformSize.w}×${result.platformSize.h}, ${result.platformSize.size} bytes)`);
console.log(`  runs: ${result.platformTimes.map((t) => t.toFixed(0)).join(' ')}`);
console.log(`prepareImage / platform = ${ratio.toFixed(2)}`);
console.log(`full module prepareImage (lazy fallback): median ${fullMedian.toFixed(1)} ms (${result.fullSize.w}×${result.fullSize.h}, ${result.fullSize.size} bytes); full / platform = ${(fullMedian / platformMedian).toFixed(2)}`);
console.log(`small module: ${lightBytes.length} bytes raw, ${lightGz} gzipped (${(lightGz / 1024).toFixed(1)} KB); full module: ${wasmBytes.length} bytes raw, ${gzBytes} gzipped (${gzKb.toFixed(1)} KB), loaded only when needed`);
console.log(`first load (measured: ${firstLoad.files.map((f) => path.basename(f.path)).join(', ')}), gzipped: ${firstLoadKb.toFixed(1)} KB`);
console.log(`target: prepareImage median <= platform path median: ${timeMet ? 'met' : 'NOT met'} (ratio ${ratio.toFixed(2)})`);
console.log(`target: first load <= ${TARGET_GZ_KB} KB gzipped: ${sizeMet ? 'met' : 'NOT met'} (${firstLoadKb.toFixed(1)} KB)`);
if (jsonOut) {
  writeFileSync(jsonOut, JSON.stringify({
    medianMs: median, minMs: sorted[0], p90Ms: p90, runs: result.times, platformMedianMs: platformMedian,
    platformRuns: result.platformTimes, ratio, fullMedianMs: fullMedian, fullRuns: result.fullTimes,
    firstLoadGzipBytes: firstLoad.gzipBytes, firstLoadFiles: firstLoad.files, lightWasmBytes: lightBytes.length,
    lightWasmGzipBytes: lightGz, wasmBytes: wasmBytes.length, wasmGzipBytes: gzBytes, simd: result.version.simd,
    targets: { ratio: TARGET_RATIO, firstLoadGzKb: TARGET_GZ_KB },
  }, null, 2));
}
const unmet = (timeMet ? 0 : 1) + (sizeMet ? 0 : 1);
console.log(`targets: ${2 - unmet} of 2 met`);
process.exitCode = strict && unmet ? 1 : 0;
