// <sightline-uploader>: prepare images in the browser (sightline-core in WebAssembly, in a
// Web Worker), show the estimated tokens and cost per model, upload the resized JPEGs, follow
// each analysis and show the spend.
//
//   <script type="module" src="./sightline-uploader.js"></script>
//   <sightline-uploader api-base="" api-key="sightline-local-key"
//                       models="gpt-4.1-mini,gpt-4o" max-edge="1024"></sightline-uploader>
//
// Attributes: api-base (default: this origin), api-key, models (comma list), max-edge,
// quality, max-bytes (largest file read, default 25 MiB), concurrency (uploads at once, 2),
// poll-timeout (seconds, 300), detail (low | high | auto: priced here and asked for on each
// upload; unset: the server's setting, estimated as high), lane (realtime | batch: pins the lane
// priced here and asked for on each upload; unset: the "Cheaper (batch, within 24 h)" checkbox
// decides, and until it is used no lane is sent (the server's rule, priced as real time)),
// lane-choice ("off" hides that checkbox).
// Methods: addFiles(files), upload(), retry(itemId), clear(), refreshCosts().
// Events (bubbling, composed): sightline-prepared, sightline-uploaded, sightline-analysed,
// sightline-queued (a batch-lane image still queued when poll-timeout ran out: not an error, its
// result comes within 24 h; "Check again" polls anew), sightline-error; detail = {item}.
//
// Plain JS, no build step, CSP-friendly: no inline scripts or styles, same-origin only.

const DEFAULT_MODELS = 'gpt-4.1-mini,gpt-4o';
const DEFAULT_MAX_BYTES = 25 * 1024 * 1024;
const LANES = ['realtime', 'batch'];
const CSS_URL = new URL('./sightline-uploader.css', import.meta.url).href;
const WORKER_URL = new URL('./worker.js', import.meta.url);

// ---------- formatting ----------

export function formatBytes(n) {
  if (!Number.isFinite(n)) return '?';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(n < 10 * 1024 ? 1 : 0)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

export function formatUsd(x) {
  if (!Number.isFinite(x)) return '?';
  if (x === 0) return '$0';
  const abs = Math.abs(x);
  if (abs >= 1) return `$${x.toFixed(2)}`;
  if (abs >= 0.01) return `$${x.toFixed(4)}`;
  // Small amounts: three significant digits.
  return `$${x.toPrecision(3).replace(/(\.\d*?)0+$/, '$1').replace(/\.$/, '')}`;
}

export function formatInt(n) {
  return Number.isFinite(n) ? Math.round(n).toLocaleString('en-US') : '?';
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k === 'text') node.textContent = v;
    else if (k === 'class') node.className = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

/**
 * An estimate's cost and unresized cost in a lane. Both figures come from the WASM module
 * (batchCostUsd is the core's batch price), so no price is computed here.
 */
function laneCosts(e, lane) {
  return lane === 'batch'
    ? { cost: e.batchCostUsd, original: e.originalBatchCostUsd }
    : { cost: e.costUsd, original: e.originalCostUsd };
}

function jpegName(name) {
  const base = name.replace(/\.[^./\\]+$/, '') || 'image';
  return `${base}.jpg`;
}

// ---------- the preparation worker (one per element, restarted after a trap) ----------

class PrepWorker {
  constructor() {
    this.seq = 0;
    this.pending = new Map();
    this.start();
  }

  start() {
    this.worker = new Worker(WORKER_URL, { type: 'module', name: 'sightline-prepare' });
    this.worker.addEventListener('message', (e) => this.onMessage(e.data));
    this.worker.addEventListener('error', (e) => {
      // A module that fails to load (missing /pkg, CSP) surfaces here.
      e.preventDefault();
      this.failAll({ code: 'worker_error', message: `the preparation worker failed: ${e.message || 'could not load'}` });
    });
  }

  onMessage(msg) {
    if (!msg || msg.id === undefined) return;
    const p = this.pending.get(msg.id);
    if (!p) return;
    this.pending.delete(msg.id);
    if (msg.ok) {
      p.resolve({ result: msg.result, ms: msg.ms });
    } else {
      const err = Object.assign(new Error(msg.error.message), { code: msg.error.code });
      p.reject(err);
      if (msg.fatal) this.restart();
    }
  }

  failAll(error) {
    for (const [, p] of this.pending) p.reject(Object.assign(new Error(error.message), { code: error.code }));
    this.pending.clear();
  }

  restart() {
    this.worker.terminate();
    this.failAll({ code: 'internal', message: 'image preparation was restarted' });
    this.start();
  }

  call(type, payload = {}, transfer = []) {
    const id = ++this.seq;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, type, ...payload }, transfer);
    });
  }

  terminate() {
    this.failAll({ code: 'aborted', message: 'the uploader was removed' });
    this.worker.terminate();
  }
}

// ---------- the element ----------

const STATE_TEXT = {
  queued: 'Waiting to be prepared…',
  reading: 'Reading…',
  preparing: 'Resizing in your browser…',
  ready: 'Ready to upload',
  invalid: 'Cannot be used',
  uploading: 'Uploading…',
  upload_error: 'Upload failed',
  processing: 'Uploaded; waiting for the analysis…',
  stalled: 'Still processing',
  done: 'Analysed',
  failed: 'Analysis failed',
  batch_queued: 'Queued for the batch lane — results within 24 h',
};

class SightlineUploader extends HTMLElement {
  static get observedAttributes() {
    return ['models', 'api-key', 'api-base', 'max-edge', 'detail', 'lane', 'lane-choice'];
  }

  constructor() {
    super();
    this.items = [];
    this.nextId = 1;
    this.prepQueue = Promise.resolve();
    this.modelsReady = Promise.resolve();
    this.uploadQueue = [];
    this.activeUploads = 0;
    this.knownModels = null;
    this.priceVersion = '';
    this.laneChoice = ''; // the checkbox's lane once used; '' until then
    this.worker = null;
    const root = this.attachShadow({ mode: 'open' });
    root.append(this.buildSkeleton());
  }

  // ----- attributes -----

  get apiBase() {
    const base = this.getAttribute('api-base') || '';
    return new URL(base || '/', document.baseURI).href.replace(/\/+$/, '');
  }
  get apiKey() { return this.getAttribute('api-key') || ''; }
  get maxEdge() {
    const n = Number(this.getAttribute('max-edge') || 1024);
    return Number.isInteger(n) && n > 0 ? n : 1024;
  }
  get quality() {
    const n = Number(this.getAttribute('quality') || 85);
    return Number.isInteger(n) && n >= 1 && n <= 100 ? n : 85;
  }
  get maxBytes() {
    const n = Number(this.getAttribute('max-bytes') || DEFAULT_MAX_BYTES);
    return Number.isFinite(n) && n > 0 ? n : DEFAULT_MAX_BYTES;
  }
  get concurrency() {
    const n = Number(this.getAttribute('concurrency') || 2);
    return Number.isInteger(n) && n > 0 ? Math.min(n, 6) : 2;
  }
  get pollTimeoutMs() {
    const n = Number(this.getAttribute('poll-timeout') || 300);
    return (Number.isFinite(n) && n > 0 ? n : 300) * 1000;
  }
  /** The image detail to price and ask for, or '' for the server's setting. */
  get detail() {
    const d = (this.getAttribute('detail') || '').trim().toLowerCase();
    return ['low', 'high', 'auto'].includes(d) ? d : '';
  }
  /** Estimate options for the detail (none: the defaults, which are the server's). */
  get estimateParams() {
    return this.detail ? { detail: this.detail } : {};
  }
  /** The lane pinned by the `lane` attribute, or ''. */
  get pinnedLane() {
    const l = (this.getAttribute('lane') || '').trim().toLowerCase();
    return LANES.includes(l) ? l : '';
  }
  get laneChoiceShown() {
    return (this.getAttribute('lane-choice') || '').trim().toLowerCase() !== 'off';
  }
  /**
   * The lane to price and ask for on the next uploads: the attribute, else the checkbox once
   * used, else '' (nothing sent: the server's rule, priced as real time).
   */
  get lane() {
    return this.pinnedLane || (this.laneChoiceShown ? this.laneChoice : '');
  }
  /** An item's lane: the server's word once known, else what its upload asked, else the next one. */
  itemLane(item) {
    if (item.record && item.record.lane) return item.record.lane;
    return item.lane !== null ? item.lane : this.lane;
  }
  /** The requested models that the price table knows. */
  get models() {
    const asked = (this.getAttribute('models') || DEFAULT_MODELS)
      .split(',').map((s) => s.trim()).filter(Boolean);
    if (!this.knownModels) return asked;
    return asked.filter((m) => this.knownModels.has(m));
  }

  connectedCallback() {
    if (!this.worker) {
      this.worker = new PrepWorker();
      this.modelsReady = this.loadModels();
    }
    this.$.edge.textContent = String(this.maxEdge);
    this.renderLaneControl();
    if (this.apiKey) this.refreshCosts();
  }

  disconnectedCallback() {
    // Keep state if the element is only moved; stop the worker when it is really gone.
    queueMicrotask(() => {
      if (!this.isConnected && this.worker) {
        this.worker.terminate();
        this.worker = null;
        this.prepQueue = Promise.resolve();
        for (const item of this.items) {
          if (item.state === 'queued' || item.state === 'reading' || item.state === 'preparing') {
            this.setError(item, 'invalid', 'aborted', 'preparation stopped: the uploader was removed');
          }
        }
      }
    });
  }

  attributeChangedCallback(name, oldValue, newValue) {
    if (oldValue === newValue || !this.$) return;
    if (name === 'models' || name === 'detail') this.reestimate();
    if (name === 'lane' || name === 'lane-choice') this.laneChanged();
    if (name === 'max-edge') this.$.edge.textContent = String(this.maxEdge);
    if ((name === 'api-key' || name === 'api-base') && this.worker && this.apiKey) this.refreshCosts();
  }

  async loadModels() {
    try {
      const { result } = await this.worker.call('models');
      this.knownModels = new Set(result.models.map((m) => m.id));
      this.priceVersion = result.version;
      this.$.priceVersion.textContent = `Prices as of ${result.version}.`;
      const asked = (this.getAttribute('models') || DEFAULT_MODELS).split(',').map((s) => s.trim()).filter(Boolean);
      const unknown = asked.filter((m) => !this.knownModels.has(m));
      if (unknown.length) {
        this.announce(`Unknown model${unknown.length > 1 ? 's' : ''} ignored: ${unknown.join(', ')}. Known: ${[...this.knownModels].join(', ')}.`);
      }
      this.renderTotals();
    } catch (err) {
      this.announce(`Image preparation is unavailable: ${err.message}`);
    }
  }

  // ----- skeleton -----

  buildSkeleton() {
    const frag = document.createDocumentFragment();
    frag.append(el('link', { rel: 'stylesheet', href: CSS_URL }));
    const $ = (this.$ = {});

    $.input = el('input', {
      type: 'file', id: 'file', multiple: true, hidden: true, tabindex: '-1',
      accept: 'image/jpeg,image/png,image/webp,image/gif,.jpg,.jpeg,.png,.webp,.gif',
    });
    $.pick = el('button', { type: 'button', class: 'pick', part: 'pick-button', text: 'Choose images…' });
    $.edge = el('span', { text: '1024' });
    $.drop = el('div', { class: 'drop', part: 'drop-zone', role: 'group', 'aria-labelledby': 'drop-title', 'aria-describedby': 'drop-help' },
      el('p', { class: 'drop-title', id: 'drop-title', text: 'Drop images here' }),
      el('p', { id: 'drop-help', class: 'hint' },
        'JPEG, PNG, WebP or GIF. Each one is resized in your browser to at most ', $.edge,
        ' px on the long edge before upload; nothing is sent until you press Upload.'),
      $.pick);

    $.status = el('p', { class: 'status', role: 'status', 'aria-live': 'polite', 'aria-atomic': 'true' });

    $.upload = el('button', { type: 'button', class: 'primary', part: 'upload-button', disabled: true, text: 'Upload' });
    $.clear = el('button', { type: 'button', class: 'secondary', disabled: true, text: 'Clear list' });
    $.laneBox = el('input', { type: 'checkbox', id: 'lane-batch', 'aria-describedby': 'lane-help' });
    $.laneHelp = el('span', { id: 'lane-help', class: 'hint', text: '' });
    $.lane = el('div', { class: 'lane', part: 'lane-choice' },
      el('label', { for: 'lane-batch' }, $.laneBox, ' Cheaper (batch, within 24 h)'), $.laneHelp);
    $.totals = el('div', { class: 'totals', part: 'totals', 'aria-live': 'polite' });
    $.priceVersion = el('p', { class: 'hint price-version' });

    $.list = el('ol', { class: 'files', part: 'files', 'aria-label': 'Images' });

    $.searchInput = el('input', {
      type: 'search', id: 'search-q', name: 'q', maxlength: '1000', autocomplete: 'off',
      placeholder: 'red shoes, a receipt, a cat…', 'aria-describedby': 'search-note',
    });
    $.searchButton = el('button', { type: 'submit', class: 'secondary', text: 'Search' });
    $.searchNote = el('p', { id: 'search-note', class: 'hint', 'data-role': 'search-note', 'aria-live': 'polite' });
    $.searchResults = el('ul', { class: 'thumbs', 'data-role': 'search-results', 'aria-label': 'Search results' });
    $.searchForm = el('form', { class: 'search-form', role: 'search' },
      el('label', { for: 'search-q', text: 'Find analysed images' }), $.searchInput, $.searchButton);
    $.search = el('section', { class: 'search', part: 'search', 'aria-label': 'Search analysed images' },
      $.searchForm, $.searchNote, $.searchResults);

    $.costTotal = el('p', { class: 'cost-total', text: 'No spend yet.' });
    $.costChart = el('div', { class: 'cost-chart' });
    $.costRefresh = el('button', { type: 'button', class: 'secondary small', text: 'Refresh' });
    $.costs = el('section', { class: 'costs', part: 'costs', 'aria-labelledby': 'costs-title' },
      el('div', { class: 'costs-head' },
        el('h3', { id: 'costs-title', text: 'Spend (last 30 days)' }), $.costRefresh),
      $.costTotal, $.costChart);

    frag.append(
      el('section', { class: 'uploader', part: 'panel', 'aria-label': 'Image uploader' },
        $.drop, $.input, $.status,
        $.list,
        el('div', { class: 'batch' }, $.totals,
          el('div', { class: 'actions' }, $.lane, $.upload, $.clear)),
        $.priceVersion),
      $.search,
      $.costs);

    // Events.
    $.pick.addEventListener('click', (e) => { e.stopPropagation(); this.openPicker(); });
    // A click anywhere in the zone opens the picker too; keyboard users have the button.
    $.drop.addEventListener('click', (e) => { if (e.target !== $.pick) this.openPicker(); });
    $.input.addEventListener('change', () => {
      const files = [...$.input.files];
      $.input.value = '';
      this.addFiles(files);
    });
    for (const type of ['dragenter', 'dragover']) {
      $.drop.addEventListener(type, (e) => {
        e.preventDefault();
        if (e.dataTransfer) e.dataTransfer.dropEffect = 'copy';
        $.drop.classList.add('over');
      });
    }
    $.drop.addEventListener('dragleave', (e) => {
      if (!$.drop.contains(e.relatedTarget)) $.drop.classList.remove('over');
    });
    $.drop.addEventListener('drop', (e) => {
      e.preventDefault();
      $.drop.classList.remove('over');
      const files = e.dataTransfer ? [...e.dataTransfer.files] : [];
      if (files.length) this.addFiles(files);
    });
    $.upload.addEventListener('click', () => this.upload());
    $.searchForm.addEventListener('submit', (e) => {
      e.preventDefault();
      this.search($.searchInput.value);
    });
    $.clear.addEventListener('click', () => this.clear());
    $.laneBox.addEventListener('change', () => {
      // Once used, the box says both ways: unchecked asks for real time explicitly.
      this.laneChoice = $.laneBox.checked ? 'batch' : 'realtime';
      this.laneChanged();
    });
    $.costRefresh.addEventListener('click', () => this.refreshCosts());
    return frag;
  }

  openPicker() {
    this.$.input.click();
  }

  announce(text) {
    // Re-set so that repeating the same message is announced again.
    this.$.status.textContent = '';
    requestAnimationFrame(() => { this.$.status.textContent = text; });
    this.$.status.dataset.message = text;
  }

  emit(type, item) {
    this.dispatchEvent(new CustomEvent(type, { bubbles: true, composed: true, detail: { item } }));
  }

  // ----- adding and preparing files -----

  /** Add files (a FileList or an array of File/Blob); each is prepared in the worker, in order. */
  addFiles(files) {
    const added = [];
    for (const file of files) {
      const item = {
        id: this.nextId++,
        file,
        name: file.name || 'image',
        size: file.size,
        state: 'queued',
        prepared: null,
        previewUrl: '',
        imageId: '',
        upload: null,
        error: null,
        record: null,
        lane: null, // what the upload request asked for ('' = nothing); null until sent
        progress: 0,
      };
      this.items.push(item);
      this.createRow(item);
      added.push(item);
      this.prepQueue = this.prepQueue.then(() => this.prepare(item));
    }
    if (added.length) this.announce(`Preparing ${added.length} image${added.length > 1 ? 's' : ''}…`);
    this.renderTotals();
    return added;
  }

  async prepare(item) {
    if (item.state !== 'queued' || !this.items.includes(item) || !this.worker) return;
    if (item.size > this.maxBytes) {
      this.setError(item, 'invalid', 'too_large',
        `file is ${formatBytes(item.size)}, over the ${formatBytes(this.maxBytes)} limit`);
      return;
    }
    if (item.size === 0) {
      this.setError(item, 'invalid', 'empty', 'empty file (0 bytes)');
      return;
    }
    try {
      this.setState(item, 'reading');
      await this.modelsReady; // so that unknown models are already filtered out
      const buffer = await item.file.arrayBuffer();
      this.setState(item, 'preparing');
      const { result, ms } = await this.worker.call('prepare', {
        bytes: buffer,
        options: { maxEdge: this.maxEdge, quality: this.quality, models: this.models, ...this.estimateParams },
      }, [buffer]);
      if (!this.items.includes(item)) return; // removed meanwhile
      item.prepared = result;
      item.prepareMs = ms;
      item.previewUrl = URL.createObjectURL(new Blob([result.jpeg], { type: 'image/jpeg' }));
      this.setState(item, 'ready');
      this.emit('sightline-prepared', item);
      const readyCount = this.items.filter((i) => i.state === 'ready').length;
      this.announce(`${item.name} is ready: ${result.width}×${result.height}. ${readyCount} ready to upload.`);
    } catch (err) {
      const code = err.code || 'read_error';
      this.setError(item, 'invalid', code, err.message || String(err));
      this.emit('sightline-error', item);
    }
  }

  async reestimate() {
    if (!this.worker) return;
    const models = this.models;
    for (const item of this.items) {
      const p = item.prepared;
      if (!p) continue;
      try {
        const [now, before] = await Promise.all([
          this.worker.call('estimate', { width: p.width, height: p.height, models, params: this.estimateParams }),
          this.worker.call('estimate', {
            width: p.originalWidth, height: p.originalHeight, models, params: this.estimateParams,
          }),
        ]);
        p.estimates = now.result.map((e, i) => ({
          ...e,
          originalTokens: before.result[i].tokens,
          originalImageTokens: before.result[i].imageTokens,
          originalCostUsd: before.result[i].costUsd,
          originalBatchCostUsd: before.result[i].batchCostUsd,
        }));
        this.renderItem(item);
      } catch (err) {
        this.announce(`Could not re-estimate: ${err.message}`);
        break;
      }
    }
    this.renderTotals();
  }

  /** The lane changed (attribute or checkbox): prices already carry both lanes, re-render. */
  laneChanged() {
    this.renderLaneControl();
    for (const item of this.items) this.renderItem(item);
    this.renderTotals();
  }

  renderLaneControl() {
    const $ = this.$;
    const pinned = this.pinnedLane;
    $.lane.hidden = !this.laneChoiceShown;
    $.laneBox.checked = this.lane === 'batch';
    $.laneBox.disabled = Boolean(pinned);
    $.laneHelp.textContent = pinned
      ? `Set by this page: ${pinned === 'batch' ? 'batch lane, half price, results within 24 h' : 'real time'}.`
      : 'Half price; results can take up to 24 h.';
  }

  // ----- uploading -----

  /** Upload every prepared image that has not been uploaded yet. */
  upload() {
    if (!this.apiKey) {
      this.announce('Set an API key (the api-key attribute) before uploading.');
      return 0;
    }
    const todo = this.items.filter((i) => i.state === 'ready');
    for (const item of todo) this.enqueueUpload(item);
    if (todo.length) this.announce(`Uploading ${todo.length} image${todo.length > 1 ? 's' : ''}…`);
    return todo.length;
  }

  /** Retry a failed upload with the bytes prepared before (no re-encoding). */
  retry(itemId) {
    const item = this.items.find((i) => i.id === itemId);
    if (!item || !item.prepared) return;
    if (item.state === 'upload_error') {
      this.enqueueUpload(item);
    } else if (item.state === 'stalled' || item.state === 'batch_queued') {
      this.setState(item, 'processing');
      this.poll(item);
    }
  }

  enqueueUpload(item) {
    item.error = null;
    item.progress = 0;
    this.setState(item, 'uploading');
    this.uploadQueue.push(item);
    this.pumpUploads();
  }

  pumpUploads() {
    while (this.activeUploads < this.concurrency && this.uploadQueue.length) {
      const item = this.uploadQueue.shift();
      this.activeUploads++;
      this.uploadOne(item).finally(() => {
        this.activeUploads--;
        this.pumpUploads();
      });
    }
  }

  async api(path, init = {}) {
    const headers = { 'x-api-key': this.apiKey, accept: 'application/json', ...(init.headers || {}) };
    let resp;
    try {
      resp = await fetch(`${this.apiBase}${path}`, { ...init, headers });
    } catch (err) {
      throw Object.assign(new Error(`cannot reach the server (${err.message})`), { code: 'network' });
    }
    let body = null;
    const text = await resp.text();
    if (text) {
      try { body = JSON.parse(text); } catch { body = null; }
    }
    if (!resp.ok) {
      const e = body && body.error ? body.error : {};
      const message = e.message || `HTTP ${resp.status} ${resp.statusText}`;
      throw Object.assign(new Error(message), { code: e.code || `http_${resp.status}`, status: resp.status });
    }
    return body;
  }

  async uploadOne(item) {
    if (!this.items.includes(item)) return;
    const jpeg = item.prepared.jpeg;
    try {
      // A retry re-uses the upload URL it was given while that is still valid (no orphan record).
      let created = item.upload;
      const expires = created && Date.parse(created.upload.expires_at || '');
      if (!created || !(expires > Date.now() + 30000)) {
        const lane = this.lane;
        created = await this.api('/v1/uploads', {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({
            filename: jpegName(item.name),
            content_type: 'image/jpeg',
            content_length: jpeg.byteLength,
            ...(this.detail ? { detail: this.detail } : {}),
            ...(lane ? { lane } : {}),
          }),
        });
        item.lane = lane;
        if (!created || !created.image_id || !created.upload || !created.upload.url) {
          throw Object.assign(new Error('the server answered without an upload URL'), { code: 'bad_response' });
        }
        item.upload = created;
      }
      item.imageId = created.image_id;
      this.renderItem(item);
      await this.put(item, created.upload, jpeg);
      item.upload = null;
      item.progress = 1;
      this.setState(item, 'processing');
      this.emit('sightline-uploaded', item);
      this.poll(item);
    } catch (err) {
      // A refused upload URL (expired, bad signature) is not re-used by the retry.
      if (err.status >= 400 && err.status < 500) item.upload = null;
      const prefix = err.code === 'network' ? '' : 'upload failed: ';
      this.setError(item, 'upload_error', err.code || 'upload_failed', `${prefix}${err.message}`);
      this.emit('sightline-error', item);
    }
  }

  /** PUT with XMLHttpRequest (fetch has no upload progress). */
  put(item, upload, jpeg) {
    return new Promise((resolve, reject) => {
      const url = new URL(upload.url, `${this.apiBase}/`);
      const xhr = new XMLHttpRequest();
      xhr.open(upload.method || 'PUT', url.href);
      const headers = upload.headers || {};
      let hasType = false;
      for (const [k, v] of Object.entries(headers)) {
        const lower = k.toLowerCase();
        if (lower === 'content-length' || lower === 'host') continue; // set by the browser
        if (lower === 'content-type') hasType = true;
        xhr.setRequestHeader(k, v);
      }
      if (!hasType) xhr.setRequestHeader('content-type', 'image/jpeg');
      // Our own server's upload route may want the key; a presigned URL elsewhere must not get it.
      if (url.origin === new URL(this.apiBase).origin && !('x-api-key' in headers)) {
        xhr.setRequestHeader('x-api-key', this.apiKey);
      }
      xhr.upload.addEventListener('progress', (e) => {
        if (e.lengthComputable) {
          item.progress = e.loaded / e.total;
          this.renderProgress(item);
        }
      });
      xhr.addEventListener('load', () => {
        if (xhr.status >= 200 && xhr.status < 300) {
          resolve();
          return;
        }
        let message = `HTTP ${xhr.status}`;
        let code = `http_${xhr.status}`;
        try {
          const body = JSON.parse(xhr.responseText);
          if (body && body.error) { message = body.error.message || message; code = body.error.code || code; }
        } catch { /* not JSON (e.g. S3 XML) */ }
        reject(Object.assign(new Error(message), { code, status: xhr.status }));
      });
      xhr.addEventListener('error', () => reject(Object.assign(new Error('network error during upload'), { code: 'network' })));
      xhr.addEventListener('timeout', () => reject(Object.assign(new Error('upload timed out'), { code: 'timeout' })));
      xhr.addEventListener('abort', () => reject(Object.assign(new Error('upload aborted'), { code: 'aborted' })));
      xhr.send(new Blob([jpeg], { type: 'image/jpeg' }));
    });
  }

  async poll(item) {
    const started = Date.now();
    let delay = 500;
    let failures = 0;
    while (this.items.includes(item)) {
      await new Promise((r) => setTimeout(r, delay));
      if (!this.items.includes(item) || item.state !== 'processing') return;
      try {
        const rec = await this.api(`/v1/images/${encodeURIComponent(item.imageId)}`);
        failures = 0;
        item.record = rec;
        item.serverStatus = rec.status;
        if (rec.status === 'done') {
          item.prepared.jpeg = null; // uploaded and analysed: the preview blob is all we need
          this.setState(item, 'done');
          this.emit('sightline-analysed', item);
          this.loadSimilar(item);
          this.announce(`${item.name}: analysed${rec.result ? `, ${formatUsd(rec.result.cost_usd)}` : ''}`
            + `${rec.result && rec.result.lane === 'batch' ? ' (batch lane)' : ''}.`);
          this.refreshCosts();
          return;
        }
        if (rec.status === 'failed') {
          this.setError(item, 'failed', 'analysis_failed', rec.error || 'the analysis failed');
          this.emit('sightline-error', item);
          this.refreshCosts();
          return;
        }
        this.renderItem(item);
      } catch (err) {
        failures++;
        if (err.status === 401 || err.status === 404 || failures >= 5) {
          this.setError(item, 'stalled', err.code || 'poll_failed', `could not get the status: ${err.message}`);
          return;
        }
      }
      if (Date.now() - started > this.pollTimeoutMs) {
        // A batch answer may take 24 h: waiting longer is expected, not a failure.
        if (this.itemLane(item) === 'batch') {
          this.setState(item, 'batch_queued');
          this.emit('sightline-queued', item);
          this.announce(`${item.name}: queued for the batch lane; results within 24 h.`);
          return;
        }
        this.setError(item, 'stalled', 'timeout', `no result after ${Math.round(this.pollTimeoutMs / 1000)} s; the server may still be working`);
        return;
      }
      delay = Math.min(Math.round(delay * 1.4), 3000);
    }
  }

  // ----- similarity and search -----

  /** The analysed images nearest to a done item, shown under its result (none if search is off). */
  async loadSimilar(item) {
    try {
      const found = await this.api(`/v1/images/${encodeURIComponent(item.imageId)}/similar?top=4`);
      item.similar = found.results || [];
    } catch (err) {
      // 409: no vector yet; 503: search is off here. Neither is the user's problem.
      item.similar = [];
    }
    if (this.items.includes(item)) this.renderItem(item);
  }

  /** A text search over the tenant's analysed images; the answer says how it was matched. */
  async search(query) {
    const $ = this.$;
    const q = String(query || '').trim();
    if (!q) {
      $.searchNote.textContent = 'Type what to look for.';
      $.searchResults.replaceChildren();
      return;
    }
    const seq = (this.searchSeq = (this.searchSeq || 0) + 1);
    $.searchNote.textContent = 'Searching…';
    try {
      const found = await this.api(`/v1/search?q=${encodeURIComponent(q)}&top=12`);
      if (seq !== this.searchSeq) return;
      const n = (found.results || []).length;
      const how = found.mode === 'keyword'
        ? 'matched against the analyses (tags, description, text)'
        : `by meaning (${found.model})`;
      $.searchNote.textContent = `${n} image${n === 1 ? '' : 's'} ${how}.`;
      $.searchResults.replaceChildren(...this.thumbs(found.results || []));
      this.emit('sightline-search', { query: q, mode: found.mode, results: found.results || [] });
    } catch (err) {
      if (seq !== this.searchSeq) return;
      $.searchNote.textContent = `Search failed: ${err.message}`;
      $.searchResults.replaceChildren();
    }
  }

  /** Thumbnails of found images: the picture when the server signed a URL, else its name. */
  thumbs(results) {
    return results.map((hit) => {
      const label = hit.description || hit.image_id;
      const fig = el('figure', {});
      if (hit.thumbnail_url) {
        fig.append(el('img', { src: hit.thumbnail_url, alt: label, loading: 'lazy', decoding: 'async' }));
      }
      fig.append(el('figcaption', {
        text: `${hit.description ? hit.description.slice(0, 60) : hit.image_id} · ${Number(hit.distance).toFixed(3)}`,
      }));
      return el('li', { 'data-image-id': hit.image_id, title: label }, fig);
    });
  }

  // ----- costs -----

  async refreshCosts() {
    if (!this.apiKey) return;
    const seq = (this.costSeq = (this.costSeq || 0) + 1);
    try {
      const report = await this.api('/v1/costs');
      if (seq !== this.costSeq) return;
      this.renderCosts(report);
    } catch (err) {
      if (seq !== this.costSeq) return;
      this.$.costTotal.textContent = `Spend unavailable: ${err.message}`;
      this.$.costs.dataset.state = 'error';
    }
  }

  renderCosts(report) {
    const total = (report && report.total) || {};
    const byModel = ((report && report.by_model) || []).filter((m) => m && m.model);
    this.$.costs.dataset.state = 'ok';
    this.$.costs.dataset.total = String(total.cost_usd || 0);
    this.$.costTotal.textContent = `Total ${formatUsd(total.cost_usd || 0)} for ${formatInt(total.images || 0)} image${total.images === 1 ? '' : 's'}`
      + ` · ${formatInt(total.input_tokens || 0)} input + ${formatInt(total.output_tokens || 0)} output tokens`;
    const chart = this.$.costChart;
    chart.replaceChildren();
    if (!byModel.length) return;
    const max = Math.max(...byModel.map((m) => m.cost_usd || 0), 1e-12);
    const rowH = 22;
    const labelW = 130;
    const barW = 220;
    const valueW = 110;
    const width = labelW + barW + valueW;
    const height = byModel.length * rowH + 4;
    const s = svg('svg', {
      viewBox: `0 0 ${width} ${height}`, width, height, role: 'img', class: 'bars',
      'aria-label': `Spend by model: ${byModel.map((m) => `${m.model} ${formatUsd(m.cost_usd || 0)}`).join(', ')}`,
    });
    byModel.forEach((m, i) => {
      const y = i * rowH + 2;
      const label = svg('text', { x: labelW - 6, y: y + rowH / 2 + 4, 'text-anchor': 'end', class: 'bar-label' });
      label.textContent = m.model;
      const w = Math.max(2, Math.round(((m.cost_usd || 0) / max) * barW));
      const rect = svg('rect', { x: labelW, y: y + 3, width: w, height: rowH - 8, rx: 3, class: 'bar', 'data-model': m.model });
      const title = svg('title');
      title.textContent = `${m.model}: ${formatUsd(m.cost_usd || 0)}, ${m.images || 0} images`;
      rect.append(title);
      const value = svg('text', { x: labelW + w + 6, y: y + rowH / 2 + 4, class: 'bar-value' });
      value.textContent = `${formatUsd(m.cost_usd || 0)} · ${m.images || 0}`;
      s.append(label, rect, value);
    });
    chart.append(s);
  }

  // ----- rendering -----

  createRow(item) {
    const r = (item.row = {});
    r.li = el('li', { class: 'file', 'data-id': item.id, 'data-name': item.name });
    r.thumb = el('div', { class: 'thumb', 'aria-hidden': 'true' });
    r.name = el('p', { class: 'name', text: item.name });
    r.state = el('p', { class: 'state', 'data-role': 'state' });
    r.dims = el('p', { class: 'dims', 'data-role': 'dims' });
    r.estimates = el('div', { class: 'estimates', 'data-role': 'estimates' });
    r.progress = el('progress', { max: '100', value: '0', hidden: true, 'aria-label': `Upload progress for ${item.name}` });
    r.error = el('p', { class: 'error', 'data-role': 'error', hidden: true });
    r.result = el('div', { class: 'result', 'data-role': 'result', hidden: true });
    r.retry = el('button', { type: 'button', class: 'secondary small', hidden: true, text: 'Retry upload' });
    r.remove = el('button', { type: 'button', class: 'link small', 'aria-label': `Remove ${item.name}`, text: 'Remove' });
    r.retry.addEventListener('click', () => this.retry(item.id));
    r.remove.addEventListener('click', () => this.remove(item.id));
    r.li.append(r.thumb,
      el('div', { class: 'body' },
        el('div', { class: 'head' }, r.name, r.remove),
        r.state, r.dims, r.estimates, r.progress, r.error, r.result,
        el('div', { class: 'row-actions' }, r.retry)));
    this.$.list.append(r.li);
    this.renderItem(item);
  }

  setState(item, state) {
    item.state = state;
    if (state !== 'upload_error' && state !== 'invalid' && state !== 'failed' && state !== 'stalled') item.error = null;
    this.renderItem(item);
    this.renderTotals();
  }

  setError(item, state, code, message) {
    item.error = { code, message };
    item.state = state;
    this.renderItem(item);
    this.renderTotals();
    if (state === 'invalid') this.announce(`${item.name}: ${message}`);
    else if (state === 'upload_error') this.announce(`${item.name}: ${message}. You can retry.`);
    else this.announce(`${item.name}: ${message}`);
  }

  renderProgress(item) {
    const pct = Math.round(item.progress * 100);
    item.row.progress.value = pct;
    item.row.progress.textContent = `${pct}%`;
  }

  renderItem(item) {
    const r = item.row;
    if (!r) return;
    r.li.dataset.state = item.state;
    if (item.imageId) r.li.dataset.imageId = item.imageId;
    let stateText = STATE_TEXT[item.state] || item.state;
    if (item.state === 'processing' && item.serverStatus === 'queued') {
      stateText = this.itemLane(item) === 'batch' ? 'In the batch lane: waiting for its batch (within 24 h)…' : 'Analysing…';
    }
    r.state.textContent = stateText;

    const p = item.prepared;
    if (p && item.previewUrl && !r.img) {
      r.img = el('img', { src: item.previewUrl, alt: '', width: p.width, height: p.height, decoding: 'async' });
      r.thumb.replaceChildren(r.img);
    }
    if (p) {
      r.dims.textContent = `${p.originalWidth}×${p.originalHeight} → ${p.width}×${p.height} · `
        + `${formatBytes(p.bytesBefore)} → ${formatBytes(p.bytesAfter)}`
        + (p.orientation && p.orientation !== 1 ? ` · EXIF orientation ${p.orientation} applied` : '');
      r.dims.dataset.width = p.width;
      r.dims.dataset.height = p.height;
      this.renderEstimates(item);
    } else {
      r.dims.textContent = `${formatBytes(item.size)}`;
    }

    const uploading = item.state === 'uploading';
    r.progress.hidden = !(uploading || (item.state === 'processing' && item.progress > 0) || item.state === 'upload_error');
    this.renderProgress(item);

    r.error.hidden = !item.error;
    r.error.textContent = item.error ? `${item.error.message}` : '';
    if (item.error) r.error.dataset.code = item.error.code;
    else delete r.error.dataset.code;

    const recheck = item.state === 'stalled' || item.state === 'batch_queued';
    r.retry.hidden = !(item.state === 'upload_error' || recheck);
    r.retry.textContent = recheck ? 'Check again' : 'Retry upload';
    r.retry.setAttribute('aria-label', `${r.retry.textContent}: ${item.name}`);

    const rec = item.record;
    if (item.state === 'done' && rec) this.renderResult(item, rec);
    else r.result.hidden = true;
  }

  renderEstimates(item) {
    const p = item.prepared;
    const r = item.row;
    const lane = this.itemLane(item);
    const batch = lane === 'batch';
    const table = el('table', { class: 'est', 'data-lane': lane || 'realtime' },
      el('caption', { class: 'visually-hidden', text: `Estimated cost of ${item.name}${batch ? ' in the batch lane' : ''}` }),
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col', text: 'Model' }),
        el('th', { scope: 'col', text: 'Tokens' }),
        el('th', { scope: 'col', text: batch ? 'Est. cost (batch)' : 'Est. cost' }),
        el('th', { scope: 'col', text: 'Unresized' }))));
    const body = el('tbody');
    for (const e of p.estimates || []) {
      const c = laneCosts(e, lane);
      body.append(el('tr', { 'data-model': e.model },
        el('th', { scope: 'row', text: e.model }),
        el('td', { 'data-tokens': e.tokens, title: `${formatInt(e.imageTokens)} image tokens + prompt + expected output`, text: formatInt(e.tokens) }),
        el('td', { 'data-cost': c.cost, title: batch ? `real time: ${formatUsd(e.costUsd)}` : null, text: formatUsd(c.cost) }),
        el('td', { class: 'muted', text: `${formatUsd(c.original)}` })));
    }
    table.append(body);
    r.estimates.replaceChildren(table);
  }

  renderResult(item, rec) {
    const r = item.row;
    const res = rec.result || {};
    const analysis = res.analysis || {};
    const parts = [];
    const description = analysis.description || analysis.summary || analysis.caption;
    if (description) parts.push(el('p', { class: 'description', 'data-role': 'description', text: String(description) }));
    const tags = Array.isArray(analysis.tags) ? analysis.tags : [];
    if (tags.length) {
      const ul = el('ul', { class: 'tags', 'aria-label': 'Tags' });
      for (const t of tags.slice(0, 20)) ul.append(el('li', { text: typeof t === 'string' ? t : (t && t.name) || JSON.stringify(t) }));
      parts.push(ul);
    }
    const usage = res.usage || {};
    const est = (item.prepared && item.prepared.estimates || []).find((e) => e.model === res.model);
    const lane = res.lane || 'realtime';
    const costLine = el('p', {
      class: 'real-cost', 'data-role': 'real-cost', 'data-cost': res.cost_usd ?? '', 'data-lane': lane,
      'data-saved': res.saved_usd ?? null,
    },
      `${res.model || 'model'}: ${formatUsd(res.cost_usd ?? 0)} actual`
      + ` (${formatInt(usage.input_tokens || 0)} in + ${formatInt(usage.output_tokens || 0)} out tokens)`
      + (res.cached ? ' · cached, no provider call' : '')
      + (lane === 'batch' ? ` · batch lane${res.saved_usd ? `, saved ${formatUsd(res.saved_usd)}` : ''}` : '')
      + (est ? ` · estimated ${formatUsd(laneCosts(est, lane).cost)}` : ''));
    parts.push(costLine);
    if (res.reused_from) {
      parts.push(el('p', { class: 'hint', 'data-role': 'reused', text: `A near-copy of image ${res.reused_from}: its analysis was reused, no provider call.` }));
    }
    const details = el('details', {}, el('summary', { text: 'Full analysis (JSON)' }),
      el('pre', { text: JSON.stringify(analysis, null, 2) }));
    parts.push(details);
    if (item.similar && item.similar.length) {
      parts.push(el('div', { class: 'similar', 'data-role': 'similar' },
        el('p', { class: 'hint', text: 'Similar images' }),
        el('ul', { class: 'thumbs', 'aria-label': 'Similar images' }, ...this.thumbs(item.similar))));
    }
    r.result.replaceChildren(...parts);
    r.result.hidden = false;
  }

  renderTotals() {
    const $ = this.$;
    const ready = this.items.filter((i) => i.state === 'ready' && i.prepared);
    const busy = this.items.filter((i) => ['queued', 'reading', 'preparing'].includes(i.state)).length;
    const invalid = this.items.filter((i) => i.state === 'invalid').length;
    $.upload.disabled = ready.length === 0;
    $.upload.textContent = ready.length ? `Upload ${ready.length} image${ready.length > 1 ? 's' : ''}` : 'Upload';
    $.clear.disabled = this.items.length === 0;
    if (!this.items.length) {
      $.totals.replaceChildren(el('p', { class: 'hint', text: 'No images yet.' }));
      return;
    }
    const sums = new Map();
    const batch = this.lane === 'batch'; // ready items go in the next uploads' lane
    for (const item of ready) {
      for (const e of item.prepared.estimates || []) {
        const s = sums.get(e.model) || { tokens: 0, cost: 0, original: 0 };
        const c = laneCosts(e, this.lane);
        s.tokens += e.tokens;
        s.cost += c.cost;
        s.original += c.original;
        sums.set(e.model, s);
      }
    }
    const lines = [];
    const head = [`${ready.length} ready`];
    if (busy) head.push(`${busy} preparing`);
    if (invalid) head.push(`${invalid} cannot be used`);
    lines.push(el('p', { class: 'batch-head', text: head.join(' · ') }));
    if (sums.size) {
      const ul = el('ul', { class: 'batch-models', 'data-lane': this.lane || 'realtime', 'aria-label': 'Estimated total before upload' });
      for (const [model, s] of sums) {
        ul.append(el('li', { 'data-model': model, 'data-cost': s.cost, 'data-tokens': s.tokens },
          el('strong', { text: model }),
          ` ${formatInt(s.tokens)} tokens ≈ ${formatUsd(s.cost)}`,
          el('span', { class: 'muted', text: ` (unresized ${formatUsd(s.original)})` })));
      }
      lines.push(el('p', {
        class: 'hint',
        text: `Estimated total before upload (image + prompt + expected answer)${batch ? ' at batch prices, results within 24 h' : ''},`
          + ' one analysis per image with the model you run:',
      }), ul);
    }
    $.totals.replaceChildren(...lines);
  }

  remove(itemId) {
    const idx = this.items.findIndex((i) => i.id === itemId);
    if (idx < 0) return;
    const [item] = this.items.splice(idx, 1);
    if (item.previewUrl) URL.revokeObjectURL(item.previewUrl);
    this.uploadQueue = this.uploadQueue.filter((i) => i !== item);
    item.row.li.remove();
    this.renderTotals();
    this.announce(`${item.name} removed.`);
  }

  /** Remove every image from the list (uploads already sent go on on the server). */
  clear() {
    for (const item of [...this.items]) {
      if (item.previewUrl) URL.revokeObjectURL(item.previewUrl);
    }
    this.items = [];
    this.uploadQueue = [];
    this.$.list.replaceChildren();
    this.renderTotals();
    this.announce('List cleared.');
  }
}

if (!customElements.get('sightline-uploader')) {
  customElements.define('sightline-uploader', SightlineUploader);
}

export { SightlineUploader };
