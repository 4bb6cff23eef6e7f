// An in-memory stand-in for `sightline serve`, for widget-only tests and demos without the
// Rust server: the same routes and JSON shapes (POST /v1/uploads, presigned-style PUT,
// GET /v1/images/{id}, GET /v1/costs, GET /v1/health), x-api-key checks, JSON errors,
// and the widget's static files at / and the WASM package at /pkg/.
//
//   node tests/browser/stub-server.mjs [--port 8788] [--key sightline-local-key] [--batch-delay-ms 20000]
//
// Binds 127.0.0.1 only. The "analysis" is fake: image size from the JPEG header, a fixed
// description and tags, and a cost from gpt-4.1-mini's prices. A filename containing
// "fail-analysis" ends in status "failed"; "fail-upload" makes the first PUT answer 500;
// "never-finish" stays queued. An upload with "lane": "batch" stays queued until its "batch"
// is answered (answerBatches(), or batchDelayMs after the PUT when set), then is done at half
// price with lane, batch_id and saved_usd. Every POST /v1/uploads body is kept in uploadRequests.
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { pathToFileURL } from 'node:url';
import { PKG, WWW, serveStatic } from './lib.mjs';

const TYPES = new Map([['image/jpeg', 'jpg'], ['image/jpg', 'jpg'], ['image/png', 'png'], ['image/webp', 'webp'], ['image/gif', 'gif']]);
const MAX_BYTES = 25 * 1024 * 1024;

/** Width and height from a JPEG's SOF segment, or null. */
export function jpegSize(buf) {
  if (buf.length < 4 || buf[0] !== 0xff || buf[1] !== 0xd8) return null;
  let i = 2;
  while (i + 9 < buf.length) {
    if (buf[i] !== 0xff) return null;
    const marker = buf[i + 1];
    if (marker === 0xff) { i++; continue; }
    const len = buf.readUInt16BE(i + 2);
    if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
      return { height: buf.readUInt16BE(i + 5), width: buf.readUInt16BE(i + 7) };
    }
    i += 2 + len;
  }
  return null;
}

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
  res.end(text);
}

function apiError(res, status, code, message) {
  sendJson(res, status, { error: { code, message } });
}

function readBody(req, limit) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > limit) {
        reject(Object.assign(new Error('body too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function now() {
  return new Date().toISOString().replace(/\.\d+Z$/, 'Z');
}

/** gpt-4.1-mini's estimate rule (32-px patches × 1.62), good enough for a stub. */
function fakeTokens(w, h) {
  return Math.ceil(Math.min(1536, Math.ceil(w / 32) * Math.ceil(h / 32)) * 1.62) + 120;
}

export async function startStubServer({
  port = 0, apiKey = 'sightline-local-key', analysisDelayMs = 400, model = 'gpt-4.1-mini', batchDelayMs = null,
} = {}) {
  const images = new Map(); // id -> record
  const uploadRequests = []; // POST /v1/uploads bodies, in order
  const grants = new Map(); // token -> {id, content_type, content_length, expires}
  const thumbs = new Map(); // id -> uploaded JPEG bytes (served as the thumbnail)
  const searchQueries = []; // GET /v1/search queries, lowercased
  const served = []; // paths of the static files served (the first-load check reads them)
  const failedPuts = new Set();
  let base = '';

  function authed(req, res) {
    const key = req.headers['x-api-key'] || (req.headers.authorization || '').replace(/^Bearer\s+/i, '');
    if (!key) { apiError(res, 401, 'unauthorized', 'missing API key'); return false; }
    if (key !== apiKey) { apiError(res, 401, 'unauthorized', 'invalid API key'); return false; }
    return true;
  }

  function finish(rec) {
    const { width, height } = rec.resized;
    const input = fakeTokens(width, height);
    const output = 180;
    const realtimeCost = (input * 0.4 + output * 1.6) / 1e6;
    const batch = rec.lane === 'batch';
    const cost = batch ? realtimeCost / 2 : realtimeCost;
    const failing = /fail-analysis/.test(rec.source);
    rec.updated_at = now();
    if (failing) {
      rec.status = 'failed';
      rec.error = 'the provider refused the image (stub)';
      return;
    }
    rec.status = 'done';
    rec.result = {
      provider: 'stub',
      model,
      analysis: {
        description: `A ${width > height ? 'landscape' : height > width ? 'portrait' : 'square'} ${width}×${height} test image (stub analysis).`,
        category: 'photo',
        tags: ['stub', width > height ? 'landscape' : 'portrait'],
        objects: [],
        text: '',
        quality_issues: [],
      },
      usage: { input_tokens: input, output_tokens: output, cached_tokens: 0 },
      cost_usd: cost,
      cached: false,
      ...(batch ? { lane: 'batch', batch_id: 'stub-batch-1', saved_usd: realtimeCost - cost } : {}),
      idempotency_key: `${rec.sha256 || 'x'}:${model}:stub`,
      prompt_version: 'stub',
      price_version: 'stub',
      completed_at: now(),
    };
  }

  /** Answer every queued batch-lane image (the provider's batch came back). */
  function answerBatches() {
    for (const rec of images.values()) {
      if (rec.lane === 'batch' && rec.status === 'queued') finish(rec);
    }
  }

  function costs() {
    const total = { images: 0, cached_images: 0, input_tokens: 0, output_tokens: 0, cost_usd: 0, estimated_cost_usd: 0 };
    const byModel = new Map();
    const byDay = new Map();
    for (const rec of images.values()) {
      if (rec.status !== 'done' || !rec.result) continue;
      const r = rec.result;
      for (const [map, key, label] of [[byModel, r.model, 'model'], [byDay, rec.updated_at.slice(0, 10), 'day']]) {
        const t = map.get(key) || { [label]: key, images: 0, cached_images: 0, input_tokens: 0, output_tokens: 0, cost_usd: 0, estimated_cost_usd: 0 };
        map.set(key, t);
        for (const tt of [t]) {
          tt.images++; tt.input_tokens += r.usage.input_tokens; tt.output_tokens += r.usage.output_tokens;
          tt.cost_usd += r.cost_usd; tt.estimated_cost_usd += r.cost_usd;
        }
      }
      total.images++; total.input_tokens += r.usage.input_tokens; total.output_tokens += r.usage.output_tokens;
      total.cost_usd += r.cost_usd; total.estimated_cost_usd += r.cost_usd;
    }
    const today = now().slice(0, 10);
    return { from: today, to: today, total, by_model: [...byModel.values()], by_day: [...byDay.values()], rows: [] };
  }

  /** A search hit as the API gives it: description and tags from the record's analysis. */
  function hitOf(r, distance) {
    const a = (r.result && r.result.analysis) || {};
    return {
      image_id: r.image_id, distance, description: a.description, tags: a.tags || [],
      thumbnail_url: `${base}/_thumb/${encodeURIComponent(r.image_id)}`,
    };
  }

  async function handle(req, res) {
    const url = new URL(req.url, base);
    const p = url.pathname;

    if (p === '/v1/health' && req.method === 'GET') return sendJson(res, 200, { status: 'ok', version: 'stub' });

    if (p === '/v1/uploads') {
      if (req.method !== 'POST') return apiError(res, 405, 'method_not_allowed', 'use POST');
      if (!authed(req, res)) return;
      let body;
      try {
        body = JSON.parse((await readBody(req, 64 * 1024)).toString('utf8'));
      } catch (e) {
        return apiError(res, 400, 'bad_request', `invalid JSON body: ${e.message}`);
      }
      uploadRequests.push(body);
      const allowed = new Set(['filename', 'content_type', 'content_length', 'detail', 'lane']);
      const unknown = Object.keys(body || {}).filter((k) => !allowed.has(k));
      if (unknown.length) return apiError(res, 400, 'bad_request', `invalid JSON body: unknown field \`${unknown[0]}\``);
      if (!TYPES.has(body.content_type)) return apiError(res, 400, 'bad_request', `unsupported content_type ${JSON.stringify(body.content_type)}`);
      if (!Number.isInteger(body.content_length) || body.content_length <= 0) return apiError(res, 400, 'bad_request', 'content_length must be > 0');
      if (body.content_length > MAX_BYTES) return apiError(res, 413, 'too_large', `content_length ${body.content_length} is over the ${MAX_BYTES}-byte limit`);
      if (body.detail !== undefined && !['low', 'high', 'auto'].includes(body.detail)) {
        return apiError(res, 400, 'bad_request', `invalid JSON body: unknown variant \`${body.detail}\``);
      }
      if (body.lane !== undefined && !['realtime', 'batch'].includes(body.lane)) {
        return apiError(res, 400, 'bad_request', `invalid JSON body: unknown variant \`${body.lane}\``);
      }
      const id = randomUUID();
      const key = `uploads/local/${id}.${TYPES.get(body.content_type)}`;
      const token = randomUUID().replace(/-/g, '');
      const expires = Date.now() + 15 * 60 * 1000;
      grants.set(token, { id, content_type: body.content_type, content_length: body.content_length, expires });
      const t = now();
      images.set(id, {
        image_id: id, tenant: 'local', source: body.filename || key, status: 'pending', created_at: t, updated_at: t,
        ...(body.detail ? { detail: body.detail } : {}),
        ...(body.lane ? { lane: body.lane } : {}),
      });
      return sendJson(res, 201, {
        image_id: id,
        key,
        upload: {
          url: `${base}/_upload/${token}`,
          method: 'PUT',
          headers: { 'content-type': body.content_type },
          expires_at: new Date(expires).toISOString(),
        },
      });
    }

    const put = p.match(/^\/_upload\/([0-9a-f]+)$/);
    if (put) {
      if (req.method !== 'PUT') return apiError(res, 405, 'method_not_allowed', 'use PUT');
      const g = grants.get(put[1]);
      if (!g) return apiError(res, 403, 'forbidden', 'unknown upload token');
      if (g.expires < Date.now()) return apiError(res, 403, 'expired', 'upload URL has expired');
      if (req.headers['content-type'] !== g.content_type) return apiError(res, 400, 'bad_request', `content-type must be ${g.content_type}`);
      let bytes;
      try {
        bytes = await readBody(req, g.content_length);
      } catch (e) {
        return apiError(res, 413, 'too_large', 'body is longer than the content_length of the upload');
      }
      if (bytes.length !== g.content_length) return apiError(res, 400, 'bad_request', `body is ${bytes.length} bytes, expected ${g.content_length}`);
      const rec = images.get(g.id);
      if (/fail-upload/.test(rec.source) && !failedPuts.has(g.id)) {
        failedPuts.add(g.id);
        return apiError(res, 500, 'internal', 'simulated storage failure (stub)');
      }
      grants.delete(put[1]);
      thumbs.set(g.id, bytes);
      const size = jpegSize(bytes) || { width: 0, height: 0 };
      rec.status = 'queued';
      rec.original = { ...size, bytes: bytes.length };
      rec.resized = { ...size, bytes: bytes.length };
      rec.updated_at = now();
      if (rec.lane === 'batch') {
        if (batchDelayMs !== null) setTimeout(() => { if (rec.status === 'queued') finish(rec); }, batchDelayMs);
      } else if (!/never-finish/.test(rec.source)) {
        setTimeout(() => finish(rec), analysisDelayMs);
      }
      res.writeHead(200, { 'content-length': 0 });
      return res.end();
    }

    const img = p.match(/^\/v1\/images\/([^/]+)$/);
    if (img && req.method === 'GET') {
      if (!authed(req, res)) return;
      const rec = images.get(decodeURIComponent(img[1]));
      if (!rec) return apiError(res, 404, 'not_found', 'no such image');
      return sendJson(res, 200, rec);
    }

    const sim = p.match(/^\/v1\/images\/([^/]+)\/similar$/);
    if (sim && req.method === 'GET') {
      if (!authed(req, res)) return;
      const id = decodeURIComponent(sim[1]);
      if (!images.has(id)) return apiError(res, 404, 'not_found', 'no such image');
      const top = Number(url.searchParams.get('top') || 10);
      const others = [...images.values()].filter((r) => r.status === 'done' && r.image_id !== id);
      return sendJson(res, 200, { mode: 'vector', model: 'sightline-visual-v1', results: others.slice(0, top).map((r, i) => hitOf(r, 0.01 * (i + 1))) });
    }

    if (p === '/v1/search' && req.method === 'GET') {
      if (!authed(req, res)) return;
      const q = (url.searchParams.get('q') || '').trim().toLowerCase();
      if (!q) return apiError(res, 400, 'bad_request', 'q is required');
      searchQueries.push(q);
      const words = q.split(/[^a-z0-9]+/).filter((w) => w.length >= 2);
      const results = [...images.values()]
        .filter((r) => r.status === 'done' && words.some((w) => r.source.toLowerCase().includes(w)))
        .map((r) => hitOf(r, 0.5));
      return sendJson(res, 200, { mode: 'keyword', model: 'keyword', results });
    }

    const thumb = p.match(/^\/_thumb\/([^/]+)$/);
    if (thumb && req.method === 'GET') {
      const bytes = thumbs.get(decodeURIComponent(thumb[1]));
      if (!bytes) return apiError(res, 404, 'not_found', 'no such thumbnail');
      res.writeHead(200, { 'content-type': 'image/jpeg', 'content-length': bytes.length });
      return res.end(bytes);
    }

    if (p === '/v1/images' && req.method === 'GET') {
      if (!authed(req, res)) return;
      return sendJson(res, 200, { images: [...images.values()].reverse(), next_cursor: null });
    }

    if (p === '/v1/costs' && req.method === 'GET') {
      if (!authed(req, res)) return;
      return sendJson(res, 200, costs());
    }

    if (p.startsWith('/v1/')) return apiError(res, 404, 'not_found', 'no such route');

    if (serveStatic(req, res, [['/pkg/', PKG], ['/', WWW]])) {
      served.push(p);
      return;
    }
    apiError(res, 404, 'not_found', 'no such file');
  }

  const server = http.createServer((req, res) => {
    handle(req, res).catch((e) => {
      if (!res.headersSent) apiError(res, e.status || 500, 'internal', e.message);
      else res.destroy();
    });
  });
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${server.address().port}`;
  return {
    url: base,
    images,
    uploadRequests,
    searchQueries,
    answerBatches,
    served,
    close: () => new Promise((resolve) => { server.closeAllConnections?.(); server.close(() => resolve()); }),
  };
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const arg = (name, dflt) => {
    const i = process.argv.indexOf(name);
    return i > 0 ? process.argv[i + 1] : dflt;
  };
  const stub = await startStubServer({
    port: Number(arg('--port', 8788)),
    apiKey: arg('--key', 'sightline-local-key'),
    batchDelayMs: Number(arg('--batch-delay-ms', 20000)),
  });
  console.log(`stub sightline server on ${stub.url} (Ctrl-C to stop)`);
  const stop = async () => { await stub.close(); process.exit(0); };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}
