#!/usr/bin/env bash
# Browser end-to-end: start `sightline serve` on a free loopback port with a fresh data dir,
# then drive the widget in headless Chromium (tests/browser/e2e.mjs, playwright-core).
# Needs: scripts/browser-setup.sh (Chromium, Node packages) and scripts/wasm-build.sh (pkg/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

[[ -f wasm-client/pkg/sightline_wasm_bg.wasm && -f wasm-client/pkg/sightline_light_bg.wasm ]] || { echo "wasm-client/pkg is missing: run scripts/wasm-build.sh" >&2; exit 1; }
# scripts/test.sh passes the binary its `cargo test` just built (building `-p sightline` alone
# would resolve features differently and rebuild half the dependency tree).
BIN="${SIGHTLINE_BIN:-}"
if [[ -z "$BIN" ]]; then
  bash scripts/native-build-deps.sh
  cargo build -p sightline --locked
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/sightline"
fi
DATA="$(mktemp -d)"
LOG="$ROOT/target/browser/serve.log"
mkdir -p "$ROOT/target/browser"
"$BIN" --data-dir "$DATA" serve --addr 127.0.0.1:0 --web-dir wasm-client 2> "$LOG" &
SERVER=$!
cleanup() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

URL=""
for _ in $(seq 1 100); do
  URL="$(sed -n 's/^sightline serve: \(http:[^ ]*\)\/ .*/\1/p' "$LOG" | head -n1)"
  [[ -n "$URL" ]] && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$LOG" >&2; echo "sightline serve exited" >&2; exit 1; }
  sleep 0.2
done
[[ -n "$URL" ]] || { cat "$LOG" >&2; echo "sightline serve did not start" >&2; exit 1; }
echo "sightline serve at $URL"

cd tests/browser
[[ -d node_modules/playwright-core ]] || npm ci --no-audit --no-fund
SIGHTLINE_URL="$URL" SIGHTLINE_API_KEY="sightline-local-key" node e2e.mjs
