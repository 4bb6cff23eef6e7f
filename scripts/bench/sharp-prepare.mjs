// The baseline of scripts/bench.sh's server comparison: sharp (libvips, shrink-on-load,
// mozjpeg) doing what `prepare` does to the phone photo: EXIF rotation, fit inside 768×1024,
// JPEG q85 without metadata, back to back on one thread. Prints one JSON line like
// functions/core/examples/prepare_time.rs.
//
//   node scripts/bench/sharp-prepare.mjs SHARP_DIR FILE [RUNS] [OUT.jpg]
import { createRequire } from 'node:module';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';

const [sharpDir, file, runsArg, out] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(sharpDir), 'index.js'));
const sharp = require('sharp');
sharp.concurrency(1);
sharp.cache(false);
const input = readFileSync(file);
const runs = Math.max(1, Number(runsArg || 21));
const once = () =>
  sharp(input)
    .rotate()
    .resize(768, 1024, { fit: 'inside', withoutEnlargement: true })
    .jpeg({ quality: 85, mozjpeg: process.env.SHARP_MOZJPEG === '1' })
    .toBuffer({ resolveWithObject: true });
const first = await once();
const times = [];
for (let i = 0; i < runs; i++) {
  const t = process.hrtime.bigint();
  await once();
  times.push(Number(process.hrtime.bigint() - t) / 1e6);
}
times.sort((a, b) => a - b);
if (out) writeFileSync(out, first.data);
console.log(JSON.stringify({
  median_ms: +times[Math.floor(times.length / 2)].toFixed(2),
  min_ms: +times[0].toFixed(2),
  max_ms: +times[times.length - 1].toFixed(2),
  runs,
  width: first.info.width,
  height: first.info.height,
  bytes: first.info.size,
  sharp: sharp.versions.sharp,
}));
