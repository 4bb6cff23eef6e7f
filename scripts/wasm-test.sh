#!/usr/bin/env bash
# Run wasm-client's wasm-bindgen tests (wasm-client/tests/web.rs) in headless Chromium.
#
# Needs Chromium + chromedriver (scripts/browser-setup.sh installs them) and
# wasm-bindgen-cli of the pinned version (scripts/wasm-build.sh installs it; this script does
# too when missing). Builds with the same size-tuned release settings as wasm-build.sh, so the
# dependencies are shared with the package build in target/wasm.
# Extra arguments go to cargo test (e.g. a test name filter).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

WB_VERSION="$(sed -n 's/^wasm-bindgen *= *"=\([0-9][0-9.]*\)".*/\1/p' wasm-client/Cargo.toml | head -n1)"
if [[ "$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}' || true)" != "$WB_VERSION" ]]; then
  echo "[wasm-test] installing wasm-bindgen-cli $WB_VERSION" >&2
  cargo install wasm-bindgen-cli --version "$WB_VERSION" --locked --force \
    || cargo install wasm-bindgen-cli --version "$WB_VERSION" --force
fi
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
if [[ ! -x "${CHROMEDRIVER:-/usr/bin/chromedriver}" ]]; then
  echo "[wasm-test] chromedriver not found: run scripts/browser-setup.sh" >&2
  exit 1
fi

RUSTFLAGS_WASM="${RUSTFLAGS:-}"
[[ "${SIGHTLINE_WASM_SIMD:-1}" == "1" ]] && RUSTFLAGS_WASM="$RUSTFLAGS_WASM -C target-feature=+simd128"

cd wasm-client # webdriver.json (Chromium flags: headless, no sandbox as root) is read from here
CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}" \
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-300}" \
CARGO_PROFILE_RELEASE_OPT_LEVEL="${SIGHTLINE_WASM_OPT_LEVEL:-3}" \
CARGO_PROFILE_RELEASE_LTO=true \
CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
CARGO_PROFILE_RELEASE_PANIC=abort \
CARGO_PROFILE_RELEASE_DEBUG=false \
CARGO_PROFILE_RELEASE_STRIP=debuginfo \
CARGO_PROFILE_RELEASE_INCREMENTAL=false \
RUSTFLAGS="$RUSTFLAGS_WASM" \
  cargo test -p sightline-wasm --release --target wasm32-unknown-unknown \
    --target-dir "$ROOT/target/wasm" --test web "$@"
