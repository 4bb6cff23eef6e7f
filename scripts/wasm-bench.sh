#!/usr/bin/env bash
# Benchmark the browser package: median prepareImage time on tests/fixtures/large/phone12mp.jpg
# in headless Chromium (>= 9 runs after a warm-up) and the .wasm size gzipped, against the
# targets (<= 150 ms, <= 150 KB). Builds the package first unless SIGHTLINE_BENCH_NO_BUILD=1.
# Extra arguments go to tests/browser/bench.mjs (--runs N, --warmup N, --pkg DIR, --strict, --json FILE).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/browser-setup.sh
if [[ "${SIGHTLINE_BENCH_NO_BUILD:-0}" != "1" ]]; then
  bash scripts/wasm-build.sh
fi
node tests/browser/bench.mjs "$@"
