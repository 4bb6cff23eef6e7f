#!/usr/bin/env bash
# The performance targets of issue #12, each beside a baseline measured in the same run, as one
# table (a benchmark, not part of scripts/test.sh; figures on a shared 2-core machine are noisy,
# so compare the ratios).
#
#   bash scripts/bench.sh            everything (about 10 min warm, more on a cold target/)
#   BENCH_RUNS=41 bash scripts/bench.sh
#
# 1. server prepare of the 12 MP phone photo on one core (taskset -c 1): sightline's
#    `prepare` against sharp 0.34 (installed into target/bench/sharp), both with sharp's default
#    JPEG encoder and with mozjpeg (trellis) as the baseline;
# 2. peak heap of one 12 MP prepare (counting allocator, functions/core/benches/prepare_memory.rs),
#    and the resize Lambda bootstrap's peak RSS handling the photo end to end against the
#    emulator (tests/src/bin/resize-rss.rs; needs Docker, started by scripts/docker-up.sh);
# 3. the browser: prepareImage against the platform path in the same Chromium page, and the
#    widget's first load gzipped (tests/browser/bench.mjs);
# 4. cold start and zipped size of each Lambda bootstrap (scripts/cold-start.sh);
# 5. limiter throughput: 1,000 images through `sightline run` against the simulator at 600 RPM
#    and 200,000 TPM enforced per second (OpenAI's quantized model), one process, then 4
#    processes sharing one limit through the data dir's store (scripts/bench/limiter.sh; about
#    5 min; LIMITER_TIME_SCALE=10 runs it ten times faster at 10× the limits).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_INCREMENTAL=0
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$TARGET/bench"
RUNS=${BENCH_RUNS:-21}
PHOTO=tests/fixtures/large/phone12mp.jpg
mkdir -p "$OUT"

bash scripts/native-build-deps.sh

echo "== 1. server prepare vs sharp (one core)"
if [ ! -d "$OUT/sharp/node_modules/sharp" ]; then
  npm install --prefix "$OUT/sharp" --no-audit --no-fund --silent sharp@0.34
fi
cargo build --release --locked -q -p sightline-core --example prepare_time
taskset -c 1 "$TARGET/release/examples/prepare_time" "$PHOTO" "$RUNS" "$OUT/sightline.jpg" > "$OUT/prepare.json"
taskset -c 1 node scripts/bench/sharp-prepare.mjs "$OUT/sharp/node_modules/sharp" "$PHOTO" "$RUNS" "$OUT/sharp.jpg" > "$OUT/sharp.json"
SHARP_MOZJPEG=1 taskset -c 1 node scripts/bench/sharp-prepare.mjs "$OUT/sharp/node_modules/sharp" "$PHOTO" "$RUNS" "$OUT/sharp-mozjpeg.jpg" > "$OUT/sharp-mozjpeg.json"

echo "== 2. peak heap of one prepare"
cargo bench --locked -q -p sightline-core --bench prepare_memory > "$OUT/memory.txt" 2>&1 || true

echo "== 2b. the resize Lambda process end to end (emulator in a container)"
bash scripts/docker-up.sh > "$OUT/docker.log" 2>&1
bash scripts/build-emulator-image.sh >> "$OUT/docker.log" 2>&1
[ -x "$TARGET/lambda/sightline-resize/bootstrap" ] || bash scripts/cold-start.sh > /dev/null 2>&1
cargo build --locked -q -p sightline-tests --bin resize-rss
"$TARGET/debug/resize-rss" --runs 5 "$TARGET/lambda/sightline-resize/bootstrap" "$PHOTO" > "$OUT/resize-rss.json"

echo "== 3. browser"
bash scripts/browser-setup.sh > "$OUT/browser-setup.log" 2>&1
[ -f wasm-client/pkg/sightline_wasm_bg.wasm ] && [ -f wasm-client/pkg/sightline_light_bg.wasm ] || bash scripts/wasm-build.sh
node tests/browser/bench.mjs --runs "$RUNS" --json "$OUT/browser.json" > "$OUT/browser.txt"

echo "== 4. cold start and size"
COLD_START_RUNS=${COLD_START_RUNS:-20} bash scripts/cold-start.sh > "$OUT/cold-start.txt" 2>&1

echo "== 5. limiter throughput"
bash scripts/bench/limiter.sh "$OUT" "$OUT/sharp/node_modules/sharp" > "$OUT/limiter.jsonl"

echo
python3 scripts/bench/table.py "$OUT"
