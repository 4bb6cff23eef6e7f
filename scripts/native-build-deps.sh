#!/usr/bin/env bash
# The C build tools of sightline-core's native JPEG path: libjpeg-turbo is vendored by the
# turbojpeg-sys crate and built with CMake, and on x86_64 its SIMD code is assembled with NASM
# (the build is told to require SIMD, so a missing nasm fails it rather than silently building
# a slow decoder). Installs both from Debian's packages when missing; a no-op otherwise.
# Called by scripts/test.sh, scripts/bench.sh, scripts/cold-start.sh and scripts/infra-check.sh.
# The wasm32 build needs neither (it compiles no C).
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v nasm >/dev/null 2>&1 || missing+=(nasm)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "[native-build-deps] installing ${missing[*]} (libjpeg-turbo's build)" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
