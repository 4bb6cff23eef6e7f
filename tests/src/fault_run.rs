//! The fault run: N distinct images through `sightline serve` while the provider simulator
//! injects faults, the queue gets duplicate deliveries and serve is killed with SIGKILL and
//! restarted on the same data dir and port; then the invariants are checked and reported.
//!
//! Used by `src/bin/fault-run.rs` (and `scripts/fault-run.sh`); not part of the default tests.
//!
//! What one run does:
//!
//! 1. Generates N distinct small PNG/JPEG images in memory ([`make_image`]).
//! 2. Starts the simulator in-process with the fault plan ([`sim_config`]): 5xx, 429 with
//!    Retry-After, hangs, truncated answers, poison images and an RPM limit.
//! 3. Starts `sightline serve` on a fixed loopback port with the simulator as its provider.
//! 4. Uploads every image through `POST /v1/uploads` + `PUT` with `--uploaders` concurrent
//!    clients that retry while serve is down; a URL refused with 403 after a restart is
//!    replaced by a new upload (counted), a 409 on a retried PUT counts as "already uploaded".
//! 5. Meanwhile copies about `--dup-rate` of the queue's messages as new rows (duplicate
//!    deliveries) and kills serve `--kills` times at random moments (some during the upload,
//!    the rest during the analysis), restarting it after 0.2–2 s.
//! 6. Waits until every image is final (or `--timeout-secs`, or no progress for
//!    `--stall-secs`), then collects the images, `GET /v1/costs` and the simulator's stats and
//!    checks the invariants ([`Invariant`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{Cursor, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::sim::{is_poison, FaultPlan, SimConfig, SimServer, SimStats};

/// Model serve is told to use (the simulator knows its image-token rule).
pub const MODEL: &str = "gpt-4.1-mini";
/// Key the simulator accepts and serve sends.
const SIM_KEY: &str = "sk-fault-run";
/// Key of serve's API for the local tenant.
pub(crate) const API_KEY: &str = "fault-run-key";
/// The local runtime's queue name (table `queue`, column `queue`).
const QUEUE: &str = "analyze";

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// Command-line options of `fault-run`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fault-run",
    about = "Push N images through `sightline serve` under provider faults, duplicate deliveries \
             and SIGKILLs; check and report the invariants"
)]
pub struct Options {
    /// Distinct images to upload [default: 10000; 300 with --quick].
    #[arg(long)]
    pub images: Option<usize>,
    /// SIGKILLs of serve at random moments [default: 5; 2 with --quick].
    #[arg(long)]
    pub kills: Option<usize>,
    /// Small development run: --images 300 --kills 2 unless given.
    #[arg(long)]
    pub quick: bool,
    /// Seed of everything random (images order, kill moments, duplicates, simulator faults,
    /// poison images).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Provider requests per minute: the simulator's limit and serve's SIGHTLINE_RPM.
    #[arg(long, default_value_t = 6000)]
    pub rpm: u64,
    /// serve's analysis workers (SIGHTLINE_WORKERS).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Concurrent uploading clients.
    #[arg(long, default_value_t = 16)]
    pub uploaders: usize,
    /// Fraction of queue messages copied as duplicate deliveries.
    #[arg(long, default_value_t = 0.05)]
    pub dup_rate: f64,
    /// Simulator: probability of a 5xx per request.
    #[arg(long, default_value_t = 0.2)]
    pub error_rate: f64,
    /// Simulator: probability of an injected 429 per request.
    #[arg(long, default_value_t = 0.03)]
    pub rate_limit_rate: f64,
    /// Simulator: Retry-After of an injected 429, seconds.
    #[arg(long, default_value_t = 1.5)]
    pub retry_after_s: f64,
    /// Simulator: probability of a hang (then a dropped connection) per request.
    #[arg(long, default_value_t = 0.02)]
    pub timeout_rate: f64,
    /// Simulator: how long a hang lasts, ms (serve gives up after --provider-timeout-secs).
    #[arg(long, default_value_t = 3000)]
    pub timeout_hang_ms: u64,
    /// Simulator: probability of a truncated 200 answer per request.
    #[arg(long, default_value_t = 0.03)]
    pub malformed_rate: f64,
    /// Simulator: fraction of images always rejected with a 400 (permanent).
    #[arg(long, default_value_t = 0.01)]
    pub poison_rate: f64,
    /// Simulator: fixed latency, ms.
    #[arg(long, default_value_t = 20)]
    pub latency_ms: u64,
    /// Simulator: extra random latency 0..=jitter, ms.
    #[arg(long, default_value_t = 20)]
    pub jitter_ms: u64,
    /// serve's provider timeout (SIGHTLINE_TIMEOUT_SECS).
    #[arg(long, default_value_t = 2)]
    pub provider_timeout_secs: u64,
    /// Give up waiting for final images after this long (from the first upload).
    #[arg(long, default_value_t = 1200)]
    pub timeout_secs: u64,
    /// Give up waiting when, after the uploads, nothing progressed for this long (longer than
    /// serve's claim lease, 154 s with a 2 s provider timeout, plus the queue visibility).
    #[arg(long, default_value_t = 300)]
    pub stall_secs: u64,
    /// The `sightline` binary.
    #[arg(
        long,
        env = "SIGHTLINE_BIN",
        default_value = "target/release/sightline"
    )]
    pub sightline: PathBuf,
    /// Working directory: data dir (wiped at start) and serve's log.
    #[arg(long, default_value = "target/fault-run")]
    pub work_dir: PathBuf,
    /// Also write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// What to run against: `local` (`sightline serve`) or `aws` (the Lambda handlers as
    /// `lambda-host` processes on the AWS emulator, see `sightline_tests::fault_run_aws`;
    /// images default to 1,000, 100 with --quick, and the work dir to target/fault-run-aws).
    #[arg(long, value_enum, default_value_t = Target::Local)]
    pub target: Target,
    #[command(flatten)]
    pub aws: crate::fault_run_aws::AwsOptions,
}

/// Where the fault run runs (`--target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Local,
    Aws,
}

impl Options {
    pub fn image_count(&self) -> usize {
        self.images.unwrap_or(if self.quick { 300 } else { 10_000 })
    }

    pub fn kill_count(&self) -> usize {
        self.kills.unwrap_or(if self.quick { 2 } else { 5 })
    }

    fn validate(&self) -> anyhow::Result<()> {
        let n = self.image_count();
        if n == 0 || n > 1 << 25 {
            bail!("--images must be 1..={}", 1 << 25);
        }
        if !(0.0..=1.0).contains(&self.dup_rate) {
            bail!("--dup-rate must be in [0, 1]");
        }
        if self.uploaders == 0 || self.workers == 0 {
            bail!("--uploaders and --workers must be ≥ 1");
        }
        if self.rpm == 0 {
            bail!("--rpm must be ≥ 1: the ideal time is defined by it");
        }
        sim_config(self)
            .validate()
            .map_err(|e| anyhow::anyhow!("fault plan: {e}"))
    }
}

/// The simulator's configuration for a run.
pub fn sim_config(o: &Options) -> SimConfig {
    SimConfig {
        api_key: SIM_KEY.into(),
        rpm: o.rpm,
        tpm: 0,
        limit_model: Default::default(),
        quantum_ms: 1_000,
        latency_ms: o.latency_ms,
        jitter_ms: o.jitter_ms,
        seed: o.seed,
        timeout_hang_ms: o.timeout_hang_ms,
        faults: FaultPlan {
            error_rate: o.error_rate,
            error_statuses: vec![500, 502, 503, 504],
            rate_limit_rate: o.rate_limit_rate,
            retry_after_s: o.retry_after_s,
            timeout_rate: o.timeout_rate,
            malformed_rate: o.malformed_rate,
            bad_content_rate: 0.0,
            every_nth: None,
            poison_rate: o.poison_rate,
        },
        batch: Default::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// One generated test image.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub index: usize,
    pub filename: String,
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// Side of the grid that carries the index's bits.
const GRID: u32 = 5;

/// A distinct small image for `index` (< 2^25): 48–96 px a side, a gradient whose colours
/// depend on the index, and a 5×5 grid of cells, one per bit of the index, dark for 1 and light
/// for 0. Two indices differ in at least one cell of ≥ 9×9 px by more than 60 levels, so their
/// pixels differ and so do their JPEG re-encodings. Every 4th image is a JPEG, the rest PNG.
pub fn make_image(index: usize) -> TestImage {
    let i = index as u32;
    let w = 48 + (i.wrapping_mul(7)) % 49;
    let h = 48 + (i.wrapping_mul(13) / 3) % 49;
    let tint = (i.wrapping_mul(37) % 256) as u8;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let cx = (x * GRID / w).min(GRID - 1);
        let cy = (y * GRID / h).min(GRID - 1);
        let bit = (i >> (cy * GRID + cx)) & 1;
        let base = [
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            tint.wrapping_add((x + y) as u8),
        ];
        image::Rgb(base.map(|v| if bit == 1 { v / 5 } else { 128 + v / 2 }))
    });
    let mut bytes = Vec::new();
    let (content_type, ext) = if index.is_multiple_of(4) {
        // Encoding into a Vec cannot fail for an RGB image.
        let _ = image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut bytes), 90)
            .encode_image(&img);
        ("image/jpeg", "jpg")
    } else {
        let _ = img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png);
        ("image/png", "png")
    };
    TestImage {
        index,
        filename: format!("fault-{index:07}.{ext}"),
        content_type,
        bytes,
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------------
// Shared run state
// ---------------------------------------------------------------------------------------------

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One upload record the harness created for an image.
#[derive(Debug, Clone)]
struct UploadId {
    image_id: String,
    key: String,
    /// The PUT was accepted (2xx, or 409 on a retry).
    confirmed: bool,
}

#[derive(Debug, Default)]
struct ImageState {
    ids: Vec<UploadId>,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    posts: AtomicU64,
    post_retries: AtomicU64,
    puts: AtomicU64,
    put_retries: AtomicU64,
    transport_errors: AtomicU64,
    reuploaded_after_403: AtomicU64,
    already_uploaded_409: AtomicU64,
    conflict_on_first_put: AtomicU64,
    confirmed: AtomicUsize,
    upload_failures: AtomicU64,
    dup_seen: AtomicU64,
    dup_injected: AtomicU64,
    dup_errors: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
struct KillEvent {
    n: usize,
    at_s: f64,
    phase: &'static str,
    uploaded: usize,
    final_images: u64,
    down_ms: u64,
    ready_after_ms: u64,
}

/// What the monitor last saw.
#[derive(Debug, Clone)]
struct Progress {
    done: u64,
    failed: u64,
    sim_requests: u64,
    last_change: Instant,
    /// When an image last became final (done or failed count changed).
    last_final: Instant,
}

struct Run {
    n: usize,
    kills_planned: usize,
    images: Vec<TestImage>,
    state: Vec<Mutex<ImageState>>,
    counters: Counters,
    serve: Serve,
    http: reqwest::Client,
    sim: SimServer,
    started: Instant,
    uploads_done: AtomicBool,
    stop: AtomicBool,
    progress: Mutex<Progress>,
    kills: Mutex<Vec<KillEvent>>,
}

impl Run {
    fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.serve.port)
    }

    fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn final_count(&self) -> u64 {
        let p = lock(&self.progress);
        p.done + p.failed
    }
}

// ---------------------------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------------------------

/// A `sightline serve` process the run starts, kills and restarts on one data dir and port.
pub(crate) struct Serve {
    bin: PathBuf,
    pub(crate) port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Mutex<Option<Child>>,
    starts: AtomicUsize,
    /// Set by [`Serve::shutdown`]: no more starts.
    closed: AtomicBool,
}

impl Serve {
    pub(crate) fn new(
        bin: PathBuf,
        port: u16,
        data_dir: PathBuf,
        log: PathBuf,
        env: Vec<(String, String)>,
    ) -> Serve {
        Serve {
            bin,
            port,
            data_dir,
            log,
            env,
            child: Mutex::new(None),
            starts: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(log, "===== fault-run: serve start #{n} =====")?;
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("SIGHTLINE_") || k.starts_with("OPENAI_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["serve", "--addr"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--api-key")
            .arg(API_KEY)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        cmd.spawn()
            .with_context(|| format!("starting {}", self.bin.display()))
    }

    /// Start serve and wait until `GET /v1/health` answers; retried a few times.
    pub(crate) async fn start(&self, http: &reqwest::Client) -> anyhow::Result<Duration> {
        let began = Instant::now();
        let health = format!("http://127.0.0.1:{}/v1/health", self.port);
        for _attempt in 0..5 {
            {
                // Spawn under the lock, so a shutdown cannot slip between spawn and store.
                let mut slot = lock(&self.child);
                if self.closed.load(Ordering::SeqCst) {
                    bail!("serve is shut down");
                }
                *slot = Some(self.spawn()?);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(r) = http
                    .get(&health)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                {
                    if r.status().is_success() {
                        return Ok(began.elapsed());
                    }
                }
                let exited = {
                    let mut g = lock(&self.child);
                    match g.as_mut().map(|c| c.try_wait()) {
                        Some(Ok(Some(status))) => Some(status),
                        _ => None,
                    }
                };
                if let Some(status) = exited {
                    eprintln!(
                        "fault-run: serve exited during start ({status}); see {}",
                        self.log.display()
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!(
            "sightline serve did not become healthy on port {}; see {}",
            self.port,
            self.log.display()
        )
    }

    /// SIGKILL (std's `Child::kill` on unix) and reap.
    pub(crate) fn kill(&self) -> bool {
        let mut g = lock(&self.child);
        match g.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }

    /// Kill for good: later starts fail.
    pub(crate) fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.kill();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------

pub(crate) fn backoff(attempt: u32, rng: &mut StdRng) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(4)).min(1500);
    Duration::from_millis(base / 2 + rng.gen_range(0..=base / 2))
}

struct Grant {
    image_id: String,
    key: String,
    url: String,
    headers: Vec<(String, String)>,
}

async fn post_upload(run: &Run, img: &TestImage, rng: &mut StdRng) -> anyhow::Result<Grant> {
    let body = json!({
        "filename": img.filename,
        "content_type": img.content_type,
        "content_length": img.bytes.len(),
    });
    let mut attempt = 0u32;
    let mut other_errors = 0u32;
    loop {
        if run.stop.load(Ordering::Relaxed) {
            bail!("stopped");
        }
        run.counters.posts.fetch_add(1, Ordering::Relaxed);
        let sent = run
            .http
            .post(run.api("/v1/uploads"))
            .header("x-api-key", API_KEY)
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().as_u16() == 201 => {
                let v: Value = match r.json().await {
                    Ok(v) => v,
                    Err(_) => {
                        // The answer was cut (serve killed): the record may exist, orphaned.
                        run.counters
                            .transport_errors
                            .fetch_add(1, Ordering::Relaxed);
                        attempt += 1;
                        run.counters.post_retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(backoff(attempt, rng)).await;
                        continue;
                    }
                };
                let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
                let (Some(image_id), Some(key), Some(url)) =
                    (s("/image_id"), s("/key"), s("/upload/url"))
                else {
                    bail!("POST /v1/uploads answered without image_id/key/upload.url: {v}");
                };
                let headers = v
                    .pointer("/upload/headers")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                            .collect()
                    })
                    .unwrap_or_default();
                return Ok(Grant {
                    image_id,
                    key,
                    url,
                    headers,
                });
            }
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {}
            Ok(r) => {
                other_errors += 1;
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                if other_errors > 5 {
                    bail!("POST /v1/uploads: HTTP {status}: {text}");
                }
            }
            Err(_) => {
                run.counters
                    .transport_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        attempt += 1;
        run.counters.post_retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff(attempt, rng)).await;
    }
}

async fn upload_one(run: &Run, idx: usize, rng: &mut StdRng) -> anyhow::Result<()> {
    let img = &run.images[idx];
    let mut reposts = 0u32;
    'post: loop {
        let grant = post_upload(run, img, rng).await?;
        let slot = {
            let mut st = lock(&run.state[idx]);
            st.ids.push(UploadId {
                image_id: grant.image_id.clone(),
                key: grant.key.clone(),
                confirmed: false,
            });
            st.ids.len() - 1
        };
        let mut attempt = 0u32;
        let mut other_errors = 0u32;
        loop {
            if run.stop.load(Ordering::Relaxed) {
                bail!("stopped");
            }
            run.counters.puts.fetch_add(1, Ordering::Relaxed);
            let mut req = run.http.put(&grant.url).body(img.bytes.clone());
            for (k, v) in &grant.headers {
                req = req.header(k, v);
            }
            let status = match req.send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    // Read the answer: a cut body means we do not know whether it landed.
                    match r.bytes().await {
                        Ok(_) => Some(s),
                        Err(_) => None,
                    }
                }
                Err(_) => None,
            };
            let confirmed = match status {
                Some(s) if (200..300).contains(&s) => true,
                Some(409) => {
                    if attempt > 0 {
                        run.counters
                            .already_uploaded_409
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        run.counters
                            .conflict_on_first_put
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    true
                }
                Some(403) => {
                    // The URL no longer verifies (e.g. a new signing secret after a restart):
                    // ask for a new one. The old record stays behind.
                    run.counters
                        .reuploaded_after_403
                        .fetch_add(1, Ordering::Relaxed);
                    reposts += 1;
                    if reposts > 20 {
                        bail!("PUT refused with 403 {reposts} times");
                    }
                    continue 'post;
                }
                Some(s) if s == 429 || s >= 500 => false,
                Some(s) => {
                    other_errors += 1;
                    if other_errors > 5 {
                        bail!("PUT {}: HTTP {s}", grant.url);
                    }
                    false
                }
                None => {
                    run.counters
                        .transport_errors
                        .fetch_add(1, Ordering::Relaxed);
                    false
                }
            };
            if confirmed {
                lock(&run.state[idx]).ids[slot].confirmed = true;
                run.counters.confirmed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            attempt += 1;
            run.counters.put_retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff(attempt, rng)).await;
        }
    }
}

async fn uploader(run: Arc<Run>, order: Arc<Vec<usize>>, next: Arc<AtomicUsize>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        let Some(&idx) = order.get(k) else { return };
        if let Err(e) = upload_one(&run, idx, &mut rng).await {
            run.counters.upload_failures.fetch_add(1, Ordering::Relaxed);
            lock(&run.state[idx]).error = Some(format!("{e:#}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Duplicate deliveries
// ---------------------------------------------------------------------------------------------

/// Every 250 ms, look at the queue rows not seen yet and copy about `rate` of them as new
/// messages (a duplicate delivery of the same job). Runs on its own thread (SQLite blocks).
fn inject_duplicates(run: Arc<Run>, db_path: PathBuf, rate: f64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x00D0_B1E5);
    let mut conn: Option<rusqlite::Connection> = None;
    let mut last_seen: i64 = 0;
    let mut ours: HashSet<i64> = HashSet::new();
    while !run.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        if rate <= 0.0 {
            continue;
        }
        if conn.is_none() && db_path.exists() {
            match rusqlite::Connection::open(&db_path) {
                Ok(c) => {
                    let _ = c.busy_timeout(Duration::from_secs(10));
                    conn = Some(c);
                }
                Err(_) => continue,
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match copy_some(c, &mut last_seen, &mut ours, rate, &mut rng, &run.counters) {
            Ok(()) => {}
            Err(e) => {
                // The table may not exist yet on the first start; anything else is counted.
                if !e.to_string().contains("no such table") {
                    run.counters.dup_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn copy_some(
    c: &mut rusqlite::Connection,
    last_seen: &mut i64,
    ours: &mut HashSet<i64>,
    rate: f64,
    rng: &mut StdRng,
    counters: &Counters,
) -> rusqlite::Result<()> {
    // Read without a write lock; take one (BEGIN IMMEDIATE) only to insert the copies. A
    // message deleted in between is still copied: a late duplicate delivery is one too.
    let rows: Vec<(i64, String)> = {
        let mut stmt = c.prepare_cached(
            "SELECT seq, body FROM queue WHERE queue = ?1 AND dead = 0 AND seq > ?2 ORDER BY seq",
        )?;
        let rows = stmt
            .query_map(rusqlite::params![QUEUE, *last_seen], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows
    };
    let mut seen = 0u64;
    let mut max_seq = *last_seen;
    let mut chosen: Vec<String> = Vec::new();
    for (seq, body) in rows {
        max_seq = max_seq.max(seq);
        if ours.contains(&seq) {
            continue;
        }
        seen += 1;
        if rng.gen_bool(rate) {
            chosen.push(body);
        }
    }
    if !chosen.is_empty() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut new_ours = Vec::with_capacity(chosen.len());
        for body in &chosen {
            tx.execute(
                "INSERT INTO queue (queue, message_id, body, visible_at, receive_count, receipt, dead, sent_at)
                 VALUES (?1, ?2, ?3, ?4, 0, NULL, 0, ?4)",
                rusqlite::params![QUEUE, uuid::Uuid::new_v4().to_string(), body, now],
            )?;
            new_ours.push(tx.last_insert_rowid());
        }
        tx.commit()?;
        ours.extend(new_ours);
        counters
            .dup_injected
            .fetch_add(chosen.len() as u64, Ordering::Relaxed);
    }
    // Only once the copies are committed do their originals count as seen.
    *last_seen = max_seq;
    counters.dup_seen.fetch_add(seen, Ordering::Relaxed);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reading serve's state
// ---------------------------------------------------------------------------------------------

/// An image record as listed by `GET /v1/images` (parsed leniently).
#[derive(Debug, Clone)]
struct Rec {
    image_id: String,
    source: String,
    status: String,
    error: Option<String>,
    sha256: Option<String>,
    result: Option<Value>,
    /// Paid calls outside the result, when serve records them (`extra_spend`).
    extra_spend: Option<Value>,
}

impl Rec {
    fn from_value(v: &Value) -> Rec {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Rec {
            image_id: s("image_id").unwrap_or_default(),
            source: s("source").unwrap_or_default(),
            status: s("status").unwrap_or_default(),
            error: s("error"),
            sha256: s("sha256"),
            result: v.get("result").filter(|r| !r.is_null()).cloned(),
            extra_spend: v.get("extra_spend").filter(|r| !r.is_null()).cloned(),
        }
    }

    fn is_final(&self) -> bool {
        self.status == "done" || self.status == "failed"
    }

    fn cost(&self) -> f64 {
        self.result
            .as_ref()
            .and_then(|r| r.get("cost_usd"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    }

    fn tokens(&self, which: &str) -> u64 {
        self.result
            .as_ref()
            .and_then(|r| r.get("usage"))
            .and_then(|u| u.get(which))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    fn cached(&self) -> bool {
        self.result
            .as_ref()
            .and_then(|r| r.get("cached"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    fn extra_f64(&self, key: &str) -> f64 {
        self.extra_spend
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    }

    fn extra_u64(&self, key: &str) -> u64 {
        self.extra_spend
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// Provider calls booked with this record: its paid result (`result.calls` when serve
    /// reports it, else 1) plus `extra_spend.calls`.
    fn booked_calls(&self) -> u64 {
        let result_calls = match &self.result {
            Some(r) if !self.cached() => r.get("calls").and_then(Value::as_u64).unwrap_or(1),
            _ => 0,
        };
        result_calls + self.extra_u64("calls")
    }
}

async fn get_json(run: &Run, url: &str) -> anyhow::Result<Value> {
    let r = run
        .http
        .get(url)
        .header("x-api-key", API_KEY)
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    let status = r.status();
    if !status.is_success() {
        bail!(
            "GET {url}: HTTP {status}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    Ok(r.json().await?)
}

/// Every record (optionally of one status), all pages.
async fn list_all(run: &Run, status: Option<&str>) -> anyhow::Result<Vec<Rec>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = run.api("/v1/images?limit=100");
        if let Some(s) = status {
            let _ = write!(url, "&status={s}");
        }
        if let Some(c) = &cursor {
            let _ = write!(url, "&cursor={c}");
        }
        let page = get_json(run, &url).await?;
        if let Some(images) = page.get("images").and_then(Value::as_array) {
            out.extend(images.iter().map(Rec::from_value));
        }
        match page.get("next_cursor").and_then(Value::as_str) {
            Some(c) if !c.is_empty() => cursor = Some(c.to_string()),
            _ => return Ok(out),
        }
    }
}

/// Same, retried while serve is down or restarting.
async fn list_all_retrying(
    run: &Run,
    status: Option<&str>,
    patience: Duration,
) -> anyhow::Result<Vec<Rec>> {
    let deadline = Instant::now() + patience;
    loop {
        match list_all(run, status).await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Base names (without extension) of every stored upload blob: `{image_id}`.
fn upload_blob_stems(data_dir: &Path) -> HashSet<String> {
    fn walk(dir: &Path, out: &mut HashSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                out.insert(stem.to_string());
            }
        }
    }
    let mut out = HashSet::new();
    walk(&data_dir.join("blobs").join("uploads"), &mut out);
    out
}

/// Which record ids must end final: every confirmed upload, and every other record whose
/// upload bytes are stored or were resized (the PUT landed even if its answer was lost).
struct Required {
    confirmed: HashSet<String>,
    known_keys: HashMap<String, String>,
    stems: HashSet<String>,
    data_dir: PathBuf,
}

impl Required {
    fn new(run: &Run) -> Required {
        let mut confirmed = HashSet::new();
        let mut known_keys = HashMap::new();
        for st in &run.state {
            for id in &lock(st).ids {
                if id.confirmed {
                    confirmed.insert(id.image_id.clone());
                }
                known_keys.insert(id.image_id.clone(), id.key.clone());
            }
        }
        Required {
            confirmed,
            known_keys,
            stems: upload_blob_stems(&run.serve.data_dir),
            data_dir: run.serve.data_dir.clone(),
        }
    }

    fn blob_stored(&self, id: &str) -> bool {
        match self.known_keys.get(id) {
            Some(key) if self.data_dir.join("blobs").join(key).exists() => true,
            _ => self.stems.contains(id),
        }
    }

    /// A record that was never uploaded (a replaced upload URL, a POST whose answer was lost)
    /// is not required, whatever serve later makes of it (e.g. expires it as failed).
    fn required(&self, r: &Rec) -> bool {
        self.confirmed.contains(&r.image_id)
            || r.sha256.is_some()
            || r.status == "queued"
            || self.blob_stored(&r.image_id)
    }
}

// ---------------------------------------------------------------------------------------------
// Monitor and killer
// ---------------------------------------------------------------------------------------------

/// Every 2 s: done (ledger images) + failed counts, for progress, kill moments and stalls.
async fn monitor(run: Arc<Run>) {
    let mut last_print = Instant::now();
    while !run.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let costs = get_json(&run, &run.api("/v1/costs")).await;
        let failed = list_all(&run, Some("failed")).await;
        let sim_requests = run.sim.stats().await.requests;
        let (Ok(costs), Ok(failed)) = (costs, failed) else {
            continue;
        };
        let done = costs
            .pointer("/total/images")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let failed = failed.len() as u64;
        {
            let mut p = lock(&run.progress);
            if done != p.done || failed != p.failed {
                p.last_final = Instant::now();
            }
            if done != p.done || failed != p.failed || sim_requests != p.sim_requests {
                p.last_change = Instant::now();
            }
            p.done = done;
            p.failed = failed;
            p.sim_requests = sim_requests;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "fault-run: {:>6.1}s  uploaded {}/{}  done {done}  failed {failed}  kills {}  duplicates {}",
                run.elapsed_s(),
                run.counters.confirmed.load(Ordering::Relaxed),
                run.n,
                lock(&run.kills).len(),
                run.counters.dup_injected.load(Ordering::Relaxed),
            );
        }
    }
}

/// Kill moments: about half at random points of the upload (by images uploaded), the rest at
/// random points of the analysis left when the upload ended (by images final).
async fn killer(run: Arc<Run>, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4B11_1E55);
    let k = run.kills_planned;
    let k_upload = k.div_ceil(2);
    let mut upload_marks: Vec<f64> = (0..k_upload).map(|_| rng.gen_range(0.05..0.9)).collect();
    upload_marks.sort_by(f64::total_cmp);
    let mut analysis_marks: Vec<f64> = (k_upload..k).map(|_| rng.gen_range(0.1..0.9)).collect();
    analysis_marks.sort_by(f64::total_cmp);
    let mut last_ready = Instant::now();
    let mut at_upload_end: Option<u64> = None;
    let mut n = 0;
    let mut upload_iter = upload_marks.into_iter().peekable();
    let mut analysis_iter = analysis_marks.into_iter().peekable();
    loop {
        if run.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let uploaded = run.counters.confirmed.load(Ordering::Relaxed);
        let uploads_done = run.uploads_done.load(Ordering::Relaxed);
        let final_now = run.final_count();
        if uploads_done && at_upload_end.is_none() {
            at_upload_end = Some(final_now);
        }
        // Let each new incarnation run a little (0.8–1.6 s) before the next kill.
        let rested =
            n == 0 || last_ready.elapsed() >= Duration::from_millis(800 + (n as u64 % 3) * 400);
        let due = if let Some(&m) = upload_iter.peek() {
            uploaded as f64 >= m * run.n as f64 || uploads_done
        } else if let Some(&m) = analysis_iter.peek() {
            match at_upload_end {
                Some(f0) => {
                    let remaining = (run.n as u64).saturating_sub(f0) as f64;
                    final_now as f64 >= f0 as f64 + m * remaining
                }
                None => false,
            }
        } else {
            return Ok(());
        };
        if !(due && rested) {
            // Uploads of small images are fast: look closely while they run.
            let poll = if uploads_done { 20 } else { 2 };
            tokio::time::sleep(Duration::from_millis(poll)).await;
            continue;
        }
        if upload_iter.peek().is_some() {
            upload_iter.next();
        } else {
            analysis_iter.next();
            // A random moment near the mark (the upload marks are random already, and an
            // upload can be over in a second).
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        }
        n += 1;
        let phase = if run.uploads_done.load(Ordering::Relaxed) {
            "analysis"
        } else {
            "upload"
        };
        let at_s = run.elapsed_s();
        let uploaded = run.counters.confirmed.load(Ordering::Relaxed);
        let final_images = run.final_count();
        run.serve.kill();
        let down = Duration::from_millis(rng.gen_range(200..=2000));
        eprintln!(
            "fault-run: {at_s:>6.1}s  SIGKILL #{n} ({phase}: uploaded {uploaded}, final {final_images}); restarting in {} ms",
            down.as_millis()
        );
        tokio::time::sleep(down).await;
        let ready = run.serve.start(&run.http).await?;
        last_ready = Instant::now();
        lock(&run.kills).push(KillEvent {
            n,
            at_s,
            phase,
            uploaded,
            final_images,
            down_ms: down.as_millis() as u64,
            ready_after_ms: ready.as_millis() as u64,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Run the whole thing; `Ok(true)` when every invariant held.
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    opts.validate()?;
    let n = opts.image_count();
    let kills_planned = opts.kill_count();
    let bin = std::fs::canonicalize(&opts.sightline).with_context(|| {
        format!(
            "{} not found: build it with `cargo build --release -p sightline` or pass --sightline",
            opts.sightline.display()
        )
    })?;
    std::fs::create_dir_all(&opts.work_dir)?;
    let work_dir = std::fs::canonicalize(&opts.work_dir)?;
    let data_dir = work_dir.join("data");
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("wiping {}", data_dir.display()))?;
    }
    std::fs::create_dir_all(&data_dir)?;
    let log = work_dir.join("serve.log");
    let _ = std::fs::remove_file(&log);

    eprintln!("fault-run: generating {n} images…");
    let images: Vec<TestImage> =
        tokio::task::spawn_blocking(move || (0..n).map(make_image).collect::<Vec<_>>()).await?;
    let distinct: HashSet<String> = images.iter().map(|i| sha_hex(&i.bytes)).collect();
    if distinct.len() != n {
        bail!(
            "generated images are not distinct ({} of {n})",
            distinct.len()
        );
    }
    let input_bytes: u64 = images.iter().map(|i| i.bytes.len() as u64).sum();

    let sim_cfg = sim_config(&opts);
    let sim = SimServer::start(sim_cfg.clone()).await?;
    let port = free_port()?;
    let passthrough_log = std::env::var("SIGHTLINE_LOG").unwrap_or_else(|_| "warn".into());
    let env: Vec<(String, String)> = [
        ("OPENAI_API_KEY", SIM_KEY.to_string()),
        ("OPENAI_BASE_URL", sim.base_url.clone()),
        ("SIGHTLINE_PROVIDER", "openai".into()),
        ("SIGHTLINE_MODEL", MODEL.into()),
        ("SIGHTLINE_RPM", opts.rpm.to_string()),
        ("SIGHTLINE_TPM", "0".into()),
        ("SIGHTLINE_WORKERS", opts.workers.to_string()),
        (
            "SIGHTLINE_TIMEOUT_SECS",
            opts.provider_timeout_secs.to_string(),
        ),
        ("SIGHTLINE_RECONCILE_EVERY_SECS", "2".into()),
        ("SIGHTLINE_RECONCILE_AFTER_SECS", "5".into()),
        ("SIGHTLINE_STUCK_AFTER_SECS", "60".into()),
        ("SIGHTLINE_LOG", passthrough_log),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(opts.uploaders + 4)
        .build()?;
    let serve = Serve::new(
        bin.clone(),
        port,
        data_dir.clone(),
        log.clone(),
        env.clone(),
    );
    serve.start(&http).await?;
    eprintln!(
        "fault-run: serve on 127.0.0.1:{port} (data {}), simulator at {}; {n} images, {kills_planned} kills, seed {}",
        data_dir.display(),
        sim.base_url,
        opts.seed
    );

    let run = Arc::new(Run {
        n,
        kills_planned,
        state: (0..n).map(|_| Mutex::new(ImageState::default())).collect(),
        images,
        counters: Counters::default(),
        serve,
        http,
        sim,
        started: Instant::now(),
        uploads_done: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        progress: Mutex::new(Progress {
            done: 0,
            failed: 0,
            sim_requests: 0,
            last_change: Instant::now(),
            last_final: Instant::now(),
        }),
        kills: Mutex::new(Vec::new()),
    });

    // Ctrl-C: never leave a serve behind.
    {
        let run = run.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                run.stop.store(true, Ordering::Relaxed);
                run.serve.shutdown();
                eprintln!("fault-run: interrupted; serve stopped");
                std::process::exit(130);
            }
        });
    }

    // Background: duplicates, monitor, killer.
    let dup_thread = {
        let run = run.clone();
        let db = data_dir.join("sightline.db");
        let (rate, seed) = (opts.dup_rate, opts.seed);
        std::thread::spawn(move || inject_duplicates(run, db, rate, seed))
    };
    let monitor_task = tokio::spawn(monitor(run.clone()));
    let killer_task = tokio::spawn(killer(run.clone(), opts.seed));

    // Uploads, in a seeded random order.
    let mut order: Vec<usize> = (0..n).collect();
    {
        use rand::seq::SliceRandom;
        order.shuffle(&mut StdRng::seed_from_u64(opts.seed));
    }
    let order = Arc::new(order);
    let next = Arc::new(AtomicUsize::new(0));
    let uploaders: Vec<_> = (0..opts.uploaders)
        .map(|u| {
            tokio::spawn(uploader(
                run.clone(),
                order.clone(),
                next.clone(),
                opts.seed.wrapping_add(1 + u as u64),
            ))
        })
        .collect();
    let deadline = run.started + Duration::from_secs(opts.timeout_secs);
    let stopper = {
        let run = run.clone();
        tokio::spawn(async move {
            // The uploads get the same deadline as the whole wait.
            tokio::time::sleep_until(deadline.into()).await;
            run.stop.store(true, Ordering::Relaxed);
        })
    };
    for u in uploaders {
        let _ = u.await;
    }
    let upload_s = run.elapsed_s();
    run.uploads_done.store(true, Ordering::Relaxed);
    lock(&run.progress).last_change = Instant::now();
    eprintln!(
        "fault-run: {upload_s:>6.1}s  uploads finished: {} confirmed, {} failed",
        run.counters.confirmed.load(Ordering::Relaxed),
        run.counters.upload_failures.load(Ordering::Relaxed)
    );

    // Wait: every required record final, the planned kills done (or abandoned), or time out.
    let mut wait_end_reason = "all final";
    let mut final_at: Option<f64> = None;
    let mut killer_result: Option<anyhow::Result<()>> = None;
    let mut killer_task = Some(killer_task);
    loop {
        if let Some(t) = &killer_task {
            if t.is_finished() {
                let t = killer_task.take().expect("checked");
                killer_result = Some(t.await.unwrap_or_else(|e| Err(e.into())));
            }
        }
        if let Some(Err(e)) = &killer_result {
            wait_end_reason = "serve did not restart";
            eprintln!("fault-run: {e:#}");
            break;
        }
        if Instant::now() >= deadline {
            wait_end_reason = "timeout";
            break;
        }
        let stalled =
            lock(&run.progress).last_change.elapsed() >= Duration::from_secs(opts.stall_secs);
        if stalled {
            wait_end_reason = "stalled";
            break;
        }
        if killer_task.is_none() {
            let p = lock(&run.progress).clone();
            let confirmed = run.counters.confirmed.load(Ordering::Relaxed) as u64;
            if p.done + p.failed >= confirmed {
                // Exact check: no required record is pending or queued.
                let pending = list_all(&run, Some("pending")).await;
                let queued = list_all(&run, Some("queued")).await;
                if let (Ok(pending), Ok(queued)) = (pending, queued) {
                    let req = Required::new(&run);
                    let open = pending
                        .iter()
                        .chain(queued.iter())
                        .filter(|r| req.required(r))
                        .count();
                    if open == 0 {
                        final_at = Some(run.elapsed_s());
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // The killer may still be waiting for its moments when everything is final: it stops here.
    run.stop.store(true, Ordering::Relaxed);
    if let Some(t) = killer_task.take() {
        match tokio::time::timeout(Duration::from_secs(90), t).await {
            Ok(r) => killer_result = Some(r.unwrap_or_else(|e| Err(e.into()))),
            Err(_) => eprintln!("fault-run: the killer did not stop"),
        }
    }
    stopper.abort();
    monitor_task.abort();
    let _ = dup_thread.join();
    // Not all final: the analysis ended when the last image became final.
    let wall_s = final_at.unwrap_or_else(|| {
        let last = lock(&run.progress).last_final;
        last.saturating_duration_since(run.started).as_secs_f64()
    });
    eprintln!(
        "fault-run: {:>6.1}s  waiting ended: {wait_end_reason} (last image final at {wall_s:.1}s); collecting",
        run.elapsed_s()
    );

    // Collect.
    let records = list_all_retrying(&run, None, Duration::from_secs(60)).await?;
    let costs = get_json(&run, &run.api("/v1/costs")).await?;
    let stats = run.sim.stats().await;
    run.serve.shutdown();

    let inputs = Inputs {
        opts: &opts,
        n,
        kills_planned,
        records: &records,
        costs: &costs,
        stats: &stats,
        required: Required::new(&run),
        state: &run.state,
        counters: &run.counters,
        kills: lock(&run.kills).clone(),
        upload_s,
        wall_s,
        wait_end_reason,
        input_bytes,
        sim_cfg: &sim_cfg,
        log: &log,
        data_dir: &data_dir,
    };
    let report = evaluate(&inputs);
    print!("{}", report.table);
    let json_text = serde_json::to_string_pretty(&report.json)?;
    let default_report = work_dir.join("report.json");
    std::fs::write(&default_report, &json_text)?;
    if let Some(p) = &opts.report {
        if let Some(parent) = p.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
        std::fs::write(p, &json_text).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("fault-run: report written to {}", p.display());
    } else {
        eprintln!("fault-run: report written to {}", default_report.display());
    }
    if let Some(Err(e)) = killer_result {
        eprintln!("fault-run: killer: {e:#}");
    }
    Ok(report.passed)
}

// ---------------------------------------------------------------------------------------------
// Invariants and report
// ---------------------------------------------------------------------------------------------

/// One checked (or reported) invariant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Invariant {
    pub id: u32,
    pub name: &'static str,
    /// `None` = reported, not asserted.
    pub passed: Option<bool>,
    pub detail: String,
}

struct Inputs<'a> {
    opts: &'a Options,
    n: usize,
    kills_planned: usize,
    records: &'a [Rec],
    costs: &'a Value,
    stats: &'a SimStats,
    required: Required,
    state: &'a [Mutex<ImageState>],
    counters: &'a Counters,
    kills: Vec<KillEvent>,
    upload_s: f64,
    wall_s: f64,
    wait_end_reason: &'static str,
    input_bytes: u64,
    sim_cfg: &'a SimConfig,
    log: &'a Path,
    data_dir: &'a Path,
}

struct Report {
    passed: bool,
    table: String,
    json: Value,
}

/// How a failed record failed.
pub fn failure_kind(error: Option<&str>) -> &'static str {
    let e = error.unwrap_or("").to_ascii_lowercase();
    if e.contains("simulated poison") || e.contains("image_rejected") {
        "poison"
    } else if e.contains("provider response")
        || e.contains("invalid output")
        || e.contains("not json")
    {
        "invalid-output"
    } else if e.contains("gave up after") {
        "gave-up"
    } else {
        "other"
    }
}

fn sample<I: IntoIterator<Item = String>>(it: I, max: usize) -> Vec<String> {
    it.into_iter().take(max).collect()
}

/// Costs report field, leniently: `total.<name>` as f64.
fn total_f64(costs: &Value, name: &str) -> Option<f64> {
    costs
        .pointer(&format!("/total/{name}"))
        .and_then(Value::as_f64)
}

fn evaluate(x: &Inputs<'_>) -> Report {
    let o = x.opts;
    let counters = x.counters;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut invariants: Vec<Invariant> = Vec::new();

    // --- records by id, by logical image -------------------------------------------------
    let mut by_id: HashMap<&str, &Rec> = HashMap::new();
    let mut duplicate_ids: Vec<String> = Vec::new();
    for r in x.records {
        if by_id.insert(r.image_id.as_str(), r).is_some() {
            duplicate_ids.push(r.image_id.clone());
        }
    }
    let known_ids: HashSet<String> = x
        .state
        .iter()
        .flat_map(|s| {
            lock(s)
                .ids
                .iter()
                .map(|u| u.image_id.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let orphans: Vec<&Rec> = x
        .records
        .iter()
        .filter(|r| !known_ids.contains(&r.image_id))
        .collect();
    let required: Vec<&Rec> = x
        .records
        .iter()
        .filter(|r| x.required.required(r))
        .collect();
    let not_required: Vec<&Rec> = x
        .records
        .iter()
        .filter(|r| !x.required.required(r))
        .collect();

    // Primary record per logical image: the confirmed upload.
    let mut primary_missing: Vec<String> = Vec::new(); // image never uploaded (harness)
    let mut primary_unlisted: Vec<String> = Vec::new(); // confirmed id not in the listing
    let mut primaries: Vec<(usize, &Rec)> = Vec::new();
    let mut abandoned_ids = 0usize;
    for (i, st) in x.state.iter().enumerate() {
        let st = lock(st);
        abandoned_ids += st.ids.iter().filter(|u| !u.confirmed).count();
        match st.ids.iter().rev().find(|u| u.confirmed) {
            None => primary_missing.push(format!(
                "#{i}: {}",
                st.error.clone().unwrap_or_else(|| "not uploaded".into())
            )),
            Some(u) => match by_id.get(u.image_id.as_str()) {
                Some(r) => primaries.push((i, r)),
                None => primary_unlisted.push(u.image_id.clone()),
            },
        }
    }

    // --- 1. stuck --------------------------------------------------------------------------
    let stuck: Vec<&Rec> = required.iter().copied().filter(|r| !r.is_final()).collect();
    let mut stuck_by_status: BTreeMap<String, u64> = BTreeMap::new();
    for r in &stuck {
        *stuck_by_status.entry(r.status.clone()).or_default() += 1;
    }
    let stuck_primary = primaries.iter().filter(|(_, r)| !r.is_final()).count();
    let stuck_other = stuck.len() - stuck_primary;
    invariants.push(Invariant {
        id: 1,
        name: "no image stuck (every uploaded image done or failed)",
        passed: Some(stuck.is_empty() && primary_missing.is_empty() && primary_unlisted.is_empty()),
        detail: format!(
            "{} stuck ({stuck_by_status:?}; {stuck_primary} confirmed uploads, {stuck_other} \
             records whose upload landed but whose answer was lost); {} images never uploaded; \
             {} confirmed ids missing from the listing; waiting ended: {}",
            stuck.len(),
            primary_missing.len(),
            primary_unlisted.len(),
            x.wait_end_reason
        ),
    });

    // --- 2. poison vs good -------------------------------------------------------------------
    let final_required: Vec<&Rec> = required.iter().copied().filter(|r| r.is_final()).collect();
    let mut failed_by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut poison_failed_shas: BTreeSet<String> = BTreeSet::new();
    let mut bad_failures: Vec<String> = Vec::new();
    let mut mispredicted: Vec<String> = Vec::new();
    let mut invalid_output_failures = 0u64;
    for r in &final_required {
        let predicted = r
            .sha256
            .as_deref()
            .is_some_and(|s| is_poison(o.seed, s, o.poison_rate));
        if r.status == "failed" {
            let kind = failure_kind(r.error.as_deref());
            *failed_by_kind.entry(kind).or_default() += 1;
            match kind {
                "poison" => {
                    if let Some(s) = &r.sha256 {
                        poison_failed_shas.insert(s.clone());
                    }
                    if !predicted {
                        mispredicted.push(format!(
                            "{} failed as poison but is_poison says no",
                            r.image_id
                        ));
                    }
                }
                "invalid-output" => invalid_output_failures += 1,
                _ => bad_failures.push(format!(
                    "{} ({}): {}",
                    r.image_id,
                    r.source,
                    r.error.as_deref().unwrap_or("no error")
                )),
            }
        } else if predicted {
            mispredicted.push(format!("{} is poison but {}", r.image_id, r.status));
        } else if r.result.is_none() {
            bad_failures.push(format!("{} done without a result", r.image_id));
        }
    }
    let sim_poison_shas: BTreeSet<String> = x.stats.poisoned_per_image.keys().cloned().collect();
    let poison_sets_equal = sim_poison_shas == poison_failed_shas;
    let invalid_output_bound = (x.stats.faults.malformed + x.stats.faults.bad_content) / 2;
    let primaries_done = primaries.iter().filter(|(_, r)| r.status == "done").count();
    let primaries_failed_poison = primaries
        .iter()
        .filter(|(_, r)| r.status == "failed" && failure_kind(r.error.as_deref()) == "poison")
        .count();
    let ok2 = bad_failures.is_empty()
        && mispredicted.is_empty()
        && poison_sets_equal
        && x.stats.poisoned_images == poison_failed_shas.len() as u64
        && invalid_output_failures <= invalid_output_bound;
    invariants.push(Invariant {
        id: 2,
        name: "every good image done; only poison images failed",
        passed: Some(ok2),
        detail: format!(
            "images: {primaries_done} done, {primaries_failed_poison} failed as poison; failed \
             records by kind {failed_by_kind:?}; distinct poison images: {} failed vs {} seen by \
             the simulator (sets equal: {poison_sets_equal}); is_poison mismatches: {}; \
             invalid-output failures {invalid_output_failures} (allowed ≤ {invalid_output_bound}: \
             two truncated answers in a row are permanent by the retry policy); other failures: {}",
            poison_failed_shas.len(),
            x.stats.poisoned_images,
            mispredicted.len(),
            bad_failures.len()
        ),
    });

    // --- 3. exactly one result -----------------------------------------------------------------
    let done: Vec<&Rec> = x.records.iter().filter(|r| r.status == "done").collect();
    let done_without_result = done.iter().filter(|r| r.result.is_none()).count();
    let not_done_with_result = x
        .records
        .iter()
        .filter(|r| r.status != "done" && r.result.is_some())
        .count();
    let mut paid_per_sha: HashMap<&str, u64> = HashMap::new();
    for r in &done {
        if r.result.is_some() && !r.cached() {
            *paid_per_sha
                .entry(r.sha256.as_deref().unwrap_or(""))
                .or_default() += 1;
        }
    }
    let paid_twice: Vec<String> = paid_per_sha
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(s, c)| format!("{s}: {c} paid results"))
        .collect();
    let primary_shas: HashSet<&str> = primaries
        .iter()
        .filter_map(|(_, r)| r.sha256.as_deref())
        .collect();
    let primaries_with_sha = primaries.iter().filter(|(_, r)| r.sha256.is_some()).count();
    let ok3 = duplicate_ids.is_empty()
        && done_without_result == 0
        && not_done_with_result == 0
        && paid_twice.is_empty()
        && primary_shas.len() == primaries_with_sha;
    invariants.push(Invariant {
        id: 3,
        name: "each done image has exactly one result; one paid result per content",
        passed: Some(ok3),
        detail: format!(
            "{} records listed, {} ids listed twice; {done_without_result} done without a result, \
             {not_done_with_result} not done with a result; {} contents paid more than once; \
             distinct resized sha256 over uploaded images: {} of {primaries_with_sha}",
            x.records.len(),
            duplicate_ids.len(),
            paid_twice.len(),
            primary_shas.len()
        ),
    });

    // --- 4. ledger = Σ results (+ spend outside results, when serve records it) ----------------
    let sum_result_cost: f64 = done.iter().map(|r| r.cost()).sum();
    let sum_extra_cost: f64 = x.records.iter().map(|r| r.extra_f64("cost_usd")).sum();
    let sum_cost = sum_result_cost + sum_extra_cost;
    let sum_in: u64 = done.iter().map(|r| r.tokens("input_tokens")).sum::<u64>()
        + x.records
            .iter()
            .map(|r| r.extra_u64("input_tokens"))
            .sum::<u64>();
    let sum_out: u64 = done.iter().map(|r| r.tokens("output_tokens")).sum::<u64>()
        + x.records
            .iter()
            .map(|r| r.extra_u64("output_tokens"))
            .sum::<u64>();
    let with_extra = x.records.iter().filter(|r| r.extra_spend.is_some()).count();
    let ledger_cost = total_f64(x.costs, "cost_usd").unwrap_or(f64::NAN);
    let ledger_in = x
        .costs
        .pointer("/total/input_tokens")
        .and_then(Value::as_u64);
    let ledger_out = x
        .costs
        .pointer("/total/output_tokens")
        .and_then(Value::as_u64);
    let ledger_images = x.costs.pointer("/total/images").and_then(Value::as_u64);
    let ledger_calls = ["calls", "paid_calls", "provider_calls", "billed_calls"]
        .iter()
        .find_map(|k| {
            x.costs
                .pointer(&format!("/total/{k}"))
                .and_then(Value::as_u64)
                .map(|v| (*k, v))
        });
    let booked: u64 = x.records.iter().map(Rec::booked_calls).sum();
    let ok4 = (ledger_cost - sum_cost).abs() < 1e-6
        && ledger_in == Some(sum_in)
        && ledger_out == Some(sum_out)
        && ledger_images == Some(done.len() as u64)
        && ledger_calls.is_none_or(|(_, c)| c == booked);
    invariants.push(Invariant {
        id: 4,
        name: "ledger = Σ results (cost, tokens, images, calls)",
        passed: Some(ok4),
        detail: format!(
            "ledger ${ledger_cost:.6} vs Σ results ${sum_result_cost:.6} + spend outside \
             results ${sum_extra_cost:.6} on {with_extra} records (diff {:.2e}); input tokens \
             {} vs {sum_in}; output tokens {} vs {sum_out}; images {} vs {} done records; \
             calls {}",
            (ledger_cost - sum_cost).abs(),
            opt(ledger_in),
            opt(ledger_out),
            opt(ledger_images),
            done.len(),
            ledger_calls
                .map(|(k, v)| format!("total.{k} {v} vs {booked} booked on records"))
                .unwrap_or_else(|| "not in the costs report".into())
        ),
    });

    // --- 5. paid calls − lost to kills = booked ------------------------------------------------
    let paid_results = done.iter().filter(|r| !r.cached()).count() as u64;
    let cached_results = done.len() as u64 - paid_results;
    let s = x.stats;
    let paid_calls = billed_calls(s);
    // Does serve book calls outside results (invalid answers, answers that lost a race)? If
    // not, a truncated answer (no readable usage) is paid at the provider but never booked, and
    // a bad-content answer followed by a good one is folded into that result's usage.
    let books_extra = with_extra > 0
        || done.iter().any(|r| {
            r.result
                .as_ref()
                .is_some_and(|v| v.get("calls").is_some() || v.get("usage_estimated").is_some())
        });
    let unbookable = if books_extra {
        0
    } else {
        s.faults.malformed + s.faults.bad_content
    };
    let lost = paid_calls as i64 - booked as i64 - unbookable as i64;
    let kills_done = x.kills.len() as i64;
    let lost_bound = kills_done * o.workers as i64 * 2;
    let ok5 = lost >= 0 && lost <= lost_bound;
    invariants.push(Invariant {
        id: 5,
        name: "paid calls − lost to kills = booked calls",
        passed: Some(ok5),
        detail: format!(
            "simulator paid calls {paid_calls} (completions {} + truncated {} + bad content {}); \
             booked on records {booked} (paid results {paid_results}, calls outside results {}); \
             {}; lost to kills {lost} (allowed 0..={lost_bound} = kills {kills_done} × workers \
             {} × 2)",
            s.completions,
            s.faults.malformed,
            s.faults.bad_content,
            booked.saturating_sub(paid_results),
            if books_extra {
                "serve books invalid answers too".to_string()
            } else {
                format!(
                    "serve books no call outside results, so {unbookable} truncated/bad-content \
                     answers are paid but unbooked"
                )
            },
            o.workers,
        ),
    });

    // --- 6. wall time vs ideal -------------------------------------------------------------------
    let ideal_images_s = x.n as f64 * 60.0 / o.rpm as f64;
    // Requests that took an RPM slot at the simulator (its limiter and injected 429s, and poison
    // rejections, take none).
    let admitted = s
        .requests
        .saturating_sub(s.rate_limited + s.faults.rate_limit + s.poisoned + s.bad_requests)
        .saturating_sub(s.unauthorized + s.not_found);
    let ideal_requests_s = admitted as f64 * 60.0 / o.rpm as f64;
    let ratio = x.wall_s / ideal_images_s.max(1e-9);
    invariants.push(Invariant {
        id: 6,
        name: "wall time vs the ideal the RPM allows (reported)",
        passed: None,
        detail: format!(
            "first upload → last image final {:.1}s; ideal {ideal_images_s:.1}s ({} images at \
             {} rpm) → ratio {ratio:.2}; ideal for the {admitted} admitted requests \
             {ideal_requests_s:.1}s → ratio {:.2}",
            x.wall_s,
            x.n,
            o.rpm,
            x.wall_s / ideal_requests_s.max(1e-9)
        ),
    });

    let passed = invariants.iter().all(|i| i.passed != Some(false));

    // --- table -----------------------------------------------------------------------------------
    let mut t = String::new();
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "fault run: {} images, seed {}, rpm {}, {} workers, {} uploaders",
        x.n, o.seed, o.rpm, o.workers, o.uploaders
    );
    let _ = writeln!(
        t,
        "faults: 5xx {:.0}%, 429 {:.0}% (Retry-After {}s), hang {:.0}% ({} ms, serve timeout {}s), \
         truncated {:.0}%, poison images {:.0}%, duplicates {:.0}%, latency {}+{} ms",
        o.error_rate * 100.0,
        o.rate_limit_rate * 100.0,
        o.retry_after_s,
        o.timeout_rate * 100.0,
        o.timeout_hang_ms,
        o.provider_timeout_secs,
        o.malformed_rate * 100.0,
        o.poison_rate * 100.0,
        o.dup_rate * 100.0,
        o.latency_ms,
        o.jitter_ms
    );
    let _ = writeln!(t);
    let row = |t: &mut String, k: &str, v: String| {
        let _ = writeln!(t, "  {k:<44} {v}");
    };
    let _ = writeln!(t, "run");
    row(&mut t, "upload phase", format!("{:.1}s", x.upload_s));
    row(
        &mut t,
        "first upload → last image final",
        format!("{:.1}s ({})", x.wall_s, x.wait_end_reason),
    );
    row(
        &mut t,
        "kills (SIGKILL) performed / planned",
        format!("{} / {}", x.kills.len(), x.kills_planned),
    );
    for k in &x.kills {
        row(
            &mut t,
            &format!("  kill #{}", k.n),
            format!(
                "{:.1}s during {} (uploaded {}, final {}), down {} ms, healthy {} ms after restart",
                k.at_s, k.phase, k.uploaded, k.final_images, k.down_ms, k.ready_after_ms
            ),
        );
    }
    row(
        &mut t,
        "duplicate deliveries injected",
        format!(
            "{} of {} queue messages seen ({} db errors)",
            ld(&counters.dup_injected),
            ld(&counters.dup_seen),
            ld(&counters.dup_errors)
        ),
    );
    row(
        &mut t,
        "uploads: POSTs / PUTs",
        format!(
            "{} / {} ({} POST retries, {} PUT retries, {} transport errors)",
            ld(&counters.posts),
            ld(&counters.puts),
            ld(&counters.post_retries),
            ld(&counters.put_retries),
            ld(&counters.transport_errors)
        ),
    );
    row(
        &mut t,
        "re-uploaded after restart (PUT 403)",
        ld(&counters.reuploaded_after_403).to_string(),
    );
    row(
        &mut t,
        "PUT retry answered 409 (already uploaded)",
        format!(
            "{} (409 on a first PUT: {})",
            ld(&counters.already_uploaded_409),
            ld(&counters.conflict_on_first_put)
        ),
    );
    row(
        &mut t,
        "records: listed / abandoned / orphaned",
        format!(
            "{} / {abandoned_ids} upload ids replaced / {} created by a POST whose answer was lost",
            x.records.len(),
            orphans.len()
        ),
    );
    row(
        &mut t,
        "records never uploaded (not required)",
        format!(
            "{} ({:?})",
            not_required.len(),
            count_by(not_required.iter().map(|r| r.status.clone()))
        ),
    );
    let _ = writeln!(t, "results");
    row(
        &mut t,
        "statuses (all records)",
        format!("{:?}", count_by(x.records.iter().map(|r| r.status.clone()))),
    );
    row(
        &mut t,
        "done: paid / cached",
        format!("{paid_results} / {cached_results}"),
    );
    row(
        &mut t,
        "Σ results + extra spend: cost / in / out",
        format!("${sum_cost:.6} / {sum_in} / {sum_out}"),
    );
    row(
        &mut t,
        "ledger: cost / input / output / images",
        format!(
            "${ledger_cost:.6} / {} / {} / {}",
            opt(ledger_in),
            opt(ledger_out),
            opt(ledger_images)
        ),
    );
    if let Some(v) = total_f64(x.costs, "estimated_usage_cost_usd") {
        row(&mut t, "ledger: estimated usage cost", format!("${v:.6}"));
    }
    let _ = writeln!(t, "simulator");
    simulator_rows(&mut t, 44, s);
    row(
        &mut t,
        "tokens billed: prompt / completion",
        format!("{} / {}", s.prompt_tokens, s.completion_tokens),
    );
    row(
        &mut t,
        "peak requests in flight",
        s.peak_in_flight.to_string(),
    );
    let (log_warns, log_errors, log_top) = log_summary(x.log);
    let _ = writeln!(t, "serve log");
    row(
        &mut t,
        "WARN / ERROR lines",
        format!("{log_warns} / {log_errors}"),
    );
    for (msg, count) in &log_top {
        row(&mut t, &format!("  {count:>6} ×"), msg.clone());
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "invariants");
    for i in &invariants {
        let verdict = match i.passed {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "info",
        };
        let _ = writeln!(t, "  {verdict}  {}. {}", i.id, i.name);
        let _ = writeln!(t, "        {}", i.detail);
    }
    if !stuck.is_empty() {
        let _ = writeln!(t, "  stuck (first 10):");
        for r in stuck.iter().take(10) {
            let _ = writeln!(t, "        {} {} {}", r.image_id, r.status, r.source);
        }
    }
    if !bad_failures.is_empty() || !mispredicted.is_empty() {
        let _ = writeln!(t, "  unexpected failures (first 10):");
        for f in bad_failures.iter().chain(mispredicted.iter()).take(10) {
            let _ = writeln!(t, "        {f}");
        }
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "{}  (serve log: {}, data: {})",
        if passed {
            "ALL INVARIANTS HOLD"
        } else {
            "SOME INVARIANTS FAILED"
        },
        x.log.display(),
        x.data_dir.display()
    );

    let json = json!({
        "passed": passed,
        "options": {
            "images": x.n,
            "kills": x.kills_planned,
            "seed": o.seed,
            "rpm": o.rpm,
            "workers": o.workers,
            "uploaders": o.uploaders,
            "dup_rate": o.dup_rate,
            "provider_timeout_secs": o.provider_timeout_secs,
            "timeout_secs": o.timeout_secs,
            "stall_secs": o.stall_secs,
            "sightline": o.sightline,
        },
        "simulator_config": x.sim_cfg,
        "input_bytes": x.input_bytes,
        "timing": {
            "upload_s": x.upload_s,
            "wall_s": x.wall_s,
            "wait_end_reason": x.wait_end_reason,
            "ideal_images_s": ideal_images_s,
            "ideal_requests_s": ideal_requests_s,
            "ratio_to_ideal": ratio,
        },
        "kills": x.kills,
        "uploads": {
            "posts": ld(&counters.posts),
            "post_retries": ld(&counters.post_retries),
            "puts": ld(&counters.puts),
            "put_retries": ld(&counters.put_retries),
            "transport_errors": ld(&counters.transport_errors),
            "reuploaded_after_403": ld(&counters.reuploaded_after_403),
            "already_uploaded_409": ld(&counters.already_uploaded_409),
            "conflict_on_first_put": ld(&counters.conflict_on_first_put),
            "confirmed": counters.confirmed.load(Ordering::Relaxed),
            "failures": ld(&counters.upload_failures),
            "never_uploaded": sample(primary_missing.iter().cloned(), 20),
        },
        "duplicates": {
            "messages_seen": ld(&counters.dup_seen),
            "injected": ld(&counters.dup_injected),
            "db_errors": ld(&counters.dup_errors),
        },
        "records": {
            "listed": x.records.len(),
            "by_status": count_by(x.records.iter().map(|r| r.status.clone())),
            "required": required.len(),
            "not_required_by_status": count_by(not_required.iter().map(|r| r.status.clone())),
            "abandoned_upload_ids": abandoned_ids,
            "orphaned_by_lost_post_answer": orphans.len(),
            "duplicate_ids": duplicate_ids,
            "stuck": stuck.iter().map(|r| json!({
                "image_id": r.image_id, "status": r.status, "source": r.source,
                "confirmed_upload": x.required.confirmed.contains(&r.image_id),
            })).collect::<Vec<_>>(),
            "failed_by_kind": failed_by_kind,
            "unexpected_failures": bad_failures,
            "poison_mismatches": mispredicted,
        },
        "results": {
            "done": done.len(),
            "paid": paid_results,
            "cached": cached_results,
            "sum_result_cost_usd": sum_result_cost,
            "sum_extra_spend_cost_usd": sum_extra_cost,
            "records_with_extra_spend": with_extra,
            "sum_input_tokens": sum_in,
            "sum_output_tokens": sum_out,
        },
        "costs": x.costs,
        "simulator_stats": {
            "requests": s.requests,
            "completions": s.completions,
            "paid_calls": paid_calls,
            "rate_limited": s.rate_limited,
            "bad_requests": s.bad_requests,
            "faults": s.faults,
            "poisoned": s.poisoned,
            "poisoned_images": s.poisoned_images,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "tokens_billed": s.tokens_billed,
            "peak_in_flight": s.peak_in_flight,
            "images_called": s.requests_per_image.len(),
            "max_requests_per_image": s.requests_per_image.values().max().copied().unwrap_or(0),
        },
        "calls": {
            "paid": paid_calls,
            "booked": booked,
            "unbooked_invalid_answers": unbookable,
            "serve_books_calls_outside_results": books_extra,
            "lost_to_kills": lost,
            "lost_bound": lost_bound,
            "ledger_calls": ledger_calls.map(|(_, v)| v),
        },
        "serve_log": {
            "path": x.log,
            "warn_lines": log_warns,
            "error_lines": log_errors,
            "top": log_top.iter().map(|(m, c)| json!({"message": m, "count": c})).collect::<Vec<_>>(),
        },
        "invariants": invariants,
    });
    Report {
        passed,
        table: t,
        json,
    }
}

/// WARN/ERROR lines of serve's log, counted by message (timestamps, fields and colours cut).
pub(crate) fn log_summary(path: &Path) -> (u64, u64, Vec<(String, u64)>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (0, 0, Vec::new());
    };
    let strip = |line: &str| {
        let mut out = String::with_capacity(line.len());
        let mut chars = line.chars().peekable();
        while let Some(ch) = chars.next() {
            if ch == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(ch);
            }
        }
        out
    };
    let (mut warns, mut errors) = (0u64, 0u64);
    let mut by_msg: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines() {
        let line = strip(line);
        let level = if line.contains(" WARN ") {
            warns += 1;
            "WARN"
        } else if line.contains(" ERROR ") {
            errors += 1;
            "ERROR"
        } else {
            continue;
        };
        // "<time>  WARN target: message field=value …" → "WARN target: message"
        let rest = line.split_once(level).map(|(_, r)| r.trim()).unwrap_or("");
        let msg: String = rest
            .split_whitespace()
            .take_while(|w| !w.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        *by_msg.entry(format!("{level} {msg}")).or_default() += 1;
    }
    let mut top: Vec<(String, u64)> = by_msg.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(8);
    (warns, errors, top)
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub fn count_by<I: IntoIterator<Item = String>>(it: I) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for k in it {
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Calls the simulator billed: its answers and the paid bad ones (truncated, bad content).
pub fn billed_calls(s: &SimStats) -> u64 {
    s.completions + s.faults.malformed + s.faults.bad_content
}

/// The simulator's requests, faults and poison, as both fault runs report them (keys padded to
/// `width`).
pub(crate) fn simulator_rows(t: &mut String, width: usize, s: &SimStats) {
    let mut row = |k: &str, v: String| {
        let _ = writeln!(t, "  {k:<width$} {v}");
    };
    row(
        "requests / completions / paid calls",
        format!("{} / {} / {}", s.requests, s.completions, billed_calls(s)),
    );
    row(
        "faults: 500/502/503/504",
        format!(
            "{}/{}/{}/{}",
            s.faults.http_500, s.faults.http_502, s.faults.http_503, s.faults.http_504
        ),
    );
    row(
        "faults: 429 injected / 429 RPM limit",
        format!("{} / {}", s.faults.rate_limit, s.rate_limited),
    );
    row(
        "faults: hangs / truncated / bad content",
        format!(
            "{} / {} / {}",
            s.faults.timeout, s.faults.malformed, s.faults.bad_content
        ),
    );
    row(
        "poison: requests / distinct images",
        format!("{} / {}", s.poisoned, s.poisoned_images),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_images_are_distinct_and_decodable() {
        let imgs: Vec<TestImage> = (0..200).map(make_image).collect();
        let shas: HashSet<String> = imgs.iter().map(|i| sha_hex(&i.bytes)).collect();
        assert_eq!(shas.len(), 200);
        for img in &imgs {
            let d = image::load_from_memory(&img.bytes).unwrap();
            assert!((48..=96).contains(&d.width()) && (48..=96).contains(&d.height()));
            assert!(img
                .filename
                .starts_with(&format!("fault-{:07}.", img.index)));
        }
        assert_eq!(imgs[0].content_type, "image/jpeg");
        assert_eq!(imgs[1].content_type, "image/png");
    }

    #[test]
    fn serve_log_warnings_are_counted_by_message() {
        let dir = std::env::temp_dir().join(format!("fault-run-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serve.log");
        std::fs::write(
            &log,
            "===== fault-run: serve start #1 =====\n\
             sightline serve: http://127.0.0.1:1/  (API key: k)\n\
             \u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2msightline_pipeline::worker\u{1b}[0m\u{1b}[2m:\u{1b}[0m queue receive failed \u{1b}[3merror\u{1b}[0m\u{1b}[2m=\u{1b}[0mdatabase is locked\n\
             2026-01-01T00:00:01Z  WARN sightline_pipeline::worker: queue receive failed error=x\n\
             2026-01-01T00:00:02Z ERROR sightline_local::serve: resizing the upload failed error=y\n",
        )
        .unwrap();
        let (warns, errors, top) = log_summary(&log);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((warns, errors), (2, 1));
        assert_eq!(
            top,
            vec![
                (
                    "WARN sightline_pipeline::worker: queue receive failed".to_string(),
                    2
                ),
                (
                    "ERROR sightline_local::serve: resizing the upload failed".to_string(),
                    1
                ),
            ]
        );
    }

    #[test]
    fn failures_are_classified_from_their_error() {
        assert_eq!(
            failure_kind(Some(
                "gpt-4.1-mini: provider returned HTTP 400: Your image was rejected (simulated poison image): …"
            )),
            "poison"
        );
        assert_eq!(
            failure_kind(Some(
                "gpt-4.1-mini: provider response is not JSON: EOF while parsing"
            )),
            "invalid-output"
        );
        assert_eq!(
            failure_kind(Some("gave up after 8 deliveries: x")),
            "gave-up"
        );
        assert_eq!(failure_kind(None), "other");
    }
}
