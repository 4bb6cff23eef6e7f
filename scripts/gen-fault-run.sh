#!/usr/bin/env bash
# Generation fault run: job A (1,000 rows by default) through `sightline serve` while the
# in-process provider simulator injects faults on the Images API and on the check's chat
# completions (10% 5xx, 3% 429 with Retry-After, 1% hangs, 2% cut answers); every 97th row is
# refused by its safety system and every 53rd fails its check. Once a quarter of A is final the
# same rows are posted again as job B (racing A for the same idempotency keys, its webhook
# receiver answering 410), serve is SIGKILLed at random moments (default 4 times) and
# restarted on the same data dir, and when both jobs ended the same rows are posted a third
# time. Then it checks the invariants (every row final as planned, one paid image per key,
# ledger = Σ jobs, paid − lost to kills = booked, the rerun pays nothing, webhooks signed,
# delivered through three failures and stopped by 410), prints a table and writes
# target/gen-fault-run/report.json. Exit status 1 when an invariant fails.
#
# Not part of scripts/test.sh. serve gives back a killed process's claims and messages when it
# restarts, so a run takes a minute or two; the first build adds ~6 minutes. Quick runs:
#
#   bash scripts/gen-fault-run.sh --quick            # 200 rows, 2 kills
#   bash scripts/gen-fault-run.sh --rows 2000 --kills 6 --seed 7
#   bash scripts/gen-fault-run.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/native-build-deps.sh
cargo build --release --locked -p sightline -p sightline-tests --bin sightline --bin gen-fault-run
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
mkdir -p "$ROOT/target/gen-fault-run"
exec "$TARGET/release/gen-fault-run" \
  --sightline "$TARGET/release/sightline" \
  --work-dir "$ROOT/target/gen-fault-run" \
  --report "$ROOT/target/gen-fault-run/report.json" \
  "$@"
