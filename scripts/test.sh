#!/usr/bin/env bash
# Run every sightline test on a fresh machine of this kind. Installs and starts what the
# tests need: CMake and NASM (libjpeg-turbo's build), the Docker engine and the offline
# emulator image, Chromium + ChromeDriver, the wasm32 target, wasm-bindgen-cli (pinned),
# wasm-opt, Node packages, cfn-lint, cargo-lambda, Zig and the aarch64 target (the arm64
# resize Lambda). Nothing is skipped: a missing prerequisite fails the run.
#
#   bash scripts/test.sh            everything
#   SIGHTLINE_TEST_QUICK=1 ...      Rust unit + local end-to-end tests only (no Docker, no browser)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
# Incremental caches double the size of target/ and a test run builds everything once.
export CARGO_INCREMENTAL=0
LOGDIR="$ROOT/target/test-logs"
mkdir -p "$LOGDIR"
: > "$LOGDIR/results.txt"

# Each step's heading carries the seconds since the start, so a slow step shows in the log.
step() { printf '\n=== [%d s] %s ===\n' "$SECONDS" "$*"; }
# Record a stage's pass/fail counts from cargo's "test result:" lines.
count_cargo() {
  grep -E '^test result:' "$1" | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/' >> "$LOGDIR/results.txt" || true
}

step "C build tools (CMake, NASM: libjpeg-turbo in sightline-core's native JPEG path)"
bash scripts/native-build-deps.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "core builds for wasm32"
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
cargo build -p sightline-core --target wasm32-unknown-unknown --locked

if [[ "${SIGHTLINE_TEST_QUICK:-0}" == "1" ]]; then
  step "Rust tests (quick: no containers)"
  cargo test --workspace --locked --exclude sightline-tests 2>&1 | tee "$LOGDIR/cargo-test.log"
  count_cargo "$LOGDIR/cargo-test.log"
else
  step "Docker engine and emulator image"
  bash scripts/docker-up.sh
  bash scripts/build-emulator-image.sh

  step "Rust tests (unit, contract, local and AWS end-to-end)"
  cargo test --workspace --locked 2>&1 | tee "$LOGDIR/cargo-test.log"
  count_cargo "$LOGDIR/cargo-test.log"

  step "WASM client: build, tests in headless Chromium"
  bash scripts/browser-setup.sh
  bash scripts/wasm-build.sh
  bash scripts/wasm-test.sh 2>&1 | tee "$LOGDIR/wasm-test.log"
  count_cargo "$LOGDIR/wasm-test.log"

  step "widget first load: JS + WASM before a JPEG is prepared <= 150 KB gzipped (measured in Chromium)"
  # Fails the run when the first-load bundle just built grows over the target, or when
  # preparing a JPEG starts to need the full decoder module.
  node tests/browser/first-load.mjs 2>&1 | tee "$LOGDIR/first-load.log"
  grep -E '^[0-9]+ passed, [0-9]+ failed' "$LOGDIR/first-load.log" | tail -1 | sed -E 's/([0-9]+) passed, ([0-9]+) failed.*/\1 \2/' >> "$LOGDIR/results.txt" || true

  step "browser end-to-end against sightline serve"
  SIGHTLINE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/sightline" bash scripts/browser-e2e.sh 2>&1 | tee "$LOGDIR/browser-e2e.log"
  grep -E '^[0-9]+ passed, [0-9]+ failed' "$LOGDIR/browser-e2e.log" | tail -1 | sed -E 's/([0-9]+) passed, ([0-9]+) failed.*/\1 \2/' >> "$LOGDIR/results.txt" || true

  step "browser ↔ CLI parity (prepareImage estimates = sightline estimate --json, token for token)"
  SIGHTLINE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/sightline" node tests/browser/parity.mjs 2>&1 | tee "$LOGDIR/browser-parity.log"
  grep -E '^[0-9]+ passed, [0-9]+ failed' "$LOGDIR/browser-parity.log" | tail -1 | sed -E 's/([0-9]+) passed, ([0-9]+) failed.*/\1 \2/' >> "$LOGDIR/results.txt" || true

  step "browser widget against the stub server (failed-upload retry, bomb, keyboard, CSP)"
  node tests/browser/widget.mjs 2>&1 | tee "$LOGDIR/browser-widget.log"
  grep -E '^[0-9]+ passed, [0-9]+ failed' "$LOGDIR/browser-widget.log" | tail -1 | sed -E 's/([0-9]+) passed, ([0-9]+) failed.*/\1 \2/' >> "$LOGDIR/results.txt" || true

  step "infrastructure checks (cfn-lint, OpenAPI, template safety, cargo lambda build)"
  # The infra crate's Rust tests already ran with the workspace above. The six functions build
  # and package natively with cargo lambda; the resize Lambda (which links libjpeg-turbo) also
  # builds for arm64 with Zig, as docs/aws.md deploys it. Debug builds: they check the same
  # packaging and cross-compilation without two more optimised builds of the whole dependency
  # tree (release builds are the benchmarks' business: scripts/cold-start.sh).
  SIGHTLINE_SKIP_CARGO_TEST=1 SIGHTLINE_CHECK_LAMBDA_BUILD=1 SIGHTLINE_LAMBDA_COMPILER=cargo \
    SIGHTLINE_CHECK_ARM64_BUILD=sightline-resize SIGHTLINE_LAMBDA_PROFILE=dev \
    bash scripts/infra-check.sh 2>&1 | tee "$LOGDIR/infra.log"
fi

passed=$(awk '{p+=$1} END {print p+0}' "$LOGDIR/results.txt")
failed=$(awk '{f+=$2} END {print f+0}' "$LOGDIR/results.txt")
echo
echo "${passed} passed, ${failed} failed (${SECONDS} s)"
[[ "$failed" == "0" ]]
