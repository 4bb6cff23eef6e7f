#!/usr/bin/env bash
# AWS fault run: pushes N distinct images (default 1,000) through the AWS side of sightline on
# the offline emulator (S3, SQS, DynamoDB of the moto-based LocalStack-compatible image, in a
# container with host networking on 127.0.0.1). The Lambda handlers of this repository run in
# `lambda-host` processes that play Lambda and its event source (1 resize on the S3 → SQS
# notification queue, 2 analyze hosts with 2 concurrent batches each and ReportBatchItemFailures
# semantics, 1 reconcile on a 5 s schedule); uploads are S3 drops and, for 30% of the images,
# POST /v1/uploads on the api router in-process + presigned PUT. The provider simulator injects
# the local fault run's faults (20% 5xx, 3% 429 with Retry-After, 2% hangs with a 2 s provider
# timeout, 3% truncated answers, 1% poison images), 5% of the images get their job delivered
# twice, and the resize/analyze hosts are SIGKILLed mid-batch at random moments (default 5
# times) and restarted after 0.2–2 s. Then it checks the invariants (nothing stuck, only poison
# images failed, one result per image, ledger = Σ results + extra spend, paid calls − ledger
# calls = calls lost to kills within the in-flight bound, DLQ contents), prints a table and
# writes target/fault-run-aws/report.json. Exit status 1 when an invariant fails, 2 when the
# harness could not run.
#
# Not part of scripts/test.sh. Needs Docker (scripts/docker-up.sh) and the emulator image
# (scripts/build-emulator-image.sh); both are called here and return at once when ready.
# Time on a 2-core machine: the first release build ~9 minutes (~4 when only the sightline
# crates changed); a run of 1,000 images with 5 kills ~5–6 minutes (measured: last image final
# after 240–330 s, plus setup and a 30 s drain). The emulator sets the pace: moto runs on one
# core and deep-copies the whole table for every TransactWriteItems, so ~4 images/s get through,
# and an image whose batch was killed comes back only after the analyze queue's visibility
# timeout (= the 180 s function timeout) or is re-sent by the reconciler after the 60 s
# stuck-after and then waits for the 120 s claim lease. Quick runs:
#
#   bash scripts/fault-run-aws.sh --images 100 --kills 2      # ~1–3 minutes
#   bash scripts/fault-run-aws.sh --quick                     # 100 images, 2 kills
#   bash scripts/fault-run-aws.sh --images 1000 --kills 5 --seed 7
#   bash scripts/fault-run-aws.sh --help                      # every option (AWS ones at the end)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/native-build-deps.sh
cargo build --release --locked -p sightline-tests --bin lambda-host --bin fault-run
bash "$ROOT/scripts/docker-up.sh"
bash "$ROOT/scripts/build-emulator-image.sh" >/dev/null
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
mkdir -p "$ROOT/target/fault-run-aws"
exec "$TARGET/release/fault-run" \
  --target aws \
  --lambda-host "$TARGET/release/lambda-host" \
  --work-dir "$ROOT/target/fault-run-aws" \
  --report "$ROOT/target/fault-run-aws/report.json" \
  "$@"
