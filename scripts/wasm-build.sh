#!/usr/bin/env bash
# Build the browser package of sightline-core: wasm-client/pkg/ (wasm-bindgen --target web).
#
# Installs what is missing (the wasm32 rustup target, wasm-bindgen-cli of the exact version
# pinned in wasm-client/Cargo.toml, binaryen's wasm-opt), builds an LTO'd, abort-on-panic
# release into target/wasm (apart from the native build), runs wasm-opt and prints the .wasm
# size raw and gzipped.
#
# Knobs (environment):
#   SIGHTLINE_WASM_SIMD=1|0          wasm SIMD (simd128; every current browser has it). Default 1.
#   SIGHTLINE_WASM_OPT_LEVEL=3|s|z   rustc opt-level. Default 3: measured in headless Chromium on the
#                                    12 MP sample, s is ~7% smaller gzipped but ~1.8x slower (the
#                                    JPEG decoder dominates); see wasm-client/README.md.
#   SIGHTLINE_WASM_OPT_PASSES=-Oz    wasm-opt level (-Oz, -Os, -O3, or "none"). Default -Oz.
#                                    wasm-opt >= 116 is needed (Debian's 108 is too old: npm's is used).
#   SIGHTLINE_WASM_OUT=dir           output folder. Default wasm-client/pkg.
#   SIGHTLINE_WASM_TARGET_DIR=dir    cargo target dir. Default target/wasm (apart from the native build);
#                                    the first-load module builds in the same path + "-light".
#   SIGHTLINE_WASM_MODULES="light full"  which modules to build (sightline_light: the widget's
#                                    first load, no decoders; sightline_wasm: the full module).
#   SIGHTLINE_WASM_LIGHT_OPT_LEVEL=z rustc opt-level of the first-load module. Default z.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SIMD="${SIGHTLINE_WASM_SIMD:-1}"
OPT_LEVEL="${SIGHTLINE_WASM_OPT_LEVEL:-3}"
OPT_PASSES="${SIGHTLINE_WASM_OPT_PASSES:--Oz}"
OUT="${SIGHTLINE_WASM_OUT:-wasm-client/pkg}"
TARGET_DIR="${SIGHTLINE_WASM_TARGET_DIR:-$ROOT/target/wasm}"

log() { printf '[wasm-build] %s\n' "$*" >&2; }

# The wasm-bindgen version pinned in wasm-client/Cargo.toml (wasm-bindgen = "=X.Y.Z").
WB_VERSION="$(sed -n 's/^wasm-bindgen *= *"=\([0-9][0-9.]*\)".*/\1/p' wasm-client/Cargo.toml | head -n1)"
if [[ -z "$WB_VERSION" ]]; then
  log "wasm-client/Cargo.toml must pin wasm-bindgen exactly (wasm-bindgen = \"=X.Y.Z\")"
  exit 1
fi

export PATH="$HOME/.cargo/bin:$PATH"

# 1. The rustup target.
if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    log "installing the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
  fi
fi

# 2. wasm-bindgen-cli of exactly the pinned version (the CLI and the crate must match).
have_wb="$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)"
if [[ "$have_wb" != "$WB_VERSION" ]]; then
  log "installing wasm-bindgen-cli $WB_VERSION (found: ${have_wb:-none})"
  if ! cargo install wasm-bindgen-cli --version "$WB_VERSION" --locked --force; then
    # The crate's lock file can name a dependency version the registry no longer serves
    # (yanked); then resolve afresh within the same semver ranges.
    log "locked install failed; retrying without --locked"
    cargo install wasm-bindgen-cli --version "$WB_VERSION" --force
  fi
fi

# 3. binaryen's wasm-opt, version >= 116: older ones (Debian bookworm ships 108) mis-handle the
#    reference-types tables rustc and wasm-bindgen emit (the module then fails to instantiate).
#    A wasm-opt on PATH is used when new enough, else npm's binaryen in target/wasm/tools.
WASM_OPT_MIN=116
BINARYEN_NPM_VERSION=132.0.0
wasm_opt_version() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9]*\).*/\1/p' | head -n1; }
WASM_OPT=""
if [[ "$OPT_PASSES" != "none" ]]; then
  if command -v wasm-opt >/dev/null 2>&1 && (( $(wasm_opt_version wasm-opt || echo 0) >= WASM_OPT_MIN )); then
    WASM_OPT="$(command -v wasm-opt)"
  else
    NPM_BIN="$ROOT/target/wasm/tools/node_modules/.bin/wasm-opt"
    if [[ ! -x "$NPM_BIN" ]] || (( $(wasm_opt_version "$NPM_BIN" || echo 0) < WASM_OPT_MIN )); then
      if command -v npm >/dev/null 2>&1; then
        log "installing binaryen $BINARYEN_NPM_VERSION from npm into target/wasm/tools"
        mkdir -p "$ROOT/target/wasm/tools"
        npm install --silent --no-audit --no-fund --no-save --prefix "$ROOT/target/wasm/tools" "binaryen@$BINARYEN_NPM_VERSION" >/dev/null
      fi
    fi
    [[ -x "$NPM_BIN" ]] && WASM_OPT="$NPM_BIN"
  fi
  if [[ -z "$WASM_OPT" ]]; then
    log "no wasm-opt >= $WASM_OPT_MIN could be installed (npm's binaryen $BINARYEN_NPM_VERSION); set SIGHTLINE_WASM_OPT_PASSES=none to build without it"
    exit 1
  fi
fi

# 4. Build: release settings for the browser (fat LTO, one codegen unit, abort on panic), passed
#    as env because profiles live at the workspace root. Two modules from one crate:
#    - sightline_light: what the page loads first (no decoders: header routing, the output-size
#      rule, the estimator and price table); size-optimised, it does no pixel work;
#    - sightline_wasm: the full module (decoders, resize, encoder), loaded lazily by the
#      widget for what the browser's own decoder cannot do the server's way.
RUSTFLAGS_WASM="${RUSTFLAGS:-}"
if [[ "$SIMD" == "1" ]]; then
  RUSTFLAGS_WASM="$RUSTFLAGS_WASM -C target-feature=+simd128"
fi
FEATURES=(--enable-bulk-memory --enable-sign-ext --enable-mutable-globals
          --enable-nontrapping-float-to-int --enable-reference-types --enable-multivalue)
[[ "$SIMD" == "1" ]] && FEATURES+=(--enable-simd)
mkdir -p "$OUT"

# build_module NAME OPT_LEVEL TARGET_DIR [cargo args...]
build_module() {
  local name="$1" level="$2" tdir="$3"
  shift 3
  log "cargo build $name (opt-level=$level, lto, codegen-units=1, panic=abort, simd=$SIMD)"
  CARGO_PROFILE_RELEASE_OPT_LEVEL="$level" \
  CARGO_PROFILE_RELEASE_LTO=true \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
  CARGO_PROFILE_RELEASE_PANIC=abort \
  CARGO_PROFILE_RELEASE_DEBUG=false \
  CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  CARGO_PROFILE_RELEASE_INCREMENTAL=false \
  RUSTFLAGS="$RUSTFLAGS_WASM" \
    cargo build -p sightline-wasm --lib --release \
      --target wasm32-unknown-unknown --target-dir "$tdir" "$@"
  local raw="$tdir/wasm32-unknown-unknown/release/sightline_wasm.wasm"
  # JS bindings for ES modules (`import init from '/pkg/NAME.js'`).
  rm -f "$OUT/$name.js" "$OUT/$name.d.ts" "$OUT/${name}_bg.wasm" "$OUT/${name}_bg.wasm.d.ts"
  wasm-bindgen --target web --out-dir "$OUT" --out-name "$name" "$raw"
  local wasm="$OUT/${name}_bg.wasm"
  if [[ -n "$WASM_OPT" ]]; then
    log "$WASM_OPT $OPT_PASSES $name ($("$WASM_OPT" --version 2>/dev/null | head -n1))"
    "$WASM_OPT" "$OPT_PASSES" "${FEATURES[@]}" --strip-debug --strip-producers \
      "$wasm" -o "$wasm.opt"
    mv "$wasm.opt" "$wasm"
  fi
  local raw_bytes gz_bytes js_gz
  raw_bytes="$(wc -c <"$wasm" | tr -d ' ')"
  gz_bytes="$(gzip -9c "$wasm" | wc -c | tr -d ' ')"
  js_gz="$(gzip -9c "$OUT/$name.js" | wc -c | tr -d ' ')"
  printf 'wasm: %s\n' "$wasm"
  printf '%s size: %s bytes raw (%s KiB), %s bytes gzipped (%s KiB); js glue %s bytes gzipped\n' \
    "$name" "$raw_bytes" "$((raw_bytes / 1024))" "$gz_bytes" "$((gz_bytes / 1024))" "$js_gz"
}

# The first-load module: no decoders; opt-level z everywhere (the workspace's per-package
# opt-level 3 for the image crates is overridden: none of their pixel code is in it).
MODULES="${SIGHTLINE_WASM_MODULES:-light full}"
[[ " $MODULES " == *" light "* ]] && build_module sightline_light "${SIGHTLINE_WASM_LIGHT_OPT_LEVEL:-z}" "$TARGET_DIR-light" \
  --no-default-features \
  --config 'profile.release.package."*".opt-level="z"' \
  --config 'profile.release.package.sightline-core.opt-level="z"' \
  --config 'profile.release.package.image.opt-level="z"'
# The full module.
[[ " $MODULES " == *" full "* ]] && build_module sightline_wasm "$OPT_LEVEL" "$TARGET_DIR"
exit 0
