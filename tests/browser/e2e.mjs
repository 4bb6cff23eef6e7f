// Browser end-to-end test of the widget against a running `sightline serve`.
//
//   SIGHTLINE_URL=http://127.0.0.1:8787 node tests/browser/e2e.mjs
//
// Starts nothing but Chromium. Env: SIGHTLINE_URL (required), SIGHTLINE_API_KEY (default: the
// key in the demo page, sightline-local-key), SIGHTLINE_E2E_TIMEOUT_MS (per-run analysis wait,
// default 180000). Opens /, adds phone12mp.jpg, two small samples and a text file through the
// widget's file input, checks the in-browser estimates, uploads, waits for every analysis,
// checks the cost panel and saves target/browser/e2e.png. Last line: `N passed, M failed`.
import path from 'node:path';
import { ROOT, assert, ensureDir, launchChromium, reporter } from './lib.mjs';
import { addAndCheckEstimates, checkCosts, openWidget, uploadAndWait, watchPage } from './flow.mjs';

const t = reporter();
const base = (process.env.SIGHTLINE_URL || '').replace(/\/+$/, '');
const apiKey = process.env.SIGHTLINE_API_KEY || '';
const timeout = Number(process.env.SIGHTLINE_E2E_TIMEOUT_MS || 180000);

async function preflight() {
  const get = async (p, headers = {}) => {
    const r = await fetch(`${base}${p}`, { headers, signal: AbortSignal.timeout(10000) });
    return r;
  };
  let ok = await t.check('the server serves the widget, its worker and the WASM package', async () => {
    for (const p of ['/', '/sightline-uploader.js', '/worker.js', '/pkg/sightline_wasm.js', '/pkg/sightline_wasm_bg.wasm']) {
      const r = await get(p);
      assert(r.ok, `GET ${p}: HTTP ${r.status}`);
      if (p.endsWith('.wasm')) {
        const type = r.headers.get('content-type') || '';
        assert(type.startsWith('application/wasm'), `GET ${p}: content-type ${type} (want application/wasm for streaming compilation)`);
      }
      await r.arrayBuffer();
    }
  });
  ok = (await t.check('the API answers with the key', async () => {
    const r = await get('/v1/costs', { 'x-api-key': apiKey || 'sightline-local-key' });
    assert(r.ok, `GET /v1/costs: HTTP ${r.status} ${await r.text()}`);
  })) && ok;
  return ok;
}

if (!base) {
  t.fail('SIGHTLINE_URL', 'set SIGHTLINE_URL to the base URL of a running `sightline serve`');
  process.exit(t.summary());
}

let browser;
try {
  if (!(await preflight())) throw new Error(`the server at ${base} is not usable; later checks not run`);
  browser = await launchChromium();
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  const problems = watchPage(page);
  if (!(await t.check('the demo page loads the element and the WASM worker', () => openWidget(page, base, { apiKey })))) {
    throw new Error('the widget did not load; later checks not run');
  }
  const names = await addAndCheckEstimates(page, t.check);
  await uploadAndWait(page, names, t.check, { timeout });
  await checkCosts(page, t.check);
  await t.check('done images show similar images whose thumbnails load from the server (signed local URLs)', async () => {
    const thumbs = page.locator('sightline-uploader [data-role="similar"] img');
    await thumbs.first().waitFor({ timeout: 30000 });
    const src = await thumbs.first().getAttribute('src');
    assert(src.includes('/local-download/'), `thumbnail URL ${src}`);
    const width = await thumbs.first().evaluate(async (img) => { await img.decode(); return img.naturalWidth; });
    assert(width > 0, 'the thumbnail did not load');
  });
  await t.check('no CSP violations or page errors', () => assert(problems.length === 0, problems.join('\n')));
  const shot = path.join(ROOT, 'target/browser/e2e.png');
  await ensureDir(path.dirname(shot));
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${path.relative(ROOT, shot)}`);
} catch (err) {
  t.fail('e2e run', err && err.stack ? err.stack : String(err));
} finally {
  if (browser) await browser.close();
}
process.exitCode = t.summary();
