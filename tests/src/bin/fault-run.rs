//! `fault-run`: push N distinct images through `sightline serve` while the provider simulator
//! injects faults (5xx, 429 + Retry-After, hangs, truncated answers, poison images, an RPM
//! limit), the queue gets duplicate deliveries and serve is SIGKILLed and restarted; then check
//! the invariants, print a report table and write a JSON report. Exit status 1 when an
//! invariant fails, 2 when the harness itself could not run.
//!
//! ```text
//! cargo build --release -p sightline -p sightline-tests --bin sightline --bin fault-run
//! target/release/fault-run                         # 10,000 images, 5 kills
//! target/release/fault-run --quick                 # 300 images, 2 kills
//! target/release/fault-run --images 2000 --kills 3 --seed 7 --report /tmp/report.json
//!
//! # the same on the AWS side: the Lambda handlers as lambda-host processes on the emulator
//! cargo build --release -p sightline-tests --bin lambda-host --bin fault-run
//! target/release/fault-run --target aws            # 1,000 images, 5 kills
//! ```
//!
//! See `sightline_tests::fault_run` for what is checked.

use std::process::ExitCode;

use clap::Parser;
use sightline_tests::fault_run::{run, Options, Target};

#[tokio::main]
async fn main() -> ExitCode {
    let opts = Options::parse();
    let result = match opts.target {
        Target::Local => run(opts).await,
        Target::Aws => sightline_tests::fault_run_aws::run(opts).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fault-run: {e:#}");
            ExitCode::from(2)
        }
    }
}
