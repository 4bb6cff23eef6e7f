#!/usr/bin/env bash
# Checks of infra/:
#   1. cfn-lint on the SAM template (must be clean),
#   2. openapi-spec-validator on the OpenAPI spec,
#   3. the Rust tests of infra/ (template safety settings, spec routes and schemas),
#   4. optional (SIGHTLINE_CHECK_LAMBDA_BUILD=1): `cargo lambda build --release` of the six
#      function binaries, for arm64 with Zig (default) or natively with SIGHTLINE_LAMBDA_COMPILER=cargo,
#   5. optional (SIGHTLINE_CHECK_ARM64_BUILD="sightline-resize ..."): `cargo lambda build --release
#      --arm64` (Zig) of those packages into target/lambda-arm64 (beside the native bootstraps,
#      which benchmarks run), checked to be aarch64 ELF files, with the build time printed. It
#      proves the C in the image path (libjpeg-turbo, CMake) cross-compiles as docs/aws.md deploys.
#
# SIGHTLINE_LAMBDA_PROFILE=dev makes steps 4 and 5 debug builds into target/lambda-check and
# target/lambda-check-arm64: the same packaging, features and cross-compilation, in a fraction of
# the time (the test command uses it; the release profile's LTO and size settings are what
# scripts/cold-start.sh builds and measures). The default, release, is what docs/aws.md deploys.
#
# Python tools go into a venv (default target/infra-venv; override with SIGHTLINE_INFRA_VENV),
# installed from PyPI on first use. Skip step 3 with SIGHTLINE_SKIP_CARGO_TEST=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

VENV=${SIGHTLINE_INFRA_VENV:-$ROOT/target/infra-venv}
PYTHON=${PYTHON:-python3}
PIP_FLAGS=(-q --disable-pip-version-check)

log() { printf '\n== %s\n' "$*"; }

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! "$PYTHON" -m venv "$VENV"; then
      # Debian's python3 ships venv without ensurepip until python3-venv is installed.
      log "installing python3-venv"
      rm -rf "$VENV"
      SUDO=""
      [ "$(id -u)" -eq 0 ] || SUDO="sudo"
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      "$PYTHON" -m venv "$VENV"
    fi
  fi
}

# pip_tool EXECUTABLE REQUIREMENT...: install into the venv when the executable is missing.
pip_tool() {
  local exe=$1
  shift
  if [ ! -x "$VENV/bin/$exe" ]; then
    log "installing $* from PyPI into $VENV"
    "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" "$@"
  fi
}

ensure_venv
pip_tool cfn-lint 'cfn-lint>=1.20,<2'
pip_tool openapi-spec-validator 'openapi-spec-validator>=0.7,<1'

log "cfn-lint $("$VENV/bin/cfn-lint" --version 2>&1 | tail -n1): infra/template.yaml"
"$VENV/bin/cfn-lint" -- infra/template.yaml
echo "cfn-lint: clean"

log "openapi-spec-validator: infra/openapi.yaml"
"$VENV/bin/openapi-spec-validator" infra/openapi.yaml

if [ "${SIGHTLINE_SKIP_CARGO_TEST:-0}" != 1 ]; then
  log "cargo test -p sightline-infra-checks"
  cargo test -p sightline-infra-checks
fi

# Zig (the cross compiler and linker cargo-lambda drives, from PyPI) and Rust's aarch64 target.
ensure_zig() {
  if ! "$VENV/bin/python" -c 'import ziglang' 2>/dev/null; then
    log "installing ziglang from PyPI into $VENV"
    "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" ziglang
  fi
  rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu
}

if [ "${SIGHTLINE_CHECK_LAMBDA_BUILD:-0}" = 1 ] || [ -n "${SIGHTLINE_CHECK_ARM64_BUILD:-}" ]; then
  # cargo-lambda's PyPI package ships the binary and depends on ziglang (Zig, the cross linker).
  pip_tool cargo-lambda 'cargo-lambda>=1.8'
  # CMake and NASM for libjpeg-turbo (sightline-core's native JPEG path).
  bash "$ROOT/scripts/native-build-deps.sh"
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "${SIGHTLINE_LAMBDA_PROFILE:-release}" in
  release)
    profile_args=(--release)
    lambda_dir="$TARGET/lambda"
    arm64_dir="$TARGET/lambda-arm64"
    ;;
  dev)
    # Not into target/lambda: the benchmarks run the release bootstraps found there.
    profile_args=()
    lambda_dir="$TARGET/lambda-check"
    arm64_dir="$TARGET/lambda-check-arm64"
    ;;
  *)
    echo "SIGHTLINE_LAMBDA_PROFILE must be release or dev, not ${SIGHTLINE_LAMBDA_PROFILE}" >&2
    exit 2
    ;;
esac

if [ "${SIGHTLINE_CHECK_LAMBDA_BUILD:-0}" = 1 ]; then
  compiler=${SIGHTLINE_LAMBDA_COMPILER:-zig}
  args=(lambda build "${profile_args[@]}" --locked --lambda-dir "$lambda_dir"
    -p sightline-resize -p sightline-analyze -p sightline-api
    -p sightline-reconcile -p sightline-batch -p sightline-generate)
  case "$compiler" in
    zig)
      ensure_zig
      args+=(--arm64)
      ;;
    cargo)
      # Native build with the host toolchain (x86_64 here): checks the code builds as a
      # Lambda binary without Zig; the deployed functions are arm64 (use zig for those).
      args+=(--compiler cargo)
      ;;
    *)
      echo "SIGHTLINE_LAMBDA_COMPILER must be zig or cargo, not $compiler" >&2
      exit 2
      ;;
  esac
  log "cargo ${args[*]}"
  # The venv's bin first: cargo-lambda finds `cargo-lambda` and Zig (python -m ziglang) there.
  start=$(date +%s)
  PATH="$VENV/bin:$PATH" cargo "${args[@]}"
  log "lambda build: $(($(date +%s) - start)) s"
  ls -l "$lambda_dir"/sightline-{resize,analyze,api,reconcile,batch,generate}/bootstrap
fi

if [ -n "${SIGHTLINE_CHECK_ARM64_BUILD:-}" ]; then
  ensure_zig
  args=(lambda build "${profile_args[@]}" --arm64 --locked --lambda-dir "$arm64_dir")
  for pkg in $SIGHTLINE_CHECK_ARM64_BUILD; do args+=(-p "$pkg"); done
  log "cargo ${args[*]}"
  start=$(date +%s)
  PATH="$VENV/bin:$PATH" cargo "${args[@]}"
  log "arm64 build: $(($(date +%s) - start)) s"
  for pkg in $SIGHTLINE_CHECK_ARM64_BUILD; do
    bin="$arm64_dir/$pkg/bootstrap"
    # ELF e_machine (offset 18, little-endian) 0xB7 is AArch64.
    machine=$(od -An -tx1 -j18 -N2 "$bin" | tr -d ' ')
    if [ "$machine" != "b700" ]; then
      echo "$bin is not an aarch64 ELF (e_machine bytes $machine)" >&2
      exit 1
    fi
    ls -l "$bin"
    echo "$pkg: aarch64 bootstrap"
  done
fi

log "infra checks passed"
