// sightline preparation worker (module worker): prepares images off the main thread with
// prepare.js: the server's rules from the small WebAssembly module (sightline_light), the
// browser's own decoder and canvas, and the full module (sightline_wasm: the server's decoders
// and encoder) loaded only for what the browser cannot do the server's way.
//
// Messages in:  {id, type: 'prepare', bytes: ArrayBuffer, options}
//               {id, type: 'estimate', width, height, models, params}
//               {id, type: 'models'} | {id, type: 'version'}
// Messages out: {id, ok: true, result, ms} | {id, ok: false, error: {code, message}, fatal}
// `fatal` means the WebAssembly instance trapped (e.g. out of memory): the page should
// terminate this worker and start a new one.

import { ready as init, prepareImage, estimate, models, version } from './prepare.js';

const ready = init().then(
  () => ({ ok: true }),
  (err) => ({ ok: false, error: err }),
);

function describe(err) {
  if (err && typeof err === 'object' && typeof err.code === 'string') {
    return { code: err.code, message: String(err.message || err.code), fatal: false };
  }
  const fatal = typeof WebAssembly !== 'undefined' && err instanceof WebAssembly.RuntimeError;
  return {
    code: fatal ? 'internal' : 'worker_error',
    message: fatal
      ? `image preparation crashed (${err.message}); the image may be too large for this device`
      : String((err && err.message) || err),
    fatal,
  };
}

self.addEventListener('message', async (event) => {
  const msg = event.data || {};
  const { id, type } = msg;
  const started = performance.now();
  const loaded = await ready;
  if (!loaded.ok) {
    self.postMessage({
      id,
      ok: false,
      error: {
        code: 'wasm_unavailable',
        message: `could not load the image preparation module: ${loaded.error && loaded.error.message ? loaded.error.message : loaded.error}`,
      },
      fatal: false,
    });
    return;
  }
  try {
    let result;
    const transfer = [];
    switch (type) {
      case 'prepare': {
        const bytes = new Uint8Array(msg.bytes);
        result = await prepareImage(bytes, msg.options || {});
        transfer.push(result.jpeg.buffer);
        break;
      }
      case 'estimate':
        result = estimate(msg.width, msg.height, msg.models, msg.params);
        break;
      case 'models':
        result = models();
        break;
      case 'version':
        result = version();
        break;
      default:
        throw Object.assign(new Error(`unknown request type ${type}`), { code: 'bad_request' });
    }
    self.postMessage({ id, ok: true, result, ms: performance.now() - started }, transfer);
  } catch (err) {
    const { code, message, fatal } = describe(err);
    self.postMessage({ id, ok: false, error: { code, message }, fatal, ms: performance.now() - started });
  }
});

ready.then((r) => self.postMessage({ type: 'ready', ok: r.ok }));
