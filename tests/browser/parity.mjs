// Browser ↔ CLI parity: the widget's prepareImage (wasm-client/www/prepare.js: the small
// WebAssembly module's rules with the browser's decoder, the full module where it routes there)
// gives the sizes and estimates of `sightline estimate --json` for the same file and models,
// token for token and to the last bit of the f64 cost; EXIF orientations 1-8 come out upright
// (pixels compared with the full module, the server's code) and without metadata.
//
//   SIGHTLINE_BIN=target/debug/sightline node tests/browser/parity.mjs [--pkg wasm-client/pkg]
//
// Runs the fixtures below through wasm-client/pkg in headless Chromium (served from 127.0.0.1)
// and through the CLI (clean environment: no SIGHTLINE_* variables, no sightline.toml), for
// every model in the price table, and compares sizes, tokens, costs, batch costs and the price
// version. A negative control checks that the comparison would catch a widget counting one
// prompt token more than the server.
//
// The resized JPEG's bytes are reported, not compared: the browser encodes with its own
// encoder, the native server with libjpeg-turbo (4:2:0 chroma at the default quality), so the
// files differ while their size in pixels, and so the estimate, is the same. The server
// estimates from its own resize anyway.
import http from 'node:http';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PKG, ROOT, SAMPLES, WWW, assert, launchChromium, reporter, serveStatic } from './lib.mjs';

// A 12 MP phone photo stored landscape with EXIF orientation 6 (portrait once upright), a
// progressive JPEG, two PNGs, a small JPEG, and desktop photos that carry EXIF.
const FIXTURES = [
  'large/phone12mp.jpg',
  'large/elephants_progressive.jpg',
  'samples/coffee.png',
  'samples/astronaut.png',
  'samples/rocket.jpg',
  'photos/Storm.jpg',
  'photos/Garden.jpg',
  '../fixtures-icc/cmyk_astronaut.jpg',
  '../fixtures-icc/p3_patches.png',
];
// Every fixture but these goes through the browser's decoder: CMYK ink is converted through
// its profile by the server's code (the full module).
const FULL_MODULE = new Set(['../fixtures-icc/cmyk_astronaut.jpg']);

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const pkgDir = path.resolve(ROOT, opt('--pkg', path.relative(ROOT, PKG)));
const bin = path.resolve(ROOT, process.env.SIGHTLINE_BIN
  || path.join(process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target'), 'debug/sightline'));

if (!existsSync(path.join(pkgDir, 'sightline_wasm_bg.wasm'))) {
  console.error(`${path.relative(ROOT, pkgDir)} has no build: run scripts/wasm-build.sh first`);
  process.exit(1);
}
if (!existsSync(bin)) {
  console.error(`${bin} not found: build the CLI (cargo build -p sightline) or set SIGHTLINE_BIN`);
  process.exit(1);
}

// The CLI as a user with no configuration runs it: the defaults are what the widget assumes.
const work = mkdtempSync(path.join(tmpdir(), 'sightline-parity-'));
const cliEnv = Object.fromEntries(Object.entries(process.env)
  .filter(([k]) => !k.startsWith('SIGHTLINE_') && !k.startsWith('OPENAI_')));
function cli(...cliArgs) {
  return execFileSync(bin, ['--data-dir', path.join(work, 'data'), ...cliArgs], {
    cwd: work, env: cliEnv, encoding: 'utf8', maxBuffer: 64 << 20,
  });
}

const r = reporter();
// A photo stored under each EXIF orientation 1-8 (an APP1 segment inserted after SOI).
function withExifOrientation(jpeg, o) {
  const tiff = Buffer.from([0x4d, 0x4d, 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, o, 0, 0, 0, 0, 0, 0]);
  const body = Buffer.concat([Buffer.from('Exif\0\0', 'latin1'), tiff]);
  const len = Buffer.alloc(2);
  len.writeUInt16BE(body.length + 2);
  return Buffer.concat([jpeg.subarray(0, 2), Buffer.from([0xff, 0xe1]), len, body, jpeg.subarray(2)]);
}
const ORIENTED = [1, 2, 3, 4, 5, 6, 7, 8].map((o) => `oriented/rocket-exif${o}.jpg`);
{
  const rocket = readFileSync(path.join(SAMPLES, 'samples/rocket.jpg')); // no EXIF of its own
  mkdirSync(path.join(work, 'oriented'), { recursive: true });
  for (const [i, f] of ORIENTED.entries()) writeFileSync(path.join(work, f), withExifOrientation(rocket, i + 1));
}
FIXTURES.push(...ORIENTED);
const files = FIXTURES.map((f) => (f.startsWith('oriented/') ? path.join(work, f) : path.join(SAMPLES, f)));

const table = JSON.parse(cli('models', '--json'));
const modelIds = table.models.map((m) => m.id);
/** `sightline [flags] estimate --json` for every file and model: `${file}\n${model}` → row. */
function cliEstimates(...flags) {
  const rows = new Map();
  const out = cli(...flags, 'estimate', '--json', '--models', modelIds.join(','), ...files);
  for (const line of out.trim().split('\n')) {
    const row = JSON.parse(line);
    if (row.error) throw new Error(`sightline estimate failed on ${row.file}: ${row.error}`);
    rows.set(`${row.file}\n${row.model}`, row);
  }
  return rows;
}
const cliRows = cliEstimates();
// The same with `--detail low` (the widget's `detail: 'low'`).
const cliRowsLow = cliEstimates('--detail', 'low');

const server = http.createServer((req, res) => {
  const p = new URL(req.url, 'http://x').pathname;
  if (p === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end('<!doctype html><meta charset="utf-8"><title>sightline parity</title><p>parity</p>');
    return;
  }
  if (p.startsWith('/fixtures/oriented/') && serveStatic(req, res, [['/fixtures/', work]])) return;
  if (serveStatic(req, res, [['/pkg/', pkgDir], ['/www/', WWW], ['/fixtures/', SAMPLES],
    ['/fixtures-icc/', path.join(SAMPLES, '../fixtures-icc')]])) return;
  res.writeHead(404);
  res.end();
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const base = `http://127.0.0.1:${server.address().port}`;

const fixtureUrl = (f) => (f.startsWith('../') ? f.slice(2) : `/fixtures/${f}`);

/** What a widget showed for one file: everything but the JPEG bytes (their length, hash and
 * the metadata segments left in them). */
async function widgetRun(page, fixture, extraOptions = {}) {
  return page.evaluate(async ({ url, models, extraOptions }) => {
    const m = await import('/www/prepare.js');
    const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
    const out = await m.prepareImage(bytes, { models, ...extraOptions });
    const { jpeg, ...rest } = out;
    // Marker segments before the first scan: APPn (metadata) ones other than JFIF APP0.
    const meta = [];
    for (let i = 2; i + 4 <= jpeg.length && jpeg[i] === 0xff;) {
      const marker = jpeg[i + 1];
      const len = (jpeg[i + 2] << 8) | jpeg[i + 3];
      if (marker === 0xda) break;
      if (marker >= 0xe1 && marker <= 0xef) meta.push(marker.toString(16));
      i += 2 + len;
    }
    return { ...rest, jpegLength: jpeg.length, meta };
  }, { url: fixtureUrl(fixture), models: modelIds, extraOptions });
}

/** Every mismatch between the widget's figures and the CLI's rows for one file. */
function compare(file, w, notes = [], rows = cliRows) {
  const diffs = [];
  const eq = (what, widget, cliValue) => {
    // Exact: same integers, and the same f64 (JSON carries f64 losslessly both ways).
    if (!Object.is(widget, cliValue)) diffs.push(`${what}: widget ${widget} != cli ${cliValue}`);
  };
  eq('estimates', w.estimates.length, modelIds.length);
  const first = rows.get(`${file}\n${modelIds[0]}`);
  if (first && w.bytesAfter !== first.resized.bytes) {
    notes.push(`resized JPEG ${w.bytesAfter} bytes in the browser, ${first.resized.bytes} from the CLI`);
  }
  for (const e of w.estimates) {
    const row = rows.get(`${file}\n${e.model}`);
    if (!row) {
      diffs.push(`${e.model}: no CLI row`);
      continue;
    }
    const m = e.model;
    eq(`${m} resized width`, w.width, row.resized.width);
    eq(`${m} resized height`, w.height, row.resized.height);
    eq(`${m} original width`, w.originalWidth, row.original.width);
    eq(`${m} original height`, w.originalHeight, row.original.height);
    eq(`${m} original bytes`, w.bytesBefore, row.original.bytes);
    eq(`${m} image tokens`, e.imageTokens, row.resized.image_tokens);
    eq(`${m} input tokens`, e.inputTokens, row.resized.input_tokens);
    eq(`${m} output tokens`, e.outputTokens, row.resized.output_tokens);
    eq(`${m} total tokens`, e.tokens, row.resized.tokens);
    eq(`${m} cost`, e.costUsd, row.resized.cost_usd);
    eq(`${m} cost in cents`, Math.round(e.costUsd * 100), Math.round(row.resized.cost_usd * 100));
    eq(`${m} batch cost`, e.batchCostUsd, row.resized.batch_cost_usd);
    eq(`${m} original image tokens`, e.originalImageTokens, row.original.image_tokens);
    eq(`${m} original total tokens`, e.originalTokens, row.original.tokens);
    eq(`${m} original cost`, e.originalCostUsd, row.original.cost_usd);
    eq(`${m} original batch cost`, e.originalBatchCostUsd, row.original.batch_cost_usd);
    eq(`${m} price version`, e.priceVersion, row.price_version);
    eq(`${m} package price version`, w.priceVersion, row.price_version);
  }
  return diffs;
}

let browser;
try {
  browser = await launchChromium();
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/`);

  await r.check('the package and the CLI read the same price table', async () => {
    const wasm = await page.evaluate(async () => {
      const m = await import('/www/prepare.js');
      await m.ready();
      return m.models();
    });
    assert(wasm.version === table.version, `version: package ${wasm.version}, cli ${table.version}`);
    assert(JSON.stringify(wasm.models.map((m) => m.id)) === JSON.stringify(modelIds),
      `models: package ${wasm.models.map((m) => m.id)}, cli ${modelIds}`);
    for (const [i, m] of table.models.entries()) {
      const w = wasm.models[i];
      for (const [js, rs] of [['inputPerMtok', 'input_per_mtok'], ['cachedInputPerMtok', 'cached_input_per_mtok'],
        ['outputPerMtok', 'output_per_mtok'], ['batchInputPerMtok', 'batch_input_per_mtok'],
        ['batchOutputPerMtok', 'batch_output_per_mtok']]) {
        assert(Object.is(w[js], m[rs]), `${m.id} ${rs}: package ${w[js]}, cli ${m[rs]}`);
      }
      assert(w.imageRule === m.image.rule, `${m.id} image rule: package ${w.imageRule}, cli ${m.image.rule}`);
    }
  });

  const runs = new Map();
  for (const [i, fixture] of FIXTURES.entries()) {
    const file = files[i];
    const want = FULL_MODULE.has(fixture) ? 'wasm' : 'platform';
    await r.check(`${fixture}: prepareImage (${want}) = sightline estimate --json for ${modelIds.length} models`, async () => {
      const w = await widgetRun(page, fixture);
      runs.set(fixture, w);
      const notes = [`path ${w.path}${w.via ? ` via ${w.via}` : ''}${w.reason ? ` (${w.reason})` : ''}`];
      const diffs = compare(file, w, notes);
      console.log(`     note: ${notes.join('; ')}`);
      assert(w.path === want, `path ${w.path}, expected ${want} (${w.reason || ''})`);
      assert(w.meta.length === 0, `metadata segments left in the JPEG: APP ${w.meta.join(', ')}`);
      assert(diffs.length === 0, `${diffs.length} differences:\n${diffs.slice(0, 12).join('\n')}`);
    });
  }

  await r.check('EXIF orientations 1-8: the browser\'s picture is the server\'s, upright (pixels vs the full module)', async () => {
    const diffs = await page.evaluate(async (fixtures) => {
      const m = await import('/www/prepare.js');
      const pixels = async (jpeg) => {
        const bmp = await createImageBitmap(new Blob([jpeg], { type: 'image/jpeg' }));
        const c = new OffscreenCanvas(bmp.width, bmp.height);
        c.getContext('2d').drawImage(bmp, 0, 0);
        return { w: bmp.width, h: bmp.height, data: c.getContext('2d').getImageData(0, 0, bmp.width, bmp.height).data };
      };
      const meanDiff = (a, b) => {
        if (a.w !== b.w || a.h !== b.h) return Infinity;
        let d = 0;
        for (let i = 0; i < a.data.length; i += 4) {
          d += Math.abs(a.data[i] - b.data[i]) + Math.abs(a.data[i + 1] - b.data[i + 1]) + Math.abs(a.data[i + 2] - b.data[i + 2]);
        }
        return d / (a.data.length * 0.75);
      };
      const out = [];
      let upright1;
      for (const [i, f] of fixtures.entries()) {
        const bytes = new Uint8Array(await (await fetch(`/fixtures/${f}`)).arrayBuffer());
        const platform = await m.prepareImage(bytes, { maxEdge: 256 });
        const server = await m.prepareImage(bytes, { maxEdge: 256, path: 'wasm' });
        const a = await pixels(platform.jpeg);
        const b = await pixels(server.jpeg);
        if (i === 0) upright1 = b;
        out.push({ o: i + 1, path: platform.path, size: `${a.w}x${a.h}`, diff: meanDiff(a, b),
          // The control: the same picture against the unrotated one (orientation 1).
          vsOne: i === 0 ? 0 : meanDiff(a, upright1.w === a.w ? upright1 : { w: -1 }) });
      }
      return out;
    }, ORIENTED.map((f) => f));
    for (const d of diffs) {
      console.log(`     orientation ${d.o}: ${d.path} ${d.size}, mean |diff| vs the full module ${d.diff.toFixed(2)}, vs orientation 1 ${d.vsOne === Infinity ? 'other size' : d.vsOne.toFixed(2)}`);
      assert(d.path === 'platform', `orientation ${d.o} went to ${d.path}`);
      assert(d.diff < 8, `orientation ${d.o}: mean difference ${d.diff.toFixed(2)} from the server's picture`);
      if (d.o > 1) assert(d.vsOne > 10, `orientation ${d.o} looks like orientation 1 (${d.vsOne.toFixed(2)}): the control cannot tell`);
    }
  });

  for (const i of [0, 2]) {
    await r.check(`${FIXTURES[i]}: detail low in the widget = sightline --detail low estimate`, async () => {
      const w = await widgetRun(page, FIXTURES[i], { detail: 'low' });
      const diffs = compare(files[i], w, [], cliRowsLow);
      assert(diffs.length === 0, `${diffs.length} differences:\n${diffs.slice(0, 12).join('\n')}`);
      const gpt4o = w.estimates.find((e) => e.model === 'gpt-4o');
      assert(gpt4o && gpt4o.imageTokens === 85, `gpt-4o low = 85 image tokens, got ${gpt4o?.imageTokens}`);
    });
  }

  await r.check('the 12 MP phone photo comes out upright 768x1024 in both', async () => {
    const w = runs.get('large/phone12mp.jpg');
    assert(w, 'no widget run');
    assert(w.orientation === 6, `orientation ${w.orientation}`);
    assert(w.width === 768 && w.height === 1024, `${w.width}x${w.height}`);
    assert(w.originalWidth === 3024 && w.originalHeight === 4032, `${w.originalWidth}x${w.originalHeight}`);
  });

  await r.check('the comparison catches a widget counting one prompt token more (negative control)', async () => {
    const fixture = FIXTURES[2];
    const row = cliRows.get(`${files[2]}\n${modelIds[0]}`);
    const promptTokens = row.resized.input_tokens - row.resized.image_tokens + 1;
    const w = await widgetRun(page, fixture, { promptTokens });
    const diffs = compare(files[2], w);
    assert(diffs.some((d) => d.includes('input tokens')), `not caught: ${diffs.join('; ') || 'no differences'}`);
    assert(diffs.some((d) => d.includes(' cost:')), `cost difference not caught: ${diffs.join('; ')}`);
  });

  if (errors.length) r.fail('no page errors', errors.join('\n'));
} catch (err) {
  r.fail('parity run', err && err.stack ? err.stack : String(err));
} finally {
  if (browser) await browser.close();
  server.close();
  rmSync(work, { recursive: true, force: true });
}
process.exitCode = r.summary();
