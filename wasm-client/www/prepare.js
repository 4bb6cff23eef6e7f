// sightline image preparation for the browser: the server's rules, the browser's decoder.
//
//   import { ready, prepareImage, estimate, models, version } from './prepare.js';
//   const r = await prepareImage(bytesOrBlob, { maxEdge: 1024, quality: 85, models: ['gpt-4o'] });
//
// What the page downloads first is the small WebAssembly module (pkg/sightline_light.js): the
// core's header reading, refusals, output-size rule, estimator and price table, with no image
// decoder. For each file it says what the server would do (planImage): refuse it (thrown with
// the server's code and message), or give an upright outWidth×outHeight JPEG. The browser's
// own decoder (WebCodecs ImageDecoder, else createImageBitmap) then decodes, the canvas
// resizes and encodes (no EXIF survives a canvas; the sRGB profile Chromium adds is taken out), and the estimates come from the small
// module for that size: the same figures as the server's for the same file.
//
// The full module (pkg/sightline_wasm.js: the server's decoders, resizer and encoder) is
// loaded only when needed: formats or layouts the small module routes to it (CMYK JPEG, EXIF
// in a PNG or WebP, animated PNG, broken headers: the server's exact error comes from it),
// a browser decoder that fails or hands back a picture of another shape or orientation, or
// `path: 'wasm'` in the options.
//
// The result is the full module's shape: {jpeg, width, height, originalWidth, originalHeight,
// orientation, format, bytesBefore, bytesAfter, sha256, priceVersion, estimates}, plus `path`
// ('platform' or 'wasm') and, for 'wasm', `reason`.

import initLight, {
  planImage, estimateImage, estimate as lightEstimate, models as lightModels,
  version as lightVersion,
} from '../pkg/sightline_light.js';

let lightReady = null;
/** Load the small module (once). Resolves when prepareImage can run. */
export function ready() {
  if (!lightReady) lightReady = initLight();
  return lightReady;
}

let full = null;
/** The full module, loaded on first need. */
export function loadFull() {
  if (!full) {
    full = import('../pkg/sightline_wasm.js').then(async (m) => {
      await m.default();
      return m;
    });
    full.catch(() => { full = null; });
  }
  return full;
}

export function estimate(width, height, models, params) {
  return lightEstimate(width, height, models, params);
}
export function models() {
  return lightModels();
}
export function version() {
  return lightVersion();
}

const MIME = { jpg: 'image/jpeg', png: 'image/png', webp: 'image/webp', gif: 'image/gif' };

// EXIF orientation → the rotation (degrees clockwise) and horizontal flip a WebCodecs
// VideoFrame reports for it; drawImage applies them.
const FRAME_TRANSFORM = {
  1: [0, false], 2: [0, true], 3: [180, false], 4: [180, true],
  5: [90, true], 6: [90, false], 7: [270, true], 8: [270, false],
};

const supported = new Map();
async function imageDecoderFor(type, orientation) {
  if (typeof ImageDecoder === 'undefined' || typeof VideoFrame === 'undefined') return false;
  // Without frame rotation (older engines) an EXIF-rotated image would come out unrotated.
  if (orientation !== 1 && !('rotation' in VideoFrame.prototype)) return false;
  if (!supported.has(type)) supported.set(type, ImageDecoder.isTypeSupported(type).catch(() => false));
  return supported.get(type);
}

/**
 * Decode `bytes` with the browser, upright. JPEGs are decoded at the smallest of libjpeg's
 * N/8 scales that still covers the output (as the server's decoder does at 1/2, 1/4, 1/8).
 * Returns {image, width, height, exact, via, close()}: `image` draws upright.
 */
async function platformDecode(bytes, plan, type) {
  if (await imageDecoderFor(type, plan.orientation)) {
    const init = { data: bytes, type, preferAnimation: false };
    if (plan.format === 'jpg') {
      // The output size in stored orientation.
      const swap = plan.orientation >= 5;
      const tw = swap ? plan.outHeight : plan.outWidth;
      const th = swap ? plan.outWidth : plan.outHeight;
      for (let n = 1; n <= 8; n++) {
        const w = Math.ceil((plan.storedWidth * n) / 8);
        const h = Math.ceil((plan.storedHeight * n) / 8);
        if (w >= tw && h >= th) {
          if (n < 8) Object.assign(init, { desiredWidth: w, desiredHeight: h });
          break;
        }
      }
    }
    const decoder = new ImageDecoder(init);
    let frame;
    try {
      ({ image: frame } = await decoder.decode({ frameIndex: 0 }));
    } catch (err) {
      decoder.close();
      throw err;
    }
    const close = () => { frame.close(); decoder.close(); };
    const [rotation, flip] = FRAME_TRANSFORM[plan.orientation];
    if ((frame.rotation || 0) !== rotation || Boolean(frame.flip) !== flip) {
      close();
      throw new Error(`the browser read orientation as rotation ${frame.rotation}, flip ${frame.flip}; `
        + `the server reads EXIF ${plan.orientation}`);
    }
    return {
      image: frame, width: frame.displayWidth, height: frame.displayHeight,
      exact: !init.desiredWidth, via: 'ImageDecoder', close,
    };
  }
  const bitmap = await createImageBitmap(new Blob([bytes], { type }), { imageOrientation: 'from-image' });
  return {
    image: bitmap, width: bitmap.width, height: bitmap.height, exact: true,
    via: 'createImageBitmap', close: () => bitmap.close(),
  };
}

/** The browser's decode, resized onto a canvas of the server's output size, as a JPEG. */
async function platformPrepare(bytes, plan, quality) {
  const type = MIME[plan.format];
  const decoded = await platformDecode(bytes, plan, type);
  const W = plan.outWidth;
  const H = plan.outHeight;
  let canvas;
  try {
    // The picture must be the original's, upright: same size, or (scaled JPEG decode) the same
    // proportions within the rounding of a scaled side.
    const { width: dw, height: dh } = decoded;
    const same = decoded.exact
      ? dw === plan.width && dh === plan.height
      : Math.abs(dw * plan.height - dh * plan.width) <= Math.max(plan.width, plan.height)
        && dw >= W && dh >= H;
    if (!same) {
      throw new Error(`the browser decoded ${dw}×${dh}; the server reads ${plan.width}×${plan.height}`);
    }
    canvas = new OffscreenCanvas(W, H);
    const ctx = canvas.getContext('2d', { alpha: false });
    // Transparent pixels come out on white, as the server flattens them.
    ctx.fillStyle = '#fff';
    ctx.fillRect(0, 0, W, H);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(decoded.image, 0, 0, W, H);
  } finally {
    decoded.close();
  }
  const blob = await canvas.convertToBlob({ type: 'image/jpeg', quality: quality / 100 });
  return { jpeg: stripMetadata(new Uint8Array(await blob.arrayBuffer())), via: decoded.via };
}

/**
 * The JPEG without APP1-APP15 segments: Chromium's encoder embeds an sRGB ICC profile (APP2);
 * the server's JPEG carries no metadata at all, and the pixels are sRGB either way.
 */
export function stripMetadata(jpeg) {
  if (jpeg[0] !== 0xff || jpeg[1] !== 0xd8) return jpeg;
  const keep = [jpeg.subarray(0, 2)];
  let i = 2;
  let dropped = false;
  while (i + 4 <= jpeg.length && jpeg[i] === 0xff) {
    const marker = jpeg[i + 1];
    if (marker === 0xda) break; // the scan and everything after it stay
    const end = i + 2 + ((jpeg[i + 2] << 8) | jpeg[i + 3]);
    if (marker >= 0xe1 && marker <= 0xef) dropped = true;
    else keep.push(jpeg.subarray(i, end));
    i = end;
  }
  if (!dropped) return jpeg;
  keep.push(jpeg.subarray(i));
  const out = new Uint8Array(keep.reduce((n, k) => n + k.length, 0));
  let at = 0;
  for (const k of keep) {
    out.set(k, at);
    at += k.length;
  }
  return out;
}

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  let hex = '';
  for (const b of digest) hex += b.toString(16).padStart(2, '0');
  return hex;
}

/**
 * Prepare one image: bytes (Uint8Array, ArrayBuffer or Blob) and options {maxEdge, quality,
 * models, maxInputBytes, maxPixels, maxAllocBytes, detail, promptTokens,
 * expectedOutputTokens, path: 'auto' | 'wasm'}. Throws Errors with the server's `code`.
 */
export async function prepareImage(input, options = {}) {
  await ready();
  let bytes;
  if (input instanceof Uint8Array) bytes = input;
  else if (typeof Blob !== 'undefined' && input instanceof Blob) bytes = new Uint8Array(await input.arrayBuffer());
  else bytes = new Uint8Array(input);
  const opts = options || {};
  const plan = planImage(bytes, opts); // the server's refusals are thrown here
  let reason = plan.reason;
  if (plan.route === 'platform' && opts.path !== 'wasm') {
    try {
      const quality = opts.quality === undefined || opts.quality === null ? 85 : opts.quality;
      const { jpeg, via } = await platformPrepare(bytes, plan, quality);
      const estimates = estimateImage(plan.outWidth, plan.outHeight, plan.width, plan.height, opts);
      return {
        jpeg,
        width: plan.outWidth,
        height: plan.outHeight,
        originalWidth: plan.width,
        originalHeight: plan.height,
        orientation: plan.orientation,
        format: plan.format,
        bytesBefore: bytes.length,
        bytesAfter: jpeg.length,
        sha256: await sha256Hex(jpeg),
        priceVersion: lightVersion().priceVersion,
        estimates,
        path: 'platform',
        via,
      };
    } catch (err) {
      reason = `the browser could not prepare it: ${err && err.message ? err.message : err}`;
    }
  } else if (opts.path === 'wasm') {
    reason = 'asked for';
  }
  const m = await loadFull();
  const result = m.prepareImage(bytes, opts);
  return Object.assign(result, { path: 'wasm', reason });
}
