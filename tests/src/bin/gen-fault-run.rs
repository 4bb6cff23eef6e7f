//! `gen-fault-run`: generation jobs through `sightline serve` while the provider simulator
//! injects faults on the Images API and the check's chat completions and serve is SIGKILLed and
//! restarted: the same rows posted twice at once and once more afterwards. Checks the
//! invariants (every row final as planned, one paid image per key, ledger = Σ jobs, paid −
//! lost = booked, a rerun pays nothing, webhooks signed, retried and stopped by 410), prints a
//! table and writes a JSON report. Exit status 1 when an invariant fails, 2 when the harness
//! itself could not run.
//!
//! ```text
//! cargo build --release -p sightline -p sightline-tests --bin sightline --bin gen-fault-run
//! target/release/gen-fault-run                 # 1,000 rows, 4 kills
//! target/release/gen-fault-run --quick         # 200 rows, 2 kills
//! ```
//!
//! See `sightline_tests::gen_fault_run` for what is checked.

use std::process::ExitCode;

use clap::Parser;
use sightline_tests::gen_fault_run::{run, Options};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Options::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("gen-fault-run: {e:#}");
            ExitCode::from(2)
        }
    }
}
