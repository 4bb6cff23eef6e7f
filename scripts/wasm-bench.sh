#!/usr/bin/env bash
# Benchmark the browser package: median time of the widget's prepareImage on
# tests/fixtures/large/phone12mp.jpg in headless Chromium (>= 9 runs after a warm-up) against
# the platform path (createImageBitmap + OffscreenCanvas.convertToBlob) in the same page, and
# the widget's first load gzipped, against the targets (ratio <= 1, <= 150 KB). Builds the
# package first unless SIGHTLINE_BENCH_NO_BUILD=1.
# Extra arguments go to tests/browser/bench.mjs (--runs N, --warmup N, --pkg DIR, --strict, --json FILE).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/browser-setup.sh
if [[ "${SIGHTLINE_BENCH_NO_BUILD:-0}" != "1" ]]; then
  bash scripts/wasm-build.sh
fi
node tests/browser/bench.mjs "$@"
