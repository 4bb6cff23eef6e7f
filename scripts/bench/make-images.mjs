// N distinct small PNGs for the limiter benchmark (sharp from scripts/bench.sh's throwaway
// install): each a 64×48 gradient whose colours come from its index, so every resized JPEG, and
// so every cache key, differs.
//
//   node scripts/bench/make-images.mjs SHARP_DIR OUT_DIR N
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
import path from 'node:path';

const [sharpDir, outDir, nArg] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(sharpDir), 'index.js'));
const sharp = require('sharp');
const n = Number(nArg || 1000);
mkdirSync(outDir, { recursive: true });
const w = 64;
const h = 48;
for (let i = 0; i < n; i++) {
  const px = Buffer.alloc(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const o = (y * w + x) * 3;
      px[o] = (i * 7 + x * 3) & 255;
      px[o + 1] = ((i >> 3) * 11 + y * 5) & 255;
      px[o + 2] = ((i >> 6) * 13 + x + y) & 255;
    }
  }
  await sharp(px, { raw: { width: w, height: h, channels: 3 } })
    .png()
    .toFile(path.join(outDir, `img-${String(i).padStart(5, '0')}.png`));
}
