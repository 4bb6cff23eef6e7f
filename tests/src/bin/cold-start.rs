//! `cold-start`: init time of each Lambda bootstrap, from process start to its first Runtime
//! API `next` request, against a Runtime API stub on 127.0.0.1 (std only: one thread accepts,
//! records when each request line arrives, and never answers, so the bootstrap waits in `next`).
//!
//! ```text
//! cold-start --runs 20 resize=target/lambda/sightline-resize/bootstrap,resize.zip ...
//! ```
//!
//! Each bootstrap gets the environment its `main` needs to initialise (dummy bucket, table,
//! queue, static credentials, `SIGHTLINE_PROVIDER=local` so no SSM read) and nothing from the
//! host's; `AWS_ENDPOINT_URL` points at the stub too, so any AWS request made during init would
//! be seen (and reported) instead of leaving the machine. Prints one table row per function:
//! sizes, init median / p90 over the runs (after one warm-up run), peak RSS at `next`.
//! `scripts/cold-start.sh` builds the release bootstraps and runs this.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const NEXT: &str = "/2018-06-01/runtime/invocation/next";
/// The issue's targets: init ≤ 30 ms, zip ≤ 8 MiB.
const TARGET_INIT_MS: f64 = 30.0;
const TARGET_ZIP_BYTES: u64 = 8 * 1024 * 1024;
const MB: f64 = 1024.0 * 1024.0;

struct Function {
    name: String,
    bootstrap: String,
    zip: Option<String>,
}

/// One run: time to the first `next`, requests seen before it, peak RSS (kB) at that moment.
struct Run {
    init: Duration,
    unexpected: Vec<String>,
    hwm_kb: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let mut runs = 20usize;
    let mut functions = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--runs" {
            runs = args
                .next()
                .context("--runs needs a number")?
                .parse()
                .context("--runs needs a number")?;
        } else if let Some((name, paths)) = a.split_once('=') {
            let (bootstrap, zip) = match paths.split_once(',') {
                Some((b, z)) => (b.to_string(), Some(z.to_string())),
                None => (paths.to_string(), None),
            };
            functions.push(Function {
                name: name.to_string(),
                bootstrap,
                zip,
            });
        } else {
            bail!("usage: cold-start [--runs N] NAME=BOOTSTRAP[,ZIP]...");
        }
    }
    if functions.is_empty() || runs == 0 {
        bail!("usage: cold-start [--runs N] NAME=BOOTSTRAP[,ZIP]...");
    }

    println!(
        "{:<10} {:>11} {:>11} {:>11} {:>9} {:>11}  {:<23} met",
        "function", "raw", "zipped", "init median", "init p90", "RSS at next", "target"
    );
    let mut all_met = true;
    for f in &functions {
        let raw = std::fs::metadata(&f.bootstrap)
            .with_context(|| f.bootstrap.clone())?
            .len();
        let zipped = match &f.zip {
            Some(z) => Some(std::fs::metadata(z).with_context(|| z.clone())?.len()),
            None => None,
        };
        // One warm-up run (page cache, dynamic loader caches) is not counted.
        measure(&f.bootstrap)?;
        let mut samples = Vec::with_capacity(runs);
        let mut unexpected = Vec::new();
        let mut hwm = 0u64;
        for _ in 0..runs {
            let r = measure(&f.bootstrap)?;
            samples.push(r.init.as_secs_f64() * 1000.0);
            unexpected.extend(r.unexpected);
            hwm = hwm.max(r.hwm_kb.unwrap_or(0));
        }
        samples.sort_by(f64::total_cmp);
        let median = percentile(&samples, 0.5);
        let p90 = percentile(&samples, 0.9);
        let met = median <= TARGET_INIT_MS && zipped.is_some_and(|z| z <= TARGET_ZIP_BYTES);
        all_met &= met;
        println!(
            "{:<10} {:>7.2} MiB {:>11} {:>8.1} ms {:>6.1} ms {:>7.1} MiB  {:<23} {}",
            f.name,
            raw as f64 / MB,
            zipped.map_or("-".to_string(), |z| format!("{:.2} MiB", z as f64 / MB)),
            median,
            p90,
            hwm as f64 / 1024.0,
            "init ≤ 30 ms, zip ≤ 8 MiB",
            if met { "yes" } else { "no" }
        );
        if !unexpected.is_empty() {
            unexpected.sort();
            unexpected.dedup();
            println!("  requests before `next`: {}", unexpected.join(" | "));
        }
    }
    println!("({runs} runs each after one warm-up; init = spawn → first GET {NEXT})");
    if !all_met {
        println!("some targets were missed");
    }
    Ok(())
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn measure(bootstrap: &str) -> anyhow::Result<Run> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the Runtime API stub")?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let accept_stop = stop.clone();
    let acceptor = std::thread::spawn(move || {
        // Held open (never answered) until the run ends, so the bootstrap blocks in `next`.
        let mut held = Vec::new();
        for stream in listener.incoming() {
            if accept_stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            let mut line = String::new();
            if BufReader::new(reader).read_line(&mut line).is_ok() {
                let _ = tx.send((Instant::now(), line.trim_end().to_string()));
            }
            held.push(stream);
        }
    });

    let log = std::env::temp_dir().join(format!("cold-start-{}.log", std::process::id()));
    let out = std::fs::File::create(&log)?;
    let api = addr.to_string();
    let endpoint = format!("http://{addr}");
    let mut cmd = Command::new(bootstrap);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("AWS_LAMBDA_RUNTIME_API", &api)
        .env("AWS_LAMBDA_FUNCTION_NAME", "cold-start")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/cold-start")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "cold-start")
        .env("AWS_SECRET_ACCESS_KEY", "cold-start")
        // No profile files and no instance metadata: credentials come from the variables.
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL", &endpoint)
        .env("SIGHTLINE_BUCKET", "cold-start-bucket")
        .env("SIGHTLINE_TABLE", "cold-start-table")
        .env(
            "SIGHTLINE_QUEUE_URL",
            format!("{endpoint}/000000000000/jobs"),
        )
        .env("SIGHTLINE_PROVIDER", "local")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {bootstrap}"))?;
    let pid = child.id();

    let mut unexpected = Vec::new();
    let deadline = start + Duration::from_secs(10);
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) if line.starts_with(&format!("GET {NEXT}")) => {
                let hwm_kb = peak_rss_kb(pid);
                break Ok(Run {
                    init: at.duration_since(start),
                    unexpected,
                    hwm_kb,
                });
            }
            Ok((_, line)) => unexpected.push(line),
            Err(_) => {
                let exited = child.try_wait().ok().flatten();
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                break Err(anyhow::anyhow!(
                    "{bootstrap}: no `next` request within 10 s (exit: {exited:?}); its output:\n{tail}"
                ));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    stop.store(true, Ordering::SeqCst);
    // Wake the acceptor so it sees the stop flag and drops the held connections.
    let _ = TcpStream::connect(addr);
    let _ = acceptor.join();
    let _ = std::fs::remove_file(&log);
    result
}

/// VmHWM (peak resident set) of a process, in kB, from /proc (Linux).
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
