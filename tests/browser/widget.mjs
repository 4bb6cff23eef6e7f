// Widget-only browser test against the in-memory stub server (no Rust server needed):
// the same flow as e2e.mjs, plus retry of a failed upload, a failed analysis, a
// decompression bomb, keyboard access and the CSP.
//
//   node tests/browser/widget.mjs      (needs wasm-client/pkg: scripts/wasm-build.sh)
import path from 'node:path';
import { ROOT, assert, ensureDir, launchChromium, reporter } from './lib.mjs';
import { startStubServer } from './stub-server.mjs';
import { addAndCheckEstimates, checkCosts, fileRow, openWidget, readSample, uploadAndWait, watchPage } from './flow.mjs';

/** A PNG header claiming 100000×100000 pixels. */
function bombPng() {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const c = Buffer.alloc(4); c.writeUInt32BE(crc(body));
    return Buffer.concat([len, body, c]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(100000, 0); ihdr.writeUInt32BE(100000, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', Buffer.from([0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01])),
  ]);
}

const t = reporter();
const stub = await startStubServer({ analysisDelayMs: 300 });
let browser;
try {
  browser = await launchChromium();
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  // Playwright turns file-chooser interception on asynchronously when the first listener is
  // added; a listener from the start means the keyboard check below never races it (a chooser
  // opened before interception is on never reaches waitForEvent).
  page.on('filechooser', () => {});
  const problems = watchPage(page);
  if (!(await t.check('the demo page loads the element and the WASM worker', () => openWidget(page, stub.url)))) {
    throw new Error('the widget did not load (is wasm-client/pkg built? scripts/wasm-build.sh); later checks not run');
  }

  const names = await addAndCheckEstimates(page, t.check);
  await uploadAndWait(page, names, t.check);
  await checkCosts(page, t.check);

  await t.check('hostile inputs: bomb, SVG, empty and truncated files get their own codes', async () => {
    const jpeg = readSample('samples/rocket.jpg');
    await page.locator('sightline-uploader input[type=file]').setInputFiles([
      { name: 'bomb.png', mimeType: 'image/png', buffer: bombPng() },
      { name: 'vector.svg', mimeType: 'image/svg+xml', buffer: Buffer.from('<svg xmlns="http://www.w3.org/2000/svg"/>') },
      { name: 'empty.jpg', mimeType: 'image/jpeg', buffer: Buffer.alloc(0) },
      { name: 'cut.jpg', mimeType: 'image/jpeg', buffer: jpeg.subarray(0, jpeg.length >> 1) },
    ]);
    // On wasm32 the PNG decoder's 32-bit buffer size overflows before the core's pixel check,
    // so the 10-gigapixel header is refused as memory_limit there (too_many_pixels natively).
    const cases = [['bomb.png', ['too_many_pixels', 'memory_limit']], ['vector.svg', ['svg_unsupported']],
      ['empty.jpg', ['empty']], ['cut.jpg', ['truncated']]];
    for (const [name, codes] of cases) {
      const row = fileRow(page, name);
      await row.and(page.locator('[data-state="invalid"]')).waitFor({ timeout: 30000 });
      const got = await row.locator('[data-role="error"]').getAttribute('data-code');
      assert(codes.includes(got), `${name}: code ${got}, expected ${codes.join(' or ')}`);
    }
  });

  await t.check('detail="low" prices 85 image tokens on gpt-4o and asks the server for low', async () => {
    await page.evaluate(() => document.querySelector('sightline-uploader').setAttribute('detail', 'low'));
    await page.locator('sightline-uploader input[type=file]').setInputFiles([
      { name: 'low-detail.jpg', mimeType: 'image/jpeg', buffer: readSample('photos/Garden.jpg') },
    ]);
    const row = fileRow(page, 'low-detail.jpg');
    await row.and(page.locator('[data-state="ready"]')).waitFor({ timeout: 30000 });
    const gpt4o = await page.evaluate(() => document.querySelector('sightline-uploader').items
      .find((i) => i.name === 'low-detail.jpg').prepared.estimates.find((e) => e.model === 'gpt-4o'));
    assert(gpt4o && gpt4o.imageTokens === 85, `gpt-4o image tokens ${gpt4o && gpt4o.imageTokens}`);
    await page.locator('sightline-uploader button.primary').click();
    await row.and(page.locator('[data-state="done"]')).waitFor({ timeout: 30000 });
    const id = await page.evaluate(() => document.querySelector('sightline-uploader').items
      .find((i) => i.name === 'low-detail.jpg').imageId);
    const rec = await (await fetch(`${stub.url}/v1/images/${id}`, { headers: { 'x-api-key': 'sightline-local-key' } })).json();
    assert(rec.detail === 'low', `the upload asked for ${rec.detail}`);
    await page.evaluate(() => document.querySelector('sightline-uploader').removeAttribute('detail'));
  });

  await t.check('a failed upload is retried with the same prepared bytes', async () => {
    const png = readSample('samples/chelsea.png');
    await page.locator('sightline-uploader input[type=file]').setInputFiles([
      { name: 'fail-upload.png', mimeType: 'image/png', buffer: png },
    ]);
    const row = fileRow(page, 'fail-upload.png');
    await row.and(page.locator('[data-state="ready"]')).waitFor({ timeout: 30000 });
    const sha = await page.evaluate(() => document.querySelector('sightline-uploader').items
      .find((i) => i.name === 'fail-upload.png').prepared.sha256);
    await page.locator('sightline-uploader button.primary').click();
    await row.and(page.locator('[data-state="upload_error"]')).waitFor({ timeout: 30000 });
    const retry = row.getByRole('button', { name: /Retry upload/ });
    assert(await retry.isVisible(), 'no retry button');
    await retry.click();
    await row.and(page.locator('[data-state="done"]')).waitFor({ timeout: 30000 });
    const after = await page.evaluate(() => document.querySelector('sightline-uploader').items
      .find((i) => i.name === 'fail-upload.png').prepared.sha256);
    assert(sha === after, 'the bytes were re-encoded');
  });

  await t.check('a failed analysis shows the server error', async () => {
    await page.locator('sightline-uploader input[type=file]').setInputFiles([
      { name: 'fail-analysis.jpg', mimeType: 'image/jpeg', buffer: readSample('samples/rocket.jpg') },
    ]);
    const row = fileRow(page, 'fail-analysis.jpg');
    await row.and(page.locator('[data-state="ready"]')).waitFor({ timeout: 30000 });
    await page.locator('sightline-uploader button.primary').click();
    await row.and(page.locator('[data-state="failed"]')).waitFor({ timeout: 30000 });
    assert(/refused/.test(await row.locator('[data-role="error"]').textContent()), 'no server error shown');
  });

  await t.check('the file picker opens from the keyboard; status is a live region; controls are labelled', async () => {
    const pick = page.locator('sightline-uploader button.pick');
    for (const key of ['Enter', 'Space']) {
      await pick.focus();
      const chooser = page.waitForEvent('filechooser', { timeout: 5000 });
      await page.keyboard.press(key);
      const fc = await chooser.catch((e) => { throw new Error(`${key}: ${e.message}`); });
      assert(fc.isMultiple(), 'file chooser is not multiple');
      // Answer the chooser (with nothing): Chromium opens no second one while one is pending.
      await fc.setFiles([]);
    }
    // On a fresh page, the first Tab stop is the picker button.
    const p3 = await browser.newPage();
    await openWidget(p3, stub.url);
    await p3.keyboard.press('Tab');
    const focused = await p3.evaluate(() => {
      const host = document.activeElement;
      const inner = host && host.shadowRoot && host.shadowRoot.activeElement;
      return inner ? inner.className : host && host.tagName;
    });
    await p3.close();
    assert(focused === 'pick', `first Tab stop is ${focused}`);
    const status = page.locator('sightline-uploader [role="status"]');
    assert(await status.getAttribute('aria-live') === 'polite', 'no aria-live status');
    const label = await page.locator('sightline-uploader progress').first().getAttribute('aria-label');
    assert(label && label.startsWith('Upload progress for'), `progress label ${label}`);
    const retry = await page.locator('sightline-uploader li.file button').first().getAttribute('aria-label');
    assert(retry && retry.startsWith('Remove'), `row button label ${retry}`);
  });

  await t.check('a wrong API key is reported, not silent', async () => {
    const p2 = await browser.newPage();
    await openWidget(p2, stub.url, { apiKey: 'wrong-key' });
    await p2.locator('sightline-uploader input[type=file]').setInputFiles([
      { name: 'coffee.png', mimeType: 'image/png', buffer: readSample('samples/coffee.png') },
    ]);
    const row = fileRow(p2, 'coffee.png');
    await row.and(p2.locator('[data-state="ready"]')).waitFor({ timeout: 30000 });
    await p2.locator('sightline-uploader button.primary').click();
    await row.and(p2.locator('[data-state="upload_error"]')).waitFor({ timeout: 30000 });
    assert(/invalid API key/.test(await row.locator('[data-role="error"]').textContent()), 'no key error');
    assert(/invalid API key/.test(await p2.locator('sightline-uploader .cost-total').textContent()), 'cost panel hides the error');
    await p2.close();
  });

  await t.check('no CSP violations or page errors', () => {
    assert(problems.length === 0, problems.join('\n'));
  });

  const shot = path.join(ROOT, 'target/browser/widget.png');
  await ensureDir(path.dirname(shot));
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${path.relative(ROOT, shot)}`);
} catch (err) {
  t.fail('widget test run', err && err.stack ? err.stack : String(err));
} finally {
  if (browser) await browser.close();
  await stub.close();
}
process.exitCode = t.summary();
