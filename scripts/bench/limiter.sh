#!/usr/bin/env bash
# Limiter throughput (scripts/bench.sh, step 5): 1,000 images through `sightline run` against the
# provider simulator limited to 600 RPM and 200,000 TPM in its quantized model, the one OpenAI
# documents ("60,000 requests/minute may be enforced as 1,000 requests/second"): each limit a
# bucket refilled at its per-minute rate, enforced per second (at most 10 requests and 3,333
# tokens at once). Latency 150 ms + up to 50 ms. Each request counts prompt + max_tokens against
# TPM (99 + 400 with the default settings), so TPM is the binding limit: 499,000 tokens at 3,333
# a second.
#
# Cases (LIMITER_CASES, default "one shared"):
#   one     one process;
#   shared  4 processes on one data dir, each running a quarter of the images, drawing from one
#           limit kept in the data dir's SQLite (SIGHTLINE_SHARED_LIMIT=true): the way
#           concurrent analyze Lambdas share one through DynamoDB;
#   split   the same 4 processes each told it is one of 4 (SIGHTLINE_MAX_CONCURRENCY=4: a
#           quarter of the limit each, no store; the way without a shared limit).
# LIMITER_TIME_SCALE=S multiplies both limits by S (the simulator's and sightline's), so the
# run takes 1/S of the time; 1 (real time) unless set. LIMITER_IMAGES=N for another count;
# LIMITER_RUNS=R runs the cases R times, interleaved (the table shows the median).
#
# The ideal is when the provider could have admitted the last request, plus one call's mean
# latency: max over requests and tokens of (admitted − one quantum's burst) ÷ rate, from the
# simulator's counts (requests admitted, tokens_admitted). Prints one JSON line per case.
#
#   bash scripts/bench/limiter.sh OUT_DIR SHARP_DIR
set -euo pipefail
OUT="$1"
SHARP="$2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
N=${LIMITER_IMAGES:-1000}
SCALE=${LIMITER_TIME_SCALE:-1}
RPM=$((600 * SCALE))
TPM=$((200000 * SCALE))
QUANTUM_MS=1000
LATENCY_MS=150
JITTER_MS=50
cargo build --release --locked -q -p sightline -p sightline-tests --bin sightline --bin provider-sim
IMAGES="$OUT/limiter-images-$N"
[ -d "$IMAGES" ] && [ "$(ls "$IMAGES" | wc -l)" -eq "$N" ] || node "$ROOT/scripts/bench/make-images.mjs" "$SHARP" "$IMAGES" "$N"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$TARGET/release/provider-sim" --port "$PORT" --api-key sk-bench --rpm $RPM --tpm $TPM \
  --limit-model quantized --quantum-ms $QUANTUM_MS --latency-ms $LATENCY_MS --jitter-ms $JITTER_MS \
  > "$OUT/limiter-sim.log" 2>&1 &
SIM=$!
trap 'kill $SIM 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/sim/stats" > /dev/null && break; sleep 0.1; done

run_case() { # name processes extra-env...
  local name=$1 procs=$2 data="$OUT/limiter-data-$1"
  shift 2
  rm -rf "$data"
  curl -sf -X POST "http://127.0.0.1:$PORT/sim/reset" > /dev/null
  local env=(OPENAI_API_KEY=sk-bench OPENAI_BASE_URL="http://127.0.0.1:$PORT/v1"
    SIGHTLINE_RPM=$RPM SIGHTLINE_TPM=$TPM SIGHTLINE_WORKERS=$((32 / procs + 4)) "$@")
  local start end pids=()
  start=$(date +%s.%N)
  if [ "$procs" -eq 1 ]; then
    env "${env[@]}" "$TARGET/release/sightline" --provider openai --model gpt-4.1-mini --data-dir "$data" run "$IMAGES" > "$OUT/limiter-$name.txt" 2>&1
  else
    local parts="$OUT/limiter-parts-$N-$procs"
    if [ ! -d "$parts" ]; then
      mkdir -p "$parts.tmp"
      local i=0
      for f in "$IMAGES"/*.png; do
        mkdir -p "$parts.tmp/$((i % procs))"; ln "$f" "$parts.tmp/$((i % procs))/"; i=$((i + 1))
      done
      mv "$parts.tmp" "$parts"
    fi
    for p in $(seq 0 $((procs - 1))); do
      ( env "${env[@]}" "$TARGET/release/sightline" --provider openai --model gpt-4.1-mini --data-dir "$data" run "$parts/$p" > "$OUT/limiter-$name-$p.txt" 2>&1
        date +%s.%N > "$OUT/limiter-$name-$p.end" ) &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
  fi
  end=$(date +%s.%N)
  local ends
  ends=$(cat "$OUT"/limiter-"$name"-*.end 2>/dev/null | tr '\n' ',' || true)
  rm -f "$OUT"/limiter-"$name"-*.end
  curl -sf "http://127.0.0.1:$PORT/sim/stats" | python3 -c "
import json, sys
s = json.load(sys.stdin)
wall = $end - $start
rps, tps, q = $RPM / 60, $TPM / 60, $QUANTUM_MS / 1000
admitted, tokens = s['completions'], s.get('tokens_admitted', 0)
# The provider admits one quantum's share at once, then the rest at the rate.
last = max((admitted - max(rps * q, 1)) / rps, (tokens - tps * q) / tps, 0)
ideal = last + ($LATENCY_MS + $JITTER_MS / 2) / 1000
steady = max(admitted / rps, tokens / tps)
# Where the time went: start to the first admission, first to last, last admission to the end.
first, last = s.get('first_admitted_ms', 0) / 1000, s.get('last_admitted_ms', 0) / 1000
phases = [round(first - $start, 2), round(last - first, 2), round($end - last, 2)] if first else None
ends = sorted(round(float(e) - $start, 1) for e in '$ends'.split(',') if e)
print(json.dumps({'case': '$name', 'processes': $procs, 'images': $N, 'time_scale': $SCALE,
  'rpm': $RPM, 'tpm': $TPM, 'wall_s': round(wall, 2), 'ideal_s': round(ideal, 2), 'steady_s': round(steady, 2),
  'ratio': round(wall / ideal, 3), 'requests': s['requests'], 'completions': s['completions'],
  'rate_limited': s['rate_limited'], 'tokens_admitted': tokens, 'tokens_billed': s['tokens_billed'],
  'phases_s': phases, 'process_ends_s': ends}))"
}
for run in $(seq "${LIMITER_RUNS:-1}"); do
  for c in ${LIMITER_CASES:-one shared}; do
    case $c in
      one) run_case one 1 ;;
      shared) run_case shared 4 SIGHTLINE_SHARED_LIMIT=true ;;
      split) run_case split 4 SIGHTLINE_MAX_CONCURRENCY=4 ;;
      *) echo "limiter.sh: unknown case $c (one, shared, split)" >&2; exit 2 ;;
    esac
  done
done
