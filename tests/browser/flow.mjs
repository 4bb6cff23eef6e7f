// The widget flow shared by e2e.mjs (against `sightline serve`) and widget.mjs (against the
// stub): open the page, add files, check the estimates, upload, wait for the analyses, check
// the cost panel, take a screenshot.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { SAMPLES, assert } from './lib.mjs';

export const GOOD_FILES = [
  path.join(SAMPLES, 'large/phone12mp.jpg'),
  path.join(SAMPLES, 'samples/rocket.jpg'),
  path.join(SAMPLES, 'samples/coffee.png'),
];
export const TEXT_FILE = {
  name: 'notes.txt',
  mimeType: 'text/plain',
  buffer: Buffer.from('These are my notes, not an image.\n'),
};

export function fileRow(page, name) {
  return page.locator(`sightline-uploader li.file[data-name="${name}"]`);
}

/** Record console errors, page errors and CSP violations. */
export function watchPage(page) {
  const problems = [];
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    const t = m.text();
    if (m.type() === 'error' || /Content Security Policy|Refused to/i.test(t)) {
      // 4xx answers the tests provoke on purpose show up as console errors in Chromium.
      if (/Failed to load resource: the server responded with a status of (4|5)\d\d/.test(t)) return;
      problems.push(`console ${m.type()}: ${t}`);
    }
  });
  return problems;
}

export async function openWidget(page, baseUrl, { apiKey } = {}) {
  const url = new URL('/', baseUrl);
  if (apiKey) url.searchParams.set('api-key', apiKey);
  await page.goto(url.href, { waitUntil: 'load' });
  await page.waitForFunction(() => customElements.get('sightline-uploader') !== undefined, null, { timeout: 15000 });
  // The worker answers `models` once the WASM is loaded: the price-version line appears.
  await page.locator('sightline-uploader .price-version').filter({ hasText: 'Prices as of' }).waitFor({ timeout: 30000 });
}

/** Add the good files and the text file; check the estimates. Returns the models shown. */
export async function addAndCheckEstimates(page, check) {
  const input = page.locator('sightline-uploader input[type=file]');
  // Playwright does not mix paths and buffers in one call: read the samples.
  const good = GOOD_FILES.map((f) => ({
    name: path.basename(f),
    mimeType: f.endsWith('.png') ? 'image/png' : 'image/jpeg',
    buffer: readFileSync(f),
  }));
  await input.setInputFiles([...good, TEXT_FILE]);
  const names = GOOD_FILES.map((f) => path.basename(f));

  await check('every image is prepared in the browser', async () => {
    for (const n of names) {
      await fileRow(page, n).and(page.locator('[data-state="ready"]')).waitFor({ timeout: 60000 });
    }
  });

  await check('phone12mp.jpg is shown upright at 768×1024 with a token and cost estimate', async () => {
    const row = fileRow(page, 'phone12mp.jpg');
    const dims = row.locator('[data-role="dims"]');
    assert(await dims.getAttribute('data-width') === '768', `width ${await dims.getAttribute('data-width')}`);
    assert(await dims.getAttribute('data-height') === '1024', `height ${await dims.getAttribute('data-height')}`);
    const text = await dims.textContent();
    assert(text.includes('3024×4032 → 768×1024'), `dims text: ${text}`);
    const rows = row.locator('.estimates tbody tr');
    const n = await rows.count();
    assert(n >= 1, 'no estimate rows');
    for (let i = 0; i < n; i++) {
      const tokens = Number(await rows.nth(i).locator('td[data-tokens]').getAttribute('data-tokens'));
      const cost = Number(await rows.nth(i).locator('td[data-cost]').getAttribute('data-cost'));
      assert(tokens > 0 && cost > 0, `row ${i}: tokens ${tokens}, cost ${cost}`);
    }
    const img = row.locator('.thumb img');
    assert(await img.count() === 1, 'no preview');
    assert((await img.getAttribute('src')).startsWith('blob:'), 'preview is not an object URL');
    const natural = await img.evaluate((i) => i.complete && [i.naturalWidth, i.naturalHeight]);
    assert(natural && natural[0] === 768 && natural[1] === 1024, `preview is ${natural}`);
  });

  await check('the non-image shows a clear per-file error', async () => {
    const row = fileRow(page, 'notes.txt');
    await row.and(page.locator('[data-state="invalid"]')).waitFor({ timeout: 30000 });
    const err = row.locator('[data-role="error"]');
    assert(await err.getAttribute('data-code') === 'not_an_image', `code ${await err.getAttribute('data-code')}`);
    assert(/not an image/i.test(await err.textContent()), await err.textContent());
  });

  await check('the batch total is shown before upload', async () => {
    const items = page.locator('sightline-uploader .batch-models li');
    assert(await items.count() >= 1, 'no batch total');
    const cost = Number(await items.first().getAttribute('data-cost'));
    assert(cost > 0, `batch cost ${cost}`);
    const head = await page.locator('sightline-uploader .batch-head').textContent();
    assert(head.includes(`${names.length} ready`), head);
  });
  return names;
}

export async function uploadAndWait(page, names, check, { timeout = 120000 } = {}) {
  await check('Upload sends every prepared image', async () => {
    const button = page.locator('sightline-uploader button.primary');
    assert(await button.isEnabled(), 'Upload is disabled');
    await button.click();
    await page.locator('sightline-uploader li.file[data-state="ready"]').first().waitFor({ state: 'detached', timeout: 10000 })
      .catch(() => {});
  });

  await check('every good image ends done with an analysis', async () => {
    const deadline = Date.now() + timeout;
    for (const n of names) {
      const row = fileRow(page, n);
      for (;;) {
        const state = await row.getAttribute('data-state');
        if (state === 'done') break;
        if (['failed', 'upload_error', 'stalled', 'invalid'].includes(state)) {
          const err = await row.locator('[data-role="error"]').textContent();
          throw new Error(`${n} ended ${state}: ${err}`);
        }
        if (Date.now() > deadline) throw new Error(`${n} still ${state} after ${timeout} ms`);
        await page.waitForTimeout(250);
      }
      const desc = await row.locator('[data-role="description"]').textContent();
      assert(desc && desc.trim().length > 0, `${n}: empty description`);
      const cost = await row.locator('[data-role="real-cost"]').getAttribute('data-cost');
      assert(cost !== null && Number(cost) >= 0, `${n}: no real cost`);
    }
  });

  await check('the non-image stayed out of the upload', async () => {
    const state = await fileRow(page, 'notes.txt').getAttribute('data-state');
    assert(state === 'invalid', `notes.txt is ${state}`);
  });
}

export async function checkCosts(page, check) {
  await check('the cost panel shows a total > 0 or a by-model bar', async () => {
    const costs = page.locator('sightline-uploader section.costs');
    const deadline = Date.now() + 20000;
    for (;;) {
      const total = Number(await costs.getAttribute('data-total'));
      const bars = await costs.locator('svg rect.bar').count();
      if (total > 0 || bars > 0) return;
      if (Date.now() > deadline) {
        throw new Error(`cost panel: ${await costs.locator('.cost-total').textContent()}`);
      }
      await page.locator('sightline-uploader .costs button').click();
      await page.waitForTimeout(500);
    }
  });
}

export function readSample(rel) {
  return readFileSync(path.join(SAMPLES, rel));
}
