//! Time `prepare` on one file, back to back, and print one JSON line: the median, minimum and
//! maximum in ms, and the output's size (the server half of `scripts/bench.sh`'s comparison
//! with sharp; run it under `taskset -c 1` for one core).
//!
//!   cargo run --release -p sightline-core --example prepare_time -- FILE [RUNS] [OUT.jpg]

use std::time::Instant;

use sightline_core::{prepare, PrepareOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let file = args
        .next()
        .ok_or("usage: prepare_time FILE [RUNS] [OUT.jpg]")?;
    let runs: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(21);
    let out = args.next();
    let bytes = std::fs::read(&file)?;
    // The output the issue compares: an upright image within 768×1024 (1024 long edge), q85.
    let opts = PrepareOptions::default();
    let first = prepare(&bytes, &opts)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let p = prepare(&bytes, &opts)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        std::hint::black_box(p);
    }
    times.sort_by(f64::total_cmp);
    if let Some(path) = out {
        std::fs::write(path, &first.jpeg)?;
    }
    println!(
        "{{\"median_ms\":{:.2},\"min_ms\":{:.2},\"max_ms\":{:.2},\"runs\":{runs},\"width\":{},\"height\":{},\"bytes\":{}}}",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        first.width,
        first.height,
        first.bytes
    );
    Ok(())
}
