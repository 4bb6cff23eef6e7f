// The widget's first load: the JS and WASM a page downloads before it can prepare a JPEG,
// gzipped, against the 150 KB target. Measured, not listed: the demo page is opened in
// headless Chromium against the stub server, the 12 MP phone JPEG is added, and every static
// file the server sent until that image was ready is counted (gzip -9 of each .js and .wasm,
// as a server would send it compressed). The full decoder module must not be among them.
//
//   node tests/browser/first-load.mjs [--limit-kb 150] [--json FILE]
//
// Exits 1 over the limit (scripts/wasm-test.sh runs it after building the package, so CI fails
// when the first load grows). Last line: `N passed, M failed`.
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { PKG, SAMPLES, WWW, assert, launchChromium, reporter } from './lib.mjs';
import { startStubServer } from './stub-server.mjs';

export const FIRST_LOAD_LIMIT_KB = 150;

/** Paths served until the phone photo was prepared, with their gzipped sizes. */
export async function measureFirstLoad(browser) {
  const stub = await startStubServer({});
  const page = await browser.newPage();
  try {
    await page.goto(`${stub.url}/`, { waitUntil: 'load' });
    await page.waitForFunction(() => customElements.get('sightline-uploader') !== undefined, null, { timeout: 15000 });
    await page.locator('sightline-uploader input[type=file]').setInputFiles([{
      name: 'phone12mp.jpg', mimeType: 'image/jpeg', buffer: readFileSync(path.join(SAMPLES, 'large/phone12mp.jpg')),
    }]);
    const row = page.locator('sightline-uploader li.file[data-name="phone12mp.jpg"]');
    await row.and(page.locator('[data-state="ready"], [data-state="invalid"]')).waitFor({ timeout: 60000 });
    const state = await row.getAttribute('data-state');
    const prepared = await page.evaluate(() => {
      const item = document.querySelector('sightline-uploader').items.find((i) => i.name === 'phone12mp.jpg');
      return item && item.prepared && { width: item.prepared.width, height: item.prepared.height, path: item.prepared.path };
    });
    const files = [...new Set(stub.served)]
      .filter((p) => /\.(m?js|wasm)$/.test(p))
      .map((p) => {
        const file = p.startsWith('/pkg/') ? path.join(PKG, p.slice(5)) : path.join(WWW, p.slice(1));
        const bytes = readFileSync(file);
        return { path: p, bytes: bytes.length, gzip: gzipSync(bytes, { level: 9 }).length };
      });
    const gzip = files.reduce((n, f) => n + f.gzip, 0);
    return { state, prepared, files, gzipBytes: gzip, gzipKb: gzip / 1024 };
  } finally {
    await page.close();
    await stub.close();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = process.argv.slice(2);
  const opt = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : dflt;
  };
  const limitKb = Number(opt('--limit-kb', FIRST_LOAD_LIMIT_KB));
  const jsonOut = opt('--json', '');
  const r = reporter();
  if (!existsSync(path.join(PKG, 'sightline_light_bg.wasm'))) {
    r.fail('first load', 'wasm-client/pkg has no sightline_light_bg.wasm: run scripts/wasm-build.sh');
    process.exit(r.summary());
  }
  let browser;
  try {
    browser = await launchChromium();
    const m = await measureFirstLoad(browser);
    for (const f of m.files) console.log(`     ${f.path}: ${f.bytes} bytes, ${f.gzip} gzipped`);
    console.log(`     first load: ${m.gzipBytes} bytes gzipped (${m.gzipKb.toFixed(1)} KB), limit ${limitKb} KB`);
    if (jsonOut) writeFileSync(jsonOut, JSON.stringify(m, null, 2));
    await r.check('the widget prepares the phone JPEG with the browser\'s decoder on its first load', async () => {
      assert(m.state === 'ready', `the item ended ${m.state}`);
      assert(m.prepared && m.prepared.width === 768 && m.prepared.height === 1024,
        `prepared ${JSON.stringify(m.prepared)}`);
      assert(m.prepared.path === 'platform', `prepared by ${m.prepared.path}`);
      const full = m.files.filter((f) => f.path.includes('sightline_wasm'));
      assert(full.length === 0, `the full module was downloaded: ${full.map((f) => f.path).join(', ')}`);
    });
    await r.check(`first load (JS + WASM before a JPEG is prepared) <= ${limitKb} KB gzipped`, async () => {
      assert(m.gzipKb <= limitKb, `${m.gzipKb.toFixed(1)} KB gzipped, over ${limitKb} KB`);
    });
  } catch (err) {
    r.fail('first-load run', err && err.stack ? err.stack : String(err));
  } finally {
    if (browser) await browser.close();
  }
  process.exitCode = r.summary();
}
