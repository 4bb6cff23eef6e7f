#!/usr/bin/env bash
# Limiter throughput (scripts/bench.sh, step 5): 1,000 images through `sightline run` against the
# provider simulator limited to 600 RPM and 200,000 TPM (not time-scaled: the simulator's
# windows are a sliding minute, so 1,000 requests need at least one full minute: the first 600
# go at once, the rest when the first leave the window), first one process, then 4 processes on
# one data dir splitting the images, each told it is one of 4 (SIGHTLINE_MAX_CONCURRENCY=4: a
# quarter of the limit each, the way concurrent Lambda instances split it; not a limit shared
# through the store). Prints one JSON line per case: wall seconds, the ideal the windows allow,
# calls, 429s.
#
#   bash scripts/bench/limiter.sh OUT_DIR SHARP_DIR
set -euo pipefail
OUT="$1"
SHARP="$2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
N=${LIMITER_IMAGES:-1000}
RPM=600
TPM=200000
cargo build --release --locked -q -p sightline -p sightline-tests --bin sightline --bin provider-sim
IMAGES="$OUT/limiter-images"
[ -d "$IMAGES" ] && [ "$(ls "$IMAGES" | wc -l)" -eq "$N" ] || node "$ROOT/scripts/bench/make-images.mjs" "$SHARP" "$IMAGES" "$N"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$TARGET/release/provider-sim" --port "$PORT" --api-key sk-bench --rpm $RPM --tpm $TPM --latency-ms 150 --jitter-ms 50 > "$OUT/limiter-sim.log" 2>&1 &
SIM=$!
trap 'kill $SIM 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/sim/stats" > /dev/null && break; sleep 0.1; done

run_case() { # name processes
  local name=$1 procs=$2 data="$OUT/limiter-data-$1"
  rm -rf "$data"
  curl -sf -X POST "http://127.0.0.1:$PORT/sim/reset" > /dev/null
  local env=(OPENAI_API_KEY=sk-bench OPENAI_BASE_URL="http://127.0.0.1:$PORT/v1"
    SIGHTLINE_RPM=$RPM SIGHTLINE_TPM=$TPM SIGHTLINE_MAX_CONCURRENCY=$procs SIGHTLINE_WORKERS=$((32 / procs + 4)))
  local start end pids=()
  start=$(date +%s.%N)
  if [ "$procs" -eq 1 ]; then
    env "${env[@]}" "$TARGET/release/sightline" --provider openai --model gpt-4.1-mini --data-dir "$data" run "$IMAGES" > "$OUT/limiter-$name.txt" 2>&1
  else
    local parts="$OUT/limiter-parts-$name"
    rm -rf "$parts"; mkdir -p "$parts"
    local i=0
    for f in "$IMAGES"/*.png; do
      mkdir -p "$parts/$((i % procs))"; cp "$f" "$parts/$((i % procs))/"; i=$((i + 1))
    done
    for p in $(seq 0 $((procs - 1))); do
      env "${env[@]}" "$TARGET/release/sightline" --provider openai --model gpt-4.1-mini --data-dir "$data" run "$parts/$p" > "$OUT/limiter-$name-$p.txt" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
  fi
  end=$(date +%s.%N)
  curl -sf "http://127.0.0.1:$PORT/sim/stats" | python3 -c "
import json, sys
s = json.load(sys.stdin)
wall = $end - $start
# A sliding minute admits RPM requests (TPM tokens) at once: more wait a whole minute each time.
ideal = 60 * max(($N - 1) // $RPM, max(s.get('tokens_billed', 0) - 1, 0) // $TPM)
# At a steady rate (what a provider enforcing over short periods allows): N / RPM minutes.
steady = max($N / $RPM, s.get('tokens_billed', 0) / $TPM) * 60
print(json.dumps({'case': '$name', 'processes': $procs, 'images': $N, 'wall_s': round(wall, 2), 'ideal_s': round(ideal, 2),
  'steady_s': round(steady, 2), 'steady_ratio': round(wall / steady, 3),
  'ratio': round(wall / ideal, 3), 'requests': s['requests'], 'completions': s['completions'], 'rate_limited': s['rate_limited']}))"
}
case="${LIMITER_CASES:-one four}"
for c in $case; do
  case $c in
    one) run_case one 1 ;;
    four) run_case four 4 ;;
  esac
done
