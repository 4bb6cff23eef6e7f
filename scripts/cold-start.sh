#!/usr/bin/env bash
# Cold start and size of the four Lambda bootstraps (a benchmark; not part of scripts/test.sh).
#
#   bash scripts/cold-start.sh              release build (native, --compiler cargo), 20 runs each
#   COLD_START_RUNS=50 bash scripts/cold-start.sh
#
# Builds the bootstraps once with `cargo lambda build --release` (the same build as
# scripts/infra-check.sh, so the same cargo-lambda release settings), zips them the way
# cargo lambda does (--output-format zip, a second pass that compiles nothing), then runs
# tests/src/bin/cold-start.rs: a Runtime API stub on 127.0.0.1, each bootstrap started with
# dummy settings, time from process start to its first `next` request. Prints a table:
# function, raw and zipped size, init median and p90, peak RSS at `next`, target met or not.
# Timings on a shared machine are noisy: compare medians measured in the same run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_INCREMENTAL=0
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV=${SIGHTLINE_INFRA_VENV:-$TARGET/infra-venv}
RUNS=${COLD_START_RUNS:-20}
FUNCTIONS=(resize analyze api reconcile batch)

bash scripts/native-build-deps.sh
if [ ! -x "$VENV/bin/cargo-lambda" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'cargo-lambda>=1.8'
fi
pkgs=()
for f in "${FUNCTIONS[@]}"; do pkgs+=(-p "sightline-$f"); done

start=$(date +%s)
PATH="$VENV/bin:$PATH" cargo lambda build --release --compiler cargo "${pkgs[@]}"
echo "release build: $(( $(date +%s) - start )) s"
PATH="$VENV/bin:$PATH" cargo lambda build --release --compiler cargo "${pkgs[@]}" \
  --output-format zip --lambda-dir "$TARGET/lambda-zip"

cargo build -q -p sightline-tests --bin cold-start
args=()
for f in "${FUNCTIONS[@]}"; do
  args+=("$f=$TARGET/lambda/sightline-$f/bootstrap,$TARGET/lambda-zip/sightline-$f/bootstrap.zip")
done
"$TARGET/debug/cold-start" --runs "$RUNS" "${args[@]}"
