// Widget-only browser test against the in-memory stub server (no Rust server needed):
// the same flow as e2e.mjs, plus retry of a failed upload, a failed analysis, a
// decompression bomb, the batch-lane choice, keyboard access and the CSP.
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

const LANE_LABEL = 'Cheaper (batch, within 24 h)';
const laneBox = (page) => page.getByRole('checkbox', { name: LANE_LABEL });
const item = (page, name) => page.evaluate((n) => {
  const i = document.querySelector('sightline-uploader').items.find((x) => x.name === n);
  return i && { state: i.state, imageId: i.imageId, lane: i.lane, prepared: i.prepared && { width: i.prepared.width, height: i.prepared.height } };
}, name);

/** Add one sample under `name` and wait until it is ready. */
async function addReady(page, name, sample = 'samples/rocket.jpg') {
  await page.locator('sightline-uploader input[type=file]').setInputFiles([
    { name, mimeType: 'image/jpeg', buffer: readSample(sample) },
  ]);
  await fileRow(page, name).and(page.locator('[data-state="ready"]')).waitFor({ timeout: 30000 });
}

/** The WASM module's own estimate for the image, imported afresh in the page (not the element's figures). */
function wasmEstimate(page, width, height) {
  return page.evaluate(async ([w, h]) => {
    const { default: init, estimate } = await import('/pkg/sightline_wasm.js');
    await init();
    const models = document.querySelector('sightline-uploader').models;
    return estimate(w, h, models, {}).map((e) => ({ model: e.model, costUsd: e.costUsd, batchCostUsd: e.batchCostUsd }));
  }, [width, height]);
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

  await t.check('until the lane checkbox is used, upload requests send no lane (the server\'s rule)', async () => {
    assert(stub.uploadRequests.length > 0, 'no upload requests yet');
    const withLane = stub.uploadRequests.filter((b) => 'lane' in b);
    assert(withLane.length === 0, `sent lane: ${JSON.stringify(withLane)}`);
    assert(await laneBox(page).isVisible() && !(await laneBox(page).isChecked()), 'the checkbox is not shown unchecked');
  });

  await t.check('with the batch lane ticked, the estimate and total show the WASM module\'s batch price', async () => {
    await laneBox(page).check();
    await addReady(page, 'batch-lane.jpg');
    const { prepared } = await item(page, 'batch-lane.jpg');
    const wasm = await wasmEstimate(page, prepared.width, prepared.height);
    assert(wasm.length >= 1, 'the WASM module estimated nothing');
    const row = fileRow(page, 'batch-lane.jpg');
    assert(/Est\. cost \(batch\)/.test(await row.locator('thead').textContent()), 'no batch heading');
    for (const e of wasm) {
      assert(e.batchCostUsd > 0 && e.batchCostUsd < e.costUsd, `${e.model}: batch ${e.batchCostUsd} vs ${e.costUsd}`);
      const cell = row.locator(`tr[data-model="${e.model}"] td[data-cost]`);
      const shown = Number(await cell.getAttribute('data-cost'));
      assert(shown === e.batchCostUsd, `${e.model}: row shows ${shown}, WASM batch ${e.batchCostUsd}`);
      const text = await page.evaluate(async (x) => (await import('/sightline-uploader.js')).formatUsd(x), e.batchCostUsd);
      assert((await cell.textContent()) === text, `${e.model}: text ${await cell.textContent()}, want ${text}`);
      // Only this image is ready, so the total before upload is its cost.
      const total = Number(await page.locator(`sightline-uploader .batch-models li[data-model="${e.model}"]`).getAttribute('data-cost'));
      assert(total === e.batchCostUsd, `${e.model}: total ${total}, WASM batch ${e.batchCostUsd}`);
    }
    // Unticked, the real-time price is back.
    await laneBox(page).uncheck();
    const rt = Number(await row.locator(`tr[data-model="${wasm[0].model}"] td[data-cost]`).getAttribute('data-cost'));
    assert(rt === wasm[0].costUsd, `unticked: ${rt}, WASM real time ${wasm[0].costUsd}`);
    await laneBox(page).check();
  });

  await t.check('the batch checkbox sets "lane": "batch" on the upload request; the answered batch shows its cost and saving', async () => {
    const row = fileRow(page, 'batch-lane.jpg');
    await page.locator('sightline-uploader button.primary').click();
    await row.and(page.locator('[data-state="processing"]')).waitFor({ timeout: 30000 });
    const body = stub.uploadRequests.find((b) => b.filename === 'batch-lane.jpg');
    assert(body && body.lane === 'batch', `upload request ${JSON.stringify(body)}`);
    await row.locator('[data-role="state"]').filter({ hasText: 'In the batch lane' }).waitFor({ timeout: 10000 });
    stub.answerBatches();
    await row.and(page.locator('[data-state="done"]')).waitFor({ timeout: 30000 });
    const cost = row.locator('[data-role="real-cost"]');
    assert(await cost.getAttribute('data-lane') === 'batch', `result lane ${await cost.getAttribute('data-lane')}`);
    const rec = stub.images.get((await item(page, 'batch-lane.jpg')).imageId);
    assert(Number(await cost.getAttribute('data-cost')) === rec.result.cost_usd, 'shown cost is not the result\'s');
    assert(Number(await cost.getAttribute('data-saved')) > 0, 'no saving');
    assert(/batch lane, saved \$/.test(await cost.textContent()), `cost line: ${await cost.textContent()}`);
    await laneBox(page).uncheck(); // later checks use the real-time lane
  });

  await t.check('a batch item still queued at poll-timeout ends "queued for the batch lane", not an error; a real-time one stalls as before', async () => {
    const p4 = await browser.newPage();
    const p4problems = watchPage(p4);
    await openWidget(p4, stub.url);
    await p4.evaluate(() => {
      window.queuedEvents = [];
      document.addEventListener('sightline-queued', (e) => window.queuedEvents.push(e.detail.item.name));
      document.querySelector('sightline-uploader').setAttribute('poll-timeout', '1');
    });
    await laneBox(p4).check();
    await addReady(p4, 'slow-batch.jpg');
    await p4.locator('sightline-uploader button.primary').click();
    await fileRow(p4, 'slow-batch.jpg').and(p4.locator('[data-state="processing"]')).waitFor({ timeout: 30000 });
    await laneBox(p4).uncheck();
    await addReady(p4, 'never-finish.jpg');
    await p4.locator('sightline-uploader button.primary').click();

    const batchRow = fileRow(p4, 'slow-batch.jpg');
    await batchRow.and(p4.locator('[data-state="batch_queued"]')).waitFor({ timeout: 15000 });
    assert(await batchRow.locator('[data-role="error"]').isHidden(), 'the queued batch item shows an error');
    const text = await batchRow.locator('[data-role="state"]').textContent();
    assert(text === 'Queued for the batch lane — results within 24 h', `state text: ${text}`);
    assert((await p4.evaluate(() => window.queuedEvents)).join() === 'slow-batch.jpg', 'no sightline-queued event');

    const rtRow = fileRow(p4, 'never-finish.jpg');
    await rtRow.and(p4.locator('[data-state="stalled"]')).waitFor({ timeout: 15000 });
    assert(await rtRow.locator('[data-role="error"]').getAttribute('data-code') === 'timeout', 'real-time item did not time out');

    // The batch comes back later: "Check again" picks up the result.
    stub.answerBatches();
    await batchRow.getByRole('button', { name: /Check again/ }).click();
    await batchRow.and(p4.locator('[data-state="done"]')).waitFor({ timeout: 15000 });
    await p4.close();
    assert(p4problems.length === 0, p4problems.join('\n'));
  });

  await t.check('the batch checkbox is labelled, described and operable from the keyboard', async () => {
    const p5 = await browser.newPage();
    await openWidget(p5, stub.url);
    const activeId = () => p5.evaluate(() => {
      const root = document.querySelector('sightline-uploader').shadowRoot;
      return root.activeElement ? root.activeElement.id || root.activeElement.className : '';
    });
    let reached = false;
    for (let i = 0; i < 8 && !reached; i++) {
      await p5.keyboard.press('Tab');
      reached = (await activeId()) === 'lane-batch';
    }
    assert(reached, 'Tab never reaches the lane checkbox');
    const lane = () => p5.evaluate(() => document.querySelector('sightline-uploader').lane);
    await p5.keyboard.press('Space');
    assert(await laneBox(p5).isChecked() && (await lane()) === 'batch', `after Space: lane ${await lane()}`);
    await p5.keyboard.press('Space');
    assert(!(await laneBox(p5).isChecked()) && (await lane()) === 'realtime', `after 2nd Space: lane ${await lane()}`);
    const help = await laneBox(p5).getAttribute('aria-describedby');
    assert(/24 h/.test(await p5.locator(`sightline-uploader #${help}`).textContent()), 'no description');
    await p5.close();
  });

  await t.check('the checkbox reflects lane="batch" / "realtime" (pinned, disabled); lane-choice="off" hides it', async () => {
    const p6 = await browser.newPage();
    await openWidget(p6, stub.url);
    const set = (name, value) => p6.evaluate(([n, v]) => {
      const el = document.querySelector('sightline-uploader');
      if (v === null) el.removeAttribute(n); else el.setAttribute(n, v);
      return el.lane;
    }, [name, value]);
    const box = laneBox(p6);
    assert((await set('lane', 'batch')) === 'batch' && await box.isChecked() && await box.isDisabled(), 'lane="batch" not reflected');
    assert((await set('lane', 'realtime')) === 'realtime' && !(await box.isChecked()) && await box.isDisabled(), 'lane="realtime" not reflected');
    assert((await set('lane', null)) === '' && await box.isEnabled(), 'removing lane does not free the checkbox');
    await box.check();
    assert((await set('lane-choice', 'off')) === '' && await box.isHidden(), 'lane-choice="off" leaves the checkbox or its lane');
    await p6.close();
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

  await t.check('a done image shows similar images as thumbnails; the search box finds images and says how', async () => {
    await page.locator('sightline-uploader input[type=file]').setInputFiles([
      { name: 'similar-probe.jpg', mimeType: 'image/jpeg', buffer: readSample('samples/rocket.jpg') },
    ]);
    const row = fileRow(page, 'similar-probe.jpg');
    await row.and(page.locator('[data-state="ready"]')).waitFor({ timeout: 30000 });
    await page.locator('sightline-uploader button.primary').click();
    await row.and(page.locator('[data-state="done"]')).waitFor({ timeout: 30000 });
    const thumbs = row.locator('[data-role="similar"] img');
    await thumbs.first().waitFor({ timeout: 10000 });
    const n = await thumbs.count();
    assert(n >= 1 && n <= 4, `similar thumbnails: ${n}`);
    // The thumbnail really loaded (a decoded image, not a broken icon).
    const width = await thumbs.first().evaluate(async (img) => { await img.decode(); return img.naturalWidth; });
    assert(width > 0, 'thumbnail did not load');
    assert((await thumbs.first().getAttribute('alt')).length > 0, 'thumbnail has no alt text');

    const input = page.getByRole('searchbox', { name: 'Find analysed images' });
    await input.fill('rocket');
    await input.press('Enter');
    const note = page.locator('sightline-uploader [data-role="search-note"]');
    await page.waitForFunction(() => /matched against the analyses/.test(
      document.querySelector('sightline-uploader').shadowRoot.querySelector('[data-role="search-note"]').textContent));
    assert(/keyword|analyses/.test(await note.textContent()), await note.textContent());
    const found = page.locator('sightline-uploader [data-role="search-results"] li');
    assert(await found.count() >= 1, 'no search results');
    assert(stub.searchQueries.includes('rocket'), `queries sent: ${stub.searchQueries}`);
    await input.fill('   ');
    await page.locator('sightline-uploader .search-form button').click();
    assert(/Type what to look for/.test(await note.textContent()), 'empty query not explained');
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
