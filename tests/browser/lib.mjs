// Shared helpers of the browser tests: paths, static files, Chromium, a tiny test reporter.
import { createReadStream, existsSync, statSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, '../..');
export const WWW = path.join(ROOT, 'wasm-client/www');
export const PKG = path.join(ROOT, 'wasm-client/pkg');
// The repository's fixtures: samples/ (small), photos/, large/.
export const SAMPLES = path.resolve(ROOT, 'tests/fixtures');

/** The CSP the product serves the widget under; the stub and bench servers send it too. */
export const CSP = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' blob: data:; "
  + "connect-src 'self'; worker-src 'self'; style-src 'self'";

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ts': 'text/plain; charset=utf-8',
  '.txt': 'text/plain; charset=utf-8',
};

/**
 * Serve `urlPath` from one of `mounts` ([prefix, dir] pairs, longest prefix first).
 * Returns false when no mount matches or the file does not exist.
 */
export function serveStatic(req, res, mounts, extraHeaders = {}) {
  if (req.method !== 'GET' && req.method !== 'HEAD') return false;
  let urlPath;
  try {
    urlPath = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  } catch {
    return false;
  }
  for (const [prefix, dir] of mounts) {
    if (!urlPath.startsWith(prefix)) continue;
    let rel = urlPath.slice(prefix.length);
    if (rel === '' || rel.endsWith('/')) rel += 'index.html';
    const file = path.resolve(dir, `.${path.sep}${rel}`);
    if (!file.startsWith(path.resolve(dir) + path.sep)) return false; // no ../ escapes
    if (!existsSync(file) || !statSync(file).isFile()) continue;
    const headers = {
      'content-type': TYPES[path.extname(file).toLowerCase()] || 'application/octet-stream',
      'content-length': statSync(file).size,
      'cache-control': 'no-store',
      'x-content-type-options': 'nosniff',
      ...extraHeaders,
    };
    if (headers['content-type'].startsWith('text/html')) headers['content-security-policy'] = CSP;
    res.writeHead(200, headers);
    if (req.method === 'HEAD') res.end();
    else createReadStream(file).pipe(res);
    return true;
  }
  return false;
}

export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--no-first-run', '--disable-sync',
  '--disable-dev-shm-usage',
];

export function chromiumPath() {
  for (const p of [process.env.CHROMIUM_PATH, '/usr/bin/chromium', '/usr/bin/chromium-browser']) {
    if (p && existsSync(p)) return p;
  }
  throw new Error('Chromium not found: run scripts/browser-setup.sh (or set CHROMIUM_PATH)');
}

export async function launchChromium() {
  const { chromium } = await import('playwright-core');
  return chromium.launch({ executablePath: chromiumPath(), args: CHROMIUM_ARGS, headless: true });
}

export async function ensureDir(dir) {
  await mkdir(dir, { recursive: true });
}

/** A minimal reporter: check(name, fn) records pass/fail; summary() prints `N passed, M failed`. */
export function reporter() {
  let passed = 0;
  let failed = 0;
  const failures = [];
  return {
    async check(name, fn) {
      const started = Date.now();
      try {
        await fn();
        passed++;
        console.log(`ok   ${name} (${Date.now() - started} ms)`);
        return true;
      } catch (err) {
        failed++;
        failures.push(name);
        console.log(`FAIL ${name}: ${err && err.stack ? err.stack.split('\n').slice(0, 4).join('\n     ') : err}`);
        return false;
      }
    },
    fail(name, message) {
      failed++;
      failures.push(name);
      console.log(`FAIL ${name}: ${message}`);
    },
    get failed() { return failed; },
    summary() {
      if (failures.length) console.log(`failures: ${failures.join('; ')}`);
      console.log(`${passed} passed, ${failed} failed`);
      return failed === 0 && passed > 0 ? 0 : 1;
    },
  };
}

export function assert(cond, message) {
  if (!cond) throw new Error(message || 'assertion failed');
}
