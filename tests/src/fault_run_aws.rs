//! The AWS fault run (`fault-run --target aws`): the counterpart of [`crate::fault_run`] on the
//! AWS side. N distinct images go through the emulator stack (S3, SQS, DynamoDB of the
//! moto-based emulator in a container) with the Lambda handlers of this repository driven by
//! `lambda-host` processes, which the harness SIGKILLs in the middle of their batches and
//! starts again; the provider simulator injects the local run's faults; about 5% of the
//! images get their analysis job delivered twice. Then the invariants are checked and reported.
//!
//! What one run does:
//!
//! 1. Generates N distinct small images ([`crate::fault_run::make_image`]).
//! 2. Starts the emulator ([`Emulator::start`]) and creates the resources of docs/aws.md
//!    ([`crate::aws_setup`]): the table, the bucket, the S3 → SQS notification queue on
//!    `uploads/` (it stands in for Lambda's asynchronous invocation queue), and the analyze
//!    queue with its DLQ (maxReceiveCount = `SIGHTLINE_MAX_RECEIVES`, visibility = the analyze
//!    function timeout).
//! 3. Starts the simulator with the local run's fault plan ([`crate::fault_run::sim_config`]).
//! 4. Spawns `lambda-host` processes configured like the Lambdas (environment of
//!    docs/aws.md): one resize, `--analyze-hosts` analyze hosts with `--batches-per-host`
//!    concurrent batches each, one reconcile host on a short schedule.
//! 5. Uploads every image: most as S3 drops (`PutObject uploads/{tenant}/{id}.{ext}`, as
//!    another system would), `--api-share` of them through the api router in-process
//!    (`POST /v1/uploads` on [`sightline_api::app`] → presigned PUT to the emulator), so
//!    `pending` records exist too.
//! 6. Meanwhile: re-sends the job of about `--dup-rate` of the images once they are queued
//!    (the job is rebuilt from the DynamoDB record with [`job_of`]), and kills a host with
//!    SIGKILL `--kills` times, each time while that host has an invocation in flight (read from
//!    its `@@host` lines), restarting it after 0.2–2 s: about a third during the uploads (the
//!    first one the resize host, then any of the resize and analyze hosts), the rest during the
//!    analysis (an analyze host).
//! 7. Waits until every image is `done` or `failed` (or `--timeout-secs`, or no progress for
//!    `--stall-secs`), lets the queue drain for up to `--drain-secs`, stops the hosts, and
//!    collects the records, the ledger, the simulator's counts and the DLQ.
//!
//! On the moto emulator two things are the emulator's, not the pipeline's: throughput (moto
//! runs on one core and deep-copies the whole table for every TransactWriteItems, so the run
//! slows as the table grows), and isolation (a cancelled TransactWriteItems restores that copy,
//! undoing what concurrent requests wrote meanwhile; the report says so when the ledger
//! invariant fails on moto).
//!
//! Not part of the default tests; `scripts/fault-run-aws.sh` builds and runs it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sightline_core::model::{AnalysisJob, ImageRecord, ImageStatus};
use sightline_pipeline::aws::config::settings_from_lookup;
use sightline_pipeline::aws::{AwsEnv, Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_pipeline::http::hash_api_key;
use sightline_pipeline::ingest::job_of;
use sightline_pipeline::ports::{
    rfc3339, BlobStore, Clock, CostRow, Queue, QueueMessage, Repository, SystemClock,
};
use tower::ServiceExt;

use crate::emulator::{self, Emulator};
use crate::fault_run::{
    backoff, billed_calls, count_by, failure_kind, lock, make_image, sim_config, simulator_rows,
    Invariant, Options, TestImage, MODEL,
};
use crate::sim::{is_poison, SimConfig, SimServer, SimStats};

/// Tenant of the images uploaded through the api router.
const API_TENANT: &str = "api";
/// The api key of [`API_TENANT`].
const API_KEY: &str = "fault-run-aws-key";
/// Upload prefix (the default of the functions).
const UPLOAD_PREFIX: &str = "uploads/";
/// Prefix of the host's machine-readable lines.
const EVENT_PREFIX: &str = "@@host ";

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// Options of the AWS target (`fault-run --target aws`); the fault plan, image count, kills,
/// seed, RPM, uploaders, provider timeout and waits are the local run's options.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "AWS target (--target aws)")]
pub struct AwsOptions {
    /// The `lambda-host` binary.
    #[arg(
        long,
        env = "LAMBDA_HOST_BIN",
        default_value = "target/release/lambda-host"
    )]
    pub lambda_host: PathBuf,
    /// Analyze host processes (each one an event source poller + Lambda instances).
    #[arg(long, default_value_t = 2)]
    pub analyze_hosts: usize,
    /// Concurrent batches per analyze host (concurrent Lambda instances).
    #[arg(long, default_value_t = 2)]
    pub batches_per_host: usize,
    /// The analyze function timeout; also the analyze queue's visibility timeout.
    #[arg(long, default_value_t = 180)]
    pub function_timeout_secs: u64,
    /// The resize function timeout; also the notification queue's visibility timeout.
    #[arg(long, default_value_t = 30)]
    pub resize_timeout_secs: u64,
    /// Concurrent events of the resize host.
    #[arg(long, default_value_t = 2)]
    pub resize_concurrency: usize,
    /// Fraction of the images uploaded through the api router (presigned PUT) instead of
    /// dropped into S3 directly.
    #[arg(long, default_value_t = 0.3)]
    pub api_share: f64,
    /// Tenants the S3 drops are spread over (`uploads/t0/…`, `uploads/t1/…`, …).
    #[arg(long, default_value_t = 3)]
    pub tenants: usize,
    /// Period of the reconcile host's scheduled invocations.
    #[arg(long, default_value_t = 5)]
    pub reconcile_every_secs: u64,
    /// SIGHTLINE_RECONCILE_AFTER_SECS of the functions.
    #[arg(long, default_value_t = 5)]
    pub reconcile_after_secs: u64,
    /// SIGHTLINE_STUCK_AFTER_SECS of the functions.
    #[arg(long, default_value_t = 60)]
    pub stuck_after_secs: u64,
    /// The analyze queue's maxReceiveCount (SIGHTLINE_MAX_RECEIVES).
    #[arg(long, default_value_t = 5)]
    pub max_receives: u32,
    /// Once every image is final, wait up to this long for the analyze queue to empty and the
    /// hosts to go idle before stopping them.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
}

impl AwsOptions {
    fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.api_share) {
            bail!("--api-share must be in [0, 1]");
        }
        if self.analyze_hosts == 0 || self.batches_per_host == 0 || self.tenants == 0 {
            bail!("--analyze-hosts, --batches-per-host and --tenants must be ≥ 1");
        }
        if self.max_receives == 0 {
            bail!("--max-receives must be ≥ 1");
        }
        Ok(())
    }
}

fn image_count(o: &Options) -> usize {
    o.images.unwrap_or(if o.quick { 100 } else { 1000 })
}

// ---------------------------------------------------------------------------------------------
// Host processes
// ---------------------------------------------------------------------------------------------

/// What one started process reported so far.
#[derive(Debug, Default)]
struct Incarnation {
    ready: AtomicBool,
    /// Records of invocations started and not ended.
    in_flight_records: AtomicI64,
    /// Invocations started and not ended.
    in_flight_invocations: AtomicI64,
    fatal: Mutex<Option<String>>,
}

/// One `lambda-host` process, restartable.
struct Host {
    name: String,
    role: &'static str,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Mutex<Option<Child>>,
    current: Mutex<Arc<Incarnation>>,
    /// Sums over the `end` lines of every incarnation (see [`Host::account`]).
    totals: Arc<Mutex<BTreeMap<String, f64>>>,
    starts: AtomicUsize,
    closed: AtomicBool,
    /// Where the images its `end` lines report as queued go (the resize host's).
    queued_tx: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
}

impl Host {
    fn new(
        name: String,
        role: &'static str,
        bin: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Host {
        Host {
            name,
            role,
            bin,
            args,
            env,
            log,
            child: Mutex::new(None),
            current: Mutex::new(Arc::new(Incarnation::default())),
            totals: Arc::new(Mutex::new(BTreeMap::new())),
            starts: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            queued_tx: None,
        }
    }

    fn incarnation(&self) -> Arc<Incarnation> {
        lock(&self.current).clone()
    }

    /// Spawn a new incarnation and a thread that copies its stdout into the log and reads its
    /// `@@host` lines.
    fn spawn(&self) -> anyhow::Result<()> {
        let mut slot = lock(&self.child);
        if self.closed.load(Ordering::SeqCst) {
            bail!("{} is shut down", self.name);
        }
        let n = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(log, "===== fault-run-aws: {} start #{n} =====", self.name)?;
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("SIGHTLINE_")
                || k.starts_with("OPENAI_")
                || k.starts_with("AWS_")
                || k == "RUST_LOG"
            {
                cmd.env_remove(k);
            }
        }
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.try_clone()?));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let inc = Arc::new(Incarnation::default());
        *lock(&self.current) = inc.clone();
        let totals = self.totals.clone();
        let queued_tx = self.queued_tx.clone();
        std::thread::spawn(move || {
            let mut log = log;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Some(ev) = line
                    .strip_prefix(EVENT_PREFIX)
                    .and_then(|j| serde_json::from_str::<Value>(j).ok())
                {
                    Host::account(&inc, &totals, &ev);
                    if let (Some(tx), Some(queued)) =
                        (&queued_tx, ev.get("queued").and_then(Value::as_array))
                    {
                        for q in queued {
                            if let (Some(t), Some(id)) = (
                                q.get(0).and_then(Value::as_str),
                                q.get(1).and_then(Value::as_str),
                            ) {
                                let _ = tx.send((t.to_string(), id.to_string()));
                            }
                        }
                    }
                }
            }
        });
        *slot = Some(child);
        Ok(())
    }

    /// Book one `@@host` line.
    fn account(inc: &Incarnation, totals: &Mutex<BTreeMap<String, f64>>, ev: &Value) {
        let records = ev.get("records").and_then(Value::as_i64).unwrap_or(0);
        let mut t = lock(totals);
        match ev.get("ev").and_then(Value::as_str).unwrap_or("") {
            "ready" => inc.ready.store(true, Ordering::SeqCst),
            "start" => {
                inc.in_flight_records.fetch_add(records, Ordering::SeqCst);
                inc.in_flight_invocations.fetch_add(1, Ordering::SeqCst);
                *t.entry("started".into()).or_default() += 1.0;
            }
            "end" => {
                inc.in_flight_records.fetch_sub(records, Ordering::SeqCst);
                inc.in_flight_invocations.fetch_sub(1, Ordering::SeqCst);
                *t.entry("invocations".into()).or_default() += 1.0;
                if let Some(r) = ev.get("result").and_then(Value::as_str) {
                    *t.entry(format!("result_{r}")).or_default() += 1.0;
                }
                let mut add = |prefix: &str, obj: &serde_json::Map<String, Value>| {
                    for (k, v) in obj {
                        if matches!(k.as_str(), "inv" | "attempt") {
                            continue;
                        }
                        if let Some(x) = v.as_f64() {
                            *t.entry(format!("{prefix}{k}")).or_default() += x;
                        } else if let Some(true) = v.as_bool() {
                            *t.entry(format!("{prefix}{k}")).or_default() += 1.0;
                        }
                    }
                };
                if let Some(obj) = ev.as_object() {
                    add("", obj);
                }
                if let Some(run) = ev.get("run").and_then(Value::as_object) {
                    add("reconcile_", run);
                }
            }
            "fatal" => {
                *lock(&inc.fatal) = ev.get("error").and_then(Value::as_str).map(str::to_string);
            }
            other => *t.entry(format!("event_{other}")).or_default() += 1.0,
        }
    }

    /// Start and wait for the `ready` line (the process built its clients and handler).
    async fn start(&self) -> anyhow::Result<Duration> {
        let began = Instant::now();
        self.spawn()?;
        let inc = self.incarnation();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if inc.ready.load(Ordering::SeqCst) {
                return Ok(began.elapsed());
            }
            let exited = {
                let mut g = lock(&self.child);
                match g.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(status))) => Some(status),
                    _ => None,
                }
            };
            if let Some(status) = exited {
                let why = lock(&inc.fatal).clone().unwrap_or_default();
                bail!(
                    "{} exited during start ({status}) {why}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "{} did not report ready in 60 s; see {}",
            self.name,
            self.log.display()
        )
    }

    /// SIGKILL (std's `Child::kill` on unix) and reap; what was in flight at that moment.
    fn kill(&self) -> Option<(i64, i64)> {
        let mut g = lock(&self.child);
        let mut child = g.take()?;
        let inc = self.incarnation();
        let in_flight = (
            inc.in_flight_records.load(Ordering::SeqCst),
            inc.in_flight_invocations.load(Ordering::SeqCst),
        );
        let _ = child.kill();
        let _ = child.wait();
        Some(in_flight)
    }

    fn shutdown(&self) -> Option<(i64, i64)> {
        self.closed.store(true, Ordering::SeqCst);
        self.kill()
    }

    fn exited(&self) -> Option<String> {
        let mut g = lock(&self.child);
        match g.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(format!(
                "{} exited ({status}) {}",
                self.name,
                lock(&self.incarnation().fatal).clone().unwrap_or_default()
            )),
            _ => None,
        }
    }

    fn totals(&self) -> BTreeMap<String, f64> {
        lock(&self.totals).clone()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------------------------
// Run state
// ---------------------------------------------------------------------------------------------

/// One logical image of the run.
#[derive(Debug, Clone, Default)]
struct Img {
    tenant: String,
    /// Known at once for S3 drops, from the POST answer for api uploads.
    image_id: Option<String>,
    key: Option<String>,
    via_api: bool,
    /// The upload was accepted (PutObject or presigned PUT answered 2xx).
    confirmed: bool,
    error: Option<String>,
    /// Chosen for a duplicate delivery, and whether it was sent.
    dup_planned: bool,
    dup_sent: bool,
}

#[derive(Debug, Default)]
struct Counters {
    s3_puts: AtomicU64,
    s3_put_retries: AtomicU64,
    api_posts: AtomicU64,
    api_post_retries: AtomicU64,
    presigned_puts: AtomicU64,
    presigned_put_retries: AtomicU64,
    confirmed: AtomicUsize,
    upload_failures: AtomicU64,
    dup_sent: AtomicU64,
    /// Duplicates sent when the image was final already.
    dup_late: AtomicU64,
    dup_errors: AtomicU64,
    monitor_errors: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
struct KillEvent {
    n: usize,
    host: String,
    at_s: f64,
    phase: &'static str,
    /// The host had an invocation in flight when it was killed.
    mid_batch: bool,
    in_flight_records: i64,
    in_flight_invocations: i64,
    /// Provider calls that may have been in flight: min(records, invocations × the handler's
    /// per-invocation concurrency) for an analyze host, 0 otherwise.
    call_bound: u64,
    uploaded: usize,
    final_images: u64,
    down_ms: u64,
    ready_after_ms: u64,
}

#[derive(Debug, Clone)]
struct Progress {
    final_images: u64,
    records: usize,
    by_status: BTreeMap<String, u64>,
    sim_requests: u64,
    last_change: Instant,
    last_final: Instant,
}

struct Run {
    n: usize,
    kills_planned: usize,
    images: Vec<TestImage>,
    state: Vec<Mutex<Img>>,
    counters: Counters,
    started: Instant,
    uploads_done: AtomicBool,
    stop: AtomicBool,
    progress: Mutex<Progress>,
    kills: Mutex<Vec<KillEvent>>,
    resize: Host,
    analyze: Vec<Host>,
    reconcile: Host,
    sim: SimServer,
    repo: Arc<DynamoRepository>,
    blobs: Arc<S3BlobStore>,
    analyze_q: SqsQueue,
    app: axum::Router,
    http: reqwest::Client,
    tenants: Vec<String>,
    /// Provider calls one analyze invocation may have in flight.
    per_invocation_calls: u64,
}

impl Run {
    fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn hosts(&self) -> impl Iterator<Item = &Host> {
        std::iter::once(&self.resize)
            .chain(self.analyze.iter())
            .chain(std::iter::once(&self.reconcile))
    }

    fn final_count(&self) -> u64 {
        lock(&self.progress).final_images
    }
}

// ---------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------

fn ext_of(filename: &str) -> &str {
    filename.rsplit_once('.').map(|(_, e)| e).unwrap_or("png")
}

fn stem_of(filename: &str) -> &str {
    filename
        .rsplit_once('.')
        .map(|(s, _)| s)
        .unwrap_or(filename)
}

/// An S3 drop: PutObject under the upload prefix, as another system would.
async fn drop_into_s3(run: &Run, idx: usize, rng: &mut StdRng) -> anyhow::Result<()> {
    let img = &run.images[idx];
    let key = {
        let st = lock(&run.state[idx]);
        format!(
            "{UPLOAD_PREFIX}{}/{}.{}",
            st.tenant,
            stem_of(&img.filename),
            ext_of(&img.filename)
        )
    };
    lock(&run.state[idx]).key = Some(key.clone());
    let mut attempt = 0u32;
    loop {
        run.counters.s3_puts.fetch_add(1, Ordering::Relaxed);
        match run
            .blobs
            .put(&key, img.bytes.clone(), img.content_type)
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= 8 => bail!("PutObject {key}: {e}"),
            Err(_) => {
                attempt += 1;
                run.counters.s3_put_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff(attempt, rng)).await;
            }
        }
    }
}

/// `POST /v1/uploads` on the api router in-process (as API Gateway would invoke the api
/// Lambda), then PUT the bytes to the presigned URL on the emulator.
async fn upload_via_api(run: &Run, idx: usize, rng: &mut StdRng) -> anyhow::Result<()> {
    let img = &run.images[idx];
    let body = json!({
        "filename": img.filename,
        "content_type": img.content_type,
        "content_length": img.bytes.len(),
    })
    .to_string();
    let mut attempt = 0u32;
    let grant = loop {
        run.counters.api_posts.fetch_add(1, Ordering::Relaxed);
        let req = axum::http::Request::builder()
            .method("POST")
            .uri("/v1/uploads")
            .header("x-api-key", API_KEY)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.clone()))?;
        let resp = run.app.clone().oneshot(req).await?;
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await?;
        if status == 201 {
            break serde_json::from_slice::<Value>(&bytes)?;
        }
        if (status < 500 && status != 429) || attempt >= 8 {
            bail!(
                "POST /v1/uploads: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        attempt += 1;
        run.counters
            .api_post_retries
            .fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff(attempt, rng)).await;
    };
    let s = |p: &str| grant.pointer(p).and_then(Value::as_str).map(str::to_string);
    let (Some(image_id), Some(key), Some(url)) = (s("/image_id"), s("/key"), s("/upload/url"))
    else {
        bail!("POST /v1/uploads answered without image_id/key/upload.url: {grant}");
    };
    {
        let mut st = lock(&run.state[idx]);
        st.image_id = Some(image_id);
        st.key = Some(key);
    }
    let headers: Vec<(String, String)> = grant
        .pointer("/upload/headers")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("content-length"))
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let mut attempt = 0u32;
    loop {
        run.counters.presigned_puts.fetch_add(1, Ordering::Relaxed);
        let mut req = run.http.put(&url).body(img.bytes.clone());
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        let status = match req.send().await {
            Ok(r) => {
                let st = r.status().as_u16();
                r.bytes().await.ok().map(|_| st)
            }
            Err(_) => None,
        };
        match status {
            Some(s) if (200..300).contains(&s) => return Ok(()),
            Some(s) if s < 500 && s != 429 => bail!("presigned PUT: HTTP {s}"),
            _ if attempt >= 8 => bail!("presigned PUT: no success after {attempt} retries"),
            _ => {}
        }
        attempt += 1;
        run.counters
            .presigned_put_retries
            .fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff(attempt, rng)).await;
    }
}

async fn uploader(run: Arc<Run>, order: Arc<Vec<usize>>, next: Arc<AtomicUsize>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        if run.stop.load(Ordering::Relaxed) {
            return;
        }
        let k = next.fetch_add(1, Ordering::Relaxed);
        let Some(&idx) = order.get(k) else { return };
        let via_api = lock(&run.state[idx]).via_api;
        let r = if via_api {
            upload_via_api(&run, idx, &mut rng).await
        } else {
            drop_into_s3(&run, idx, &mut rng).await
        };
        match r {
            Ok(()) => {
                lock(&run.state[idx]).confirmed = true;
                run.counters.confirmed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                run.counters.upload_failures.fetch_add(1, Ordering::Relaxed);
                lock(&run.state[idx]).error = Some(format!("{e:#}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the table
// ---------------------------------------------------------------------------------------------

/// Every image record of the run's tenants (Query gsi1 per tenant, all pages).
async fn list_records(run: &Run) -> anyhow::Result<Vec<ImageRecord>> {
    let mut out = Vec::new();
    for t in &run.tenants {
        let mut cursor: Option<String> = None;
        loop {
            let page = run
                .repo
                .list_images(t, None, 1000, cursor.as_deref())
                .await
                .with_context(|| format!("listing the images of {t}"))?;
            out.extend(page.images);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    Ok(out)
}

/// The ledger of the run's tenants, summed over days and models.
async fn ledger(run: &Run) -> anyhow::Result<Vec<(String, CostRow)>> {
    let mut rows = Vec::new();
    for t in &run.tenants {
        for r in run.repo.costs(t, "0000-01-01", "9999-12-31").await? {
            rows.push((t.clone(), r));
        }
    }
    Ok(rows)
}

fn is_final(r: &ImageRecord) -> bool {
    matches!(r.status, ImageStatus::Done | ImageStatus::Failed)
}

fn status_str(r: &ImageRecord) -> String {
    r.status.as_str().to_string()
}

// ---------------------------------------------------------------------------------------------
// Monitor (progress + duplicate deliveries) and killer
// ---------------------------------------------------------------------------------------------

/// Send the job of an image chosen for a duplicate delivery once more, rebuilt from its
/// record as the reconciler rebuilds it; false when the record holds no job (yet).
async fn send_duplicate(run: &Run, idx: usize, tenant: &str, id: &str) -> bool {
    {
        // Claimed first: the duplicator and the monitor never both send it.
        let mut st = lock(&run.state[idx]);
        if st.dup_sent {
            return false;
        }
        st.dup_sent = true;
    }
    let body = match run.repo.get_image(tenant, id).await {
        Ok(Some(rec)) => job_of(&rec)
            .and_then(|j| serde_json::to_string(&j).ok())
            .map(|b| (b, is_final(&rec))),
        _ => None,
    };
    let sent = match body {
        Some((body, late)) => match run.analyze_q.send(vec![body]).await {
            Ok(()) => {
                run.counters.dup_sent.fetch_add(1, Ordering::Relaxed);
                if late {
                    run.counters.dup_late.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(_) => {
                run.counters.dup_errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        },
        None => false,
    };
    if !sent {
        lock(&run.state[idx]).dup_sent = false;
    }
    sent
}

/// Duplicate deliveries: as soon as the resize host reports an image chosen for a duplicate as
/// queued, its job is sent again (the monitor catches any it missed, late).
async fn duplicator(
    run: Arc<Run>,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    let index: HashMap<(String, String), usize> = run
        .state
        .iter()
        .enumerate()
        .filter_map(|(i, st)| {
            let st = lock(st);
            Some(((st.tenant.clone(), st.image_id.clone()?), i))
        })
        .collect();
    while let Some((tenant, id)) = queued.recv().await {
        // Drops are known by key; api uploads by the id their POST returned.
        let idx = index
            .get(&(tenant.clone(), id.clone()))
            .copied()
            .or_else(|| {
                run.state.iter().position(|st| {
                    let st = lock(st);
                    st.tenant == tenant && st.image_id.as_deref() == Some(id.as_str())
                })
            });
        let Some(idx) = idx else { continue };
        let due = {
            let st = lock(&run.state[idx]);
            st.dup_planned && !st.dup_sent
        };
        if due {
            send_duplicate(&run, idx, &tenant, &id).await;
        }
    }
}

/// Every 2 s: read every record and count the final ones.
async fn monitor(run: Arc<Run>) {
    let mut last_print = Instant::now();
    while !run.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let records = match list_records(&run).await {
            Ok(r) => r,
            Err(_) => {
                run.counters.monitor_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let by_id: HashMap<(&str, &str), &ImageRecord> = records
            .iter()
            .map(|r| ((r.tenant.as_str(), r.image_id.as_str()), r))
            .collect();
        let mut final_images = 0u64;
        let mut missed: Vec<(usize, String, String)> = Vec::new();
        for (i, st) in run.state.iter().enumerate() {
            let st = lock(st);
            let Some(id) = st.image_id.as_deref() else {
                continue;
            };
            let Some(r) = by_id.get(&(st.tenant.as_str(), id)) else {
                continue;
            };
            if is_final(r) {
                final_images += 1;
            }
            if st.dup_planned && !st.dup_sent && job_of(r).is_some() {
                missed.push((i, st.tenant.clone(), id.to_string()));
            }
        }
        for (i, tenant, id) in missed {
            send_duplicate(&run, i, &tenant, &id).await;
        }
        let sim_requests = run.sim.stats().await.requests;
        let by_status = count_by(records.iter().map(status_str));
        {
            let mut p = lock(&run.progress);
            if final_images != p.final_images {
                p.last_final = Instant::now();
            }
            if final_images != p.final_images
                || sim_requests != p.sim_requests
                || records.len() != p.records
            {
                p.last_change = Instant::now();
            }
            p.final_images = final_images;
            p.records = records.len();
            p.sim_requests = sim_requests;
            p.by_status = by_status.clone();
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "fault-run-aws: {:>6.1}s  uploaded {}/{}  records {} {:?}  final {final_images}  kills {}  duplicates {}",
                run.elapsed_s(),
                run.counters.confirmed.load(Ordering::Relaxed),
                run.n,
                records.len(),
                by_status,
                lock(&run.kills).len(),
                run.counters.dup_sent.load(Ordering::Relaxed),
            );
        }
    }
}

/// Kill moments: about a third at random points of the upload (the first kill the resize
/// host, later ones any busy resize or analyze host), the rest at random points of the
/// analysis left when the upload ended (a busy analyze host); each kill waits (up to 10 s)
/// until a candidate host has an invocation in flight.
async fn killer(run: Arc<Run>, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4B11_1A55);
    let k = run.kills_planned;
    let k_upload = k.div_ceil(3).min(k);
    let mut upload_marks: Vec<f64> = (0..k_upload).map(|_| rng.gen_range(0.2..0.9)).collect();
    upload_marks.sort_by(f64::total_cmp);
    let mut analysis_marks: Vec<f64> = (k_upload..k).map(|_| rng.gen_range(0.1..0.9)).collect();
    analysis_marks.sort_by(f64::total_cmp);
    let mut upload_iter = upload_marks.into_iter().peekable();
    let mut analysis_iter = analysis_marks.into_iter().peekable();
    let mut at_upload_end: Option<u64> = None;
    let mut last_ready = Instant::now();
    let mut n = 0usize;
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
        let rested = n == 0 || last_ready.elapsed() >= Duration::from_secs(1);
        let (due, upload_phase) = if let Some(&m) = upload_iter.peek() {
            (uploaded as f64 >= m * run.n as f64 || uploads_done, true)
        } else if let Some(&m) = analysis_iter.peek() {
            let due = at_upload_end.is_some_and(|f0| {
                let remaining = (run.n as u64).saturating_sub(f0) as f64;
                final_now as f64 >= f0 as f64 + m * remaining
            });
            (due, false)
        } else {
            return Ok(());
        };
        if !(due && rested) {
            tokio::time::sleep(Duration::from_millis(if uploads_done { 50 } else { 5 })).await;
            continue;
        }
        if upload_phase {
            upload_iter.next();
        } else {
            analysis_iter.next();
        }
        // The victim: during the upload any of resize + analyze hosts, later an analyze host.
        let candidates: Vec<&Host> = if upload_phase {
            std::iter::once(&run.resize)
                .chain(run.analyze.iter())
                .collect()
        } else {
            run.analyze.iter().collect()
        };
        // The first kill always hits the resize host, so every run covers a resize killed
        // mid-event (the resize path is otherwise rarely chosen: its events are short).
        let candidates: Vec<&Host> = if n == 0 {
            vec![&run.resize]
        } else {
            candidates
        };
        // Mid-batch: one of the candidates with an invocation in flight (waiting up to 10 s
        // for one to be busy; an idle one after that).
        let wait_until = Instant::now() + Duration::from_secs(10);
        let host = loop {
            let busy: Vec<&Host> = candidates
                .iter()
                .copied()
                .filter(|h| h.incarnation().in_flight_records.load(Ordering::SeqCst) > 0)
                .collect();
            if !busy.is_empty() {
                break busy[rng.gen_range(0..busy.len())];
            }
            if Instant::now() >= wait_until || run.stop.load(Ordering::Relaxed) {
                break candidates[rng.gen_range(0..candidates.len())];
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        // A random moment inside the batch.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
        if run.stop.load(Ordering::Relaxed) {
            return Ok(());
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
        let (records, invocations) = host.kill().unwrap_or((0, 0));
        let call_bound = if host.role == "analyze" {
            (records.max(0) as u64).min(invocations.max(0) as u64 * run.per_invocation_calls)
        } else {
            0
        };
        let down = Duration::from_millis(rng.gen_range(200..=2000));
        eprintln!(
            "fault-run-aws: {at_s:>6.1}s  SIGKILL #{n} {} ({phase}: {records} records in {invocations} invocations in flight; uploaded {uploaded}, final {final_images}); restarting in {} ms",
            host.name,
            down.as_millis()
        );
        tokio::time::sleep(down).await;
        let ready = host.start().await?;
        last_ready = Instant::now();
        lock(&run.kills).push(KillEvent {
            n,
            host: host.name.clone(),
            at_s,
            phase,
            mid_batch: records > 0,
            in_flight_records: records,
            in_flight_invocations: invocations,
            call_bound,
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

/// What the harness needs of the emulator stack.
struct Stack {
    bucket: String,
    table: String,
    notify_url: String,
    analyze_url: String,
    dlq_url: String,
}

async fn create_stack(clients: &Clients, o: &Options) -> anyhow::Result<Stack> {
    let a = &o.aws;
    let bucket = crate::contract::unique("fault-run-");
    let table = crate::contract::unique("fault-run-");
    crate::aws_setup::create_bucket(&clients.s3, &bucket).await?;
    crate::aws_setup::create_table(&clients.dynamodb, &table).await?;
    let notify_url = crate::aws_setup::create_queue(
        &clients.sqs,
        &crate::contract::unique("fault-run-notify-"),
        Duration::from_secs(a.resize_timeout_secs),
    )
    .await?;
    let notify_arn = crate::aws_setup::queue_arn(&clients.sqs, &notify_url).await?;
    crate::aws_setup::notify_queue_on_prefix(&clients.s3, &bucket, &notify_arn, UPLOAD_PREFIX)
        .await?;
    let (analyze_url, dlq_url) = crate::aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &crate::contract::unique("fault-run-analyze-"),
        Duration::from_secs(a.function_timeout_secs),
        a.max_receives,
    )
    .await?;
    Ok(Stack {
        bucket,
        table,
        notify_url,
        analyze_url,
        dlq_url,
    })
}

/// The functions' environment (docs/aws.md) plus the host's own variables.
fn function_env(
    o: &Options,
    emu: &Emulator,
    stack: &Stack,
    sim: &SimServer,
    sim_key: &str,
    work_dir: &Path,
) -> Vec<(String, String)> {
    let a = &o.aws;
    // Per-record outcomes of the analyze handler and the reconciler's runs are logged (info);
    // the rest at warn.
    let log = std::env::var("FAULT_RUN_LOG")
        .unwrap_or_else(|_| "warn,sightline_analyze=info,sightline_reconcile=info".into());
    // Empty shared config files: nothing of the user's ~/.aws applies.
    let none = work_dir.join("empty-aws-config");
    let _ = std::fs::write(&none, "");
    [
        ("AWS_ENDPOINT_URL", emu.endpoint.clone()),
        ("AWS_REGION", emulator::REGION.to_string()),
        ("AWS_ACCESS_KEY_ID", emulator::ACCESS_KEY_ID.to_string()),
        (
            "AWS_SECRET_ACCESS_KEY",
            emulator::SECRET_ACCESS_KEY.to_string(),
        ),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_CONFIG_FILE", none.display().to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", none.display().to_string()),
        ("SIGHTLINE_BUCKET", stack.bucket.clone()),
        ("SIGHTLINE_TABLE", stack.table.clone()),
        ("SIGHTLINE_QUEUE_URL", stack.analyze_url.clone()),
        ("SIGHTLINE_NOTIFY_QUEUE_URL", stack.notify_url.clone()),
        ("SIGHTLINE_PROVIDER", "openai".to_string()),
        ("OPENAI_API_KEY", sim_key.to_string()),
        ("OPENAI_BASE_URL", sim.base_url.clone()),
        ("SIGHTLINE_MODEL", MODEL.to_string()),
        ("SIGHTLINE_RPM", o.rpm.to_string()),
        ("SIGHTLINE_TPM", "0".to_string()),
        // The analyze hosts share the global limits (SQS MaximumConcurrency); the batches of
        // one host share its limiter.
        ("SIGHTLINE_MAX_CONCURRENCY", a.analyze_hosts.to_string()),
        ("SIGHTLINE_MAX_RECEIVES", a.max_receives.to_string()),
        (
            "SIGHTLINE_TIMEOUT_SECS",
            o.provider_timeout_secs.to_string(),
        ),
        (
            "SIGHTLINE_RECONCILE_EVERY_SECS",
            a.reconcile_every_secs.to_string(),
        ),
        (
            "SIGHTLINE_RECONCILE_AFTER_SECS",
            a.reconcile_after_secs.to_string(),
        ),
        ("SIGHTLINE_STUCK_AFTER_SECS", a.stuck_after_secs.to_string()),
        ("RUST_LOG", log),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Run the whole thing; `Ok(true)` when every invariant held.
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    let a = opts.aws.clone();
    a.validate()?;
    let n = image_count(&opts);
    if n == 0 || n > 1 << 25 {
        bail!("--images must be 1..={}", 1 << 25);
    }
    if !(0.0..=1.0).contains(&opts.dup_rate) || opts.rpm == 0 || opts.uploaders == 0 {
        bail!("--dup-rate must be in [0, 1], --rpm and --uploaders ≥ 1");
    }
    let sim_cfg = sim_config(&opts);
    sim_cfg
        .validate()
        .map_err(|e| anyhow::anyhow!("fault plan: {e}"))?;
    let kills_planned = opts.kill_count();
    let bin = std::fs::canonicalize(&a.lambda_host).with_context(|| {
        format!(
            "{} not found: build it with `cargo build --release -p sightline-tests --bin lambda-host` or pass --lambda-host",
            a.lambda_host.display()
        )
    })?;
    // The local run's default work dir belongs to the local run.
    let work_dir = if opts.work_dir == Path::new("target/fault-run") {
        PathBuf::from("target/fault-run-aws")
    } else {
        opts.work_dir.clone()
    };
    std::fs::create_dir_all(&work_dir)?;
    let work_dir = std::fs::canonicalize(&work_dir)?;
    let logs = work_dir.join("logs");
    if logs.exists() {
        std::fs::remove_dir_all(&logs)?;
    }
    std::fs::create_dir_all(&logs)?;

    eprintln!("fault-run-aws: generating {n} images…");
    let images: Vec<TestImage> =
        tokio::task::spawn_blocking(move || (0..n).map(make_image).collect::<Vec<_>>()).await?;
    let distinct: BTreeSet<String> = images
        .iter()
        .map(|i| hex::encode(Sha256::digest(&i.bytes)))
        .collect();
    if distinct.len() != n {
        bail!(
            "generated images are not distinct ({} of {n})",
            distinct.len()
        );
    }
    let input_bytes: u64 = images.iter().map(|i| i.bytes.len() as u64).sum();

    eprintln!("fault-run-aws: starting the emulator…");
    let emu = Emulator::start().await?;
    let emulator_is_moto = emu.flavor == emulator::Flavor::Moto;
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));
    let stack = create_stack(&clients, &opts).await?;
    let sim = SimServer::start(sim_cfg.clone()).await?;
    let env = function_env(&opts, &emu, &stack, &sim, &sim_cfg.api_key, &work_dir);

    // The api Lambda's router, in-process, over the same environment as the functions.
    let lookup_env = env.clone();
    let lookup = move |k: &str| {
        lookup_env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let aws_env = AwsEnv::from_lookup(&lookup)?;
    let api_settings = settings_from_lookup(&lookup)?;
    let app = sightline_api::app(sightline_api::api_state(&aws_env, &clients, api_settings));
    let repo = Arc::new(DynamoRepository::new(
        clients.dynamodb.clone(),
        &stack.table,
    ));
    repo.add_api_key(
        &hash_api_key(API_KEY),
        API_TENANT,
        &rfc3339(SystemClock.now_ms()),
    )
    .await?;

    // Hosts.
    let host = |name: String, role: &'static str, args: Vec<String>| {
        Host::new(
            name.clone(),
            role,
            bin.clone(),
            args,
            env.clone(),
            logs.join(format!("{name}.log")),
        )
    };
    let (queued_tx, queued_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut resize = host(
        "resize".into(),
        "resize",
        vec![
            "--role".into(),
            "resize".into(),
            "--concurrency".into(),
            a.resize_concurrency.to_string(),
            "--function-timeout-secs".into(),
            a.resize_timeout_secs.to_string(),
        ],
    );
    resize.queued_tx = Some(queued_tx);
    let analyze: Vec<Host> = (0..a.analyze_hosts)
        .map(|i| {
            host(
                format!("analyze-{}", i + 1),
                "analyze",
                vec![
                    "--role".into(),
                    "analyze".into(),
                    "--concurrency".into(),
                    a.batches_per_host.to_string(),
                    "--function-timeout-secs".into(),
                    a.function_timeout_secs.to_string(),
                ],
            )
        })
        .collect();
    let reconcile = host(
        "reconcile".into(),
        "reconcile",
        vec!["--role".into(), "reconcile".into()],
    );
    resize.start().await?;
    for h in &analyze {
        h.start().await?;
    }
    reconcile.start().await?;
    eprintln!(
        "fault-run-aws: emulator {} (table {}, bucket {}), simulator {}; hosts: resize, {} analyze × {} batches, reconcile every {} s; {n} images ({:.0}% via the api), {kills_planned} kills, seed {}; logs in {}",
        emu.endpoint,
        stack.table,
        stack.bucket,
        sim.base_url,
        a.analyze_hosts,
        a.batches_per_host,
        a.reconcile_every_secs,
        a.api_share * 100.0,
        opts.seed,
        logs.display()
    );

    // Image plan: tenant, api or drop, duplicate or not.
    let mut plan_rng = StdRng::seed_from_u64(opts.seed ^ 0xA175_0000);
    let drop_tenants: Vec<String> = (0..a.tenants).map(|t| format!("t{t}")).collect();
    let state: Vec<Mutex<Img>> = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let via_api = plan_rng.gen_bool(a.api_share);
            let dup_planned = plan_rng.gen_bool(opts.dup_rate);
            let tenant = if via_api {
                API_TENANT.to_string()
            } else {
                drop_tenants[i % drop_tenants.len()].clone()
            };
            let image_id = (!via_api).then(|| stem_of(&img.filename).to_string());
            Mutex::new(Img {
                tenant,
                image_id,
                via_api,
                dup_planned,
                ..Img::default()
            })
        })
        .collect();
    let mut tenants = drop_tenants.clone();
    tenants.push(API_TENANT.to_string());

    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &stack.bucket));
    let analyze_q = SqsQueue::new(clients.sqs.clone(), &stack.analyze_url);
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .build()?;
    let run = Arc::new(Run {
        n,
        kills_planned,
        images,
        state,
        counters: Counters::default(),
        started: Instant::now(),
        uploads_done: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        progress: Mutex::new(Progress {
            final_images: 0,
            records: 0,
            by_status: BTreeMap::new(),
            sim_requests: 0,
            last_change: Instant::now(),
            last_final: Instant::now(),
        }),
        kills: Mutex::new(Vec::new()),
        resize,
        analyze,
        reconcile,
        sim,
        repo: repo.clone(),
        blobs,
        analyze_q,
        app,
        http,
        tenants,
        per_invocation_calls: sightline_analyze::DEFAULT_CONCURRENCY as u64,
    });

    // Ctrl-C: never leave a host behind (the emulator container is removed when dropped).
    let emu_slot = Arc::new(Mutex::new(Some(emu)));
    {
        let run = run.clone();
        let emu_slot = emu_slot.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                run.stop.store(true, Ordering::Relaxed);
                for h in run.hosts() {
                    h.shutdown();
                }
                drop(lock(&emu_slot).take());
                eprintln!("fault-run-aws: interrupted; hosts stopped");
                tokio::time::sleep(Duration::from_secs(2)).await;
                std::process::exit(130);
            }
        });
    }

    let monitor_task = tokio::spawn(monitor(run.clone()));
    let duplicator_task = tokio::spawn(duplicator(run.clone(), queued_rx));
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
    for u in uploaders {
        let _ = u.await;
    }
    let upload_s = run.elapsed_s();
    run.uploads_done.store(true, Ordering::Relaxed);
    lock(&run.progress).last_change = Instant::now();
    eprintln!(
        "fault-run-aws: {upload_s:>6.1}s  uploads finished: {} confirmed, {} failed",
        run.counters.confirmed.load(Ordering::Relaxed),
        run.counters.upload_failures.load(Ordering::Relaxed)
    );

    // Wait: every image final and the planned kills done (or abandoned), or time out.
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
            wait_end_reason = "a host did not restart";
            eprintln!("fault-run-aws: {e:#}");
            break;
        }
        if let Some(why) = run.hosts().find_map(Host::exited) {
            wait_end_reason = "a host exited";
            eprintln!("fault-run-aws: {why}");
            break;
        }
        if Instant::now() >= deadline {
            wait_end_reason = "timeout";
            break;
        }
        if lock(&run.progress).last_change.elapsed() >= Duration::from_secs(opts.stall_secs) {
            wait_end_reason = "stalled";
            break;
        }
        let all_final = run.final_count() as usize >= run.n;
        if all_final && final_at.is_none() {
            final_at = Some(
                lock(&run.progress)
                    .last_final
                    .duration_since(run.started)
                    .as_secs_f64(),
            );
        }
        if all_final && killer_task.is_none() {
            break;
        }
        if all_final {
            // The remaining kill marks can no longer be reached: stop the killer.
            run.stop.store(true, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    run.stop.store(true, Ordering::Relaxed);
    if let Some(t) = killer_task.take() {
        match tokio::time::timeout(Duration::from_secs(90), t).await {
            Ok(r) => killer_result = Some(r.unwrap_or_else(|e| Err(e.into()))),
            Err(_) => eprintln!("fault-run-aws: the killer did not stop"),
        }
    }
    monitor_task.abort();
    duplicator_task.abort();
    let wall_s = final_at.unwrap_or_else(|| {
        lock(&run.progress)
            .last_final
            .saturating_duration_since(run.started)
            .as_secs_f64()
    });

    // Drain: the analyze queue empty and no invocation in flight, then stop the hosts.
    let drain_began = Instant::now();
    let mut drained = false;
    while drain_began.elapsed() < Duration::from_secs(a.drain_secs) {
        let depth = crate::aws_setup::queue_depth(&clients.sqs, &stack.analyze_url)
            .await
            .unwrap_or(u64::MAX);
        let busy: i64 = run
            .analyze
            .iter()
            .map(|h| h.incarnation().in_flight_records.load(Ordering::SeqCst))
            .sum();
        if depth == 0 && busy <= 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut shutdown_calls = 0u64;
    let mut shutdown_in_flight = 0i64;
    for h in run.hosts() {
        if let Some((records, invocations)) = h.shutdown() {
            shutdown_in_flight += records.max(0);
            if h.role == "analyze" {
                shutdown_calls += (records.max(0) as u64)
                    .min(invocations.max(0) as u64 * run.per_invocation_calls);
            }
        }
    }
    eprintln!(
        "fault-run-aws: {:>6.1}s  waiting ended: {wait_end_reason} (last image final at {wall_s:.1}s); queue drained: {drained}; collecting",
        run.elapsed_s()
    );

    // Collect (the hosts are stopped: nothing changes any more).
    let records = list_records(&run).await?;
    let ledger_rows = ledger(&run).await?;
    let stats = run.sim.stats().await;
    let dlq = drain_dlq(&clients, &stack.dlq_url).await?;
    let depth_left = crate::aws_setup::queue_depth(&clients.sqs, &stack.analyze_url)
        .await
        .ok();
    let notify_left = crate::aws_setup::queue_depth(&clients.sqs, &stack.notify_url)
        .await
        .ok();
    let host_totals: BTreeMap<String, BTreeMap<String, f64>> = run
        .hosts()
        .map(|h| {
            let mut t = h.totals();
            t.insert("starts".into(), h.starts.load(Ordering::SeqCst) as f64);
            (h.name.clone(), t)
        })
        .collect();

    let inputs = Inputs {
        opts: &opts,
        n,
        kills_planned,
        records: &records,
        ledger: &ledger_rows,
        stats: &stats,
        state: &run.state,
        counters: &run.counters,
        kills: lock(&run.kills).clone(),
        upload_s,
        wall_s,
        wait_end_reason,
        drained,
        depth_left,
        notify_left,
        shutdown_calls,
        shutdown_in_flight,
        dlq: &dlq,
        host_totals: &host_totals,
        input_bytes,
        sim_cfg: &sim_cfg,
        logs: &logs,
        per_invocation_calls: run.per_invocation_calls,
        emulator_is_moto,
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
        eprintln!("fault-run-aws: report written to {}", p.display());
    } else {
        eprintln!(
            "fault-run-aws: report written to {}",
            default_report.display()
        );
    }
    if let Some(Err(e)) = killer_result {
        eprintln!("fault-run-aws: killer: {e:#}");
    }
    drop(lock(&emu_slot).take());
    Ok(report.passed)
}

/// Every message of the DLQ (received with a long visibility, so each is read once).
async fn drain_dlq(clients: &Clients, url: &str) -> anyhow::Result<Vec<QueueMessage>> {
    let q = SqsQueue::new(clients.sqs.clone(), url).with_wait(Duration::from_secs(1));
    let mut out = Vec::new();
    let mut empty = 0;
    while empty < 2 {
        let got = q.receive(10, Duration::from_secs(3600)).await?;
        if got.is_empty() {
            empty += 1;
        }
        out.extend(got);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Invariants and report
// ---------------------------------------------------------------------------------------------

struct Inputs<'a> {
    opts: &'a Options,
    n: usize,
    kills_planned: usize,
    records: &'a [ImageRecord],
    ledger: &'a [(String, CostRow)],
    stats: &'a SimStats,
    state: &'a [Mutex<Img>],
    counters: &'a Counters,
    kills: Vec<KillEvent>,
    upload_s: f64,
    wall_s: f64,
    wait_end_reason: &'static str,
    drained: bool,
    depth_left: Option<u64>,
    notify_left: Option<u64>,
    shutdown_calls: u64,
    shutdown_in_flight: i64,
    dlq: &'a [QueueMessage],
    host_totals: &'a BTreeMap<String, BTreeMap<String, f64>>,
    input_bytes: u64,
    sim_cfg: &'a SimConfig,
    logs: &'a Path,
    per_invocation_calls: u64,
    emulator_is_moto: bool,
}

struct Report {
    passed: bool,
    table: String,
    json: Value,
}

/// Ledger totals over every tenant, day and model.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct LedgerTotals {
    images: u64,
    cached_images: u64,
    calls: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
    estimated_cost_usd: f64,
    calls_at_estimate: u64,
    cost_at_estimate_usd: f64,
}

fn ledger_totals(rows: &[(String, CostRow)]) -> LedgerTotals {
    let mut t = LedgerTotals::default();
    for (_, r) in rows {
        t.images += r.images;
        t.cached_images += r.cached_images;
        t.calls += r.calls;
        t.input_tokens += r.input_tokens;
        t.output_tokens += r.output_tokens;
        t.cost_usd += r.cost_usd;
        t.estimated_cost_usd += r.estimated_cost_usd;
        t.calls_at_estimate += r.calls_at_estimate;
        t.cost_at_estimate_usd += r.cost_at_estimate_usd;
    }
    t
}

/// Paid provider calls booked with a record: its paid result's calls and its extra spend.
fn booked_calls(r: &ImageRecord) -> u64 {
    let result = r
        .result
        .as_ref()
        .filter(|x| !x.cached)
        .map(|x| u64::from(x.calls))
        .unwrap_or(0);
    result + r.extra_spend.map(|e| e.calls).unwrap_or(0)
}

/// WARN/ERROR lines of the host logs, counted by `LEVEL target: message` (fields cut).
fn log_summary(dir: &Path) -> (u64, u64, Vec<(String, u64)>) {
    let (mut warns, mut errors) = (0u64, 0u64);
    let mut by_msg: BTreeMap<String, u64> = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (0, 0, Vec::new());
    };
    for e in rd.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for line in text.lines() {
            let t = line.trim_start();
            let level = if t.starts_with("WARN ") {
                warns += 1;
                "WARN"
            } else if t.starts_with("ERROR ") {
                errors += 1;
                "ERROR"
            } else {
                continue;
            };
            let msg: String = t[level.len()..]
                .split_whitespace()
                .take_while(|w| !w.contains('='))
                .take(12)
                .collect::<Vec<_>>()
                .join(" ");
            *by_msg.entry(format!("{level} {msg}")).or_default() += 1;
        }
    }
    let mut top: Vec<(String, u64)> = by_msg.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(10);
    (warns, errors, top)
}

fn evaluate(x: &Inputs<'_>) -> Report {
    let o = x.opts;
    let a = &o.aws;
    let c = x.counters;
    let ld = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let mut invariants: Vec<Invariant> = Vec::new();

    // --- records of the run's images -----------------------------------------------------
    let by_id: HashMap<(&str, &str), &ImageRecord> = x
        .records
        .iter()
        .map(|r| ((r.tenant.as_str(), r.image_id.as_str()), r))
        .collect();
    let imgs: Vec<Img> = x.state.iter().map(|s| lock(s).clone()).collect();
    let mut never_uploaded: Vec<String> = Vec::new();
    let mut no_record: Vec<String> = Vec::new();
    let mut ours: Vec<(usize, &ImageRecord)> = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        if !img.confirmed {
            never_uploaded.push(format!(
                "#{i}: {}",
                img.error.clone().unwrap_or_else(|| "not uploaded".into())
            ));
            continue;
        }
        match img
            .image_id
            .as_deref()
            .and_then(|id| by_id.get(&(img.tenant.as_str(), id)))
        {
            Some(r) => ours.push((i, r)),
            None => no_record.push(format!(
                "#{i} {}/{}",
                img.tenant,
                img.image_id.as_deref().unwrap_or("?")
            )),
        }
    }
    let our_keys: BTreeSet<(String, String)> = imgs
        .iter()
        .filter_map(|i| Some((i.tenant.clone(), i.image_id.clone()?)))
        .collect();
    let others: Vec<&ImageRecord> = x
        .records
        .iter()
        .filter(|r| !our_keys.contains(&(r.tenant.clone(), r.image_id.clone())))
        .collect();

    // --- 1. stuck -----------------------------------------------------------------------
    let stuck: Vec<&ImageRecord> = ours
        .iter()
        .map(|(_, r)| *r)
        .filter(|r| !is_final(r))
        .collect();
    let stuck_by_status = count_by(stuck.iter().map(|r| status_str(r)));
    invariants.push(Invariant {
        id: 1,
        name: "no image stuck (every uploaded image done or failed)",
        passed: Some(stuck.is_empty() && no_record.is_empty() && never_uploaded.is_empty()),
        detail: format!(
            "{} stuck {stuck_by_status:?}; {} uploads without a record; {} images never \
             uploaded; {} other records ({:?}); waiting ended: {}",
            stuck.len(),
            no_record.len(),
            never_uploaded.len(),
            others.len(),
            count_by(others.iter().map(|r| status_str(r))),
            x.wait_end_reason
        ),
    });

    // --- 2. poison vs good ----------------------------------------------------------------
    let mut failed_by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut poison_failed: BTreeSet<String> = BTreeSet::new();
    let mut bad_failures: Vec<String> = Vec::new();
    let mut mispredicted: Vec<String> = Vec::new();
    let mut invalid_output_failures = 0u64;
    let mut done_n = 0usize;
    for (_, r) in &ours {
        let predicted = r
            .sha256
            .as_deref()
            .is_some_and(|s| is_poison(o.seed, s, o.poison_rate));
        match r.status {
            ImageStatus::Failed => {
                let kind = failure_kind(r.error.as_deref());
                *failed_by_kind.entry(kind).or_default() += 1;
                let reason_ok = r.error.as_deref().is_some_and(|e| !e.trim().is_empty());
                match kind {
                    "poison" => {
                        if let Some(s) = &r.sha256 {
                            poison_failed.insert(s.clone());
                        }
                        if !predicted {
                            mispredicted.push(format!(
                                "{}/{} failed as poison but is_poison says no",
                                r.tenant, r.image_id
                            ));
                        }
                        if !reason_ok {
                            bad_failures.push(format!("{} failed without a reason", r.image_id));
                        }
                    }
                    "invalid-output" => invalid_output_failures += 1,
                    _ => bad_failures.push(format!(
                        "{}/{} ({} provider requests for its content): {}",
                        r.tenant,
                        r.image_id,
                        r.sha256
                            .as_deref()
                            .and_then(|s| x.stats.requests_per_image.get(s))
                            .copied()
                            .unwrap_or(0),
                        r.error
                            .as_deref()
                            .unwrap_or("no error")
                            .lines()
                            .next()
                            .unwrap_or("")
                    )),
                }
            }
            ImageStatus::Done => {
                done_n += 1;
                if predicted {
                    mispredicted.push(format!("{}/{} is poison but done", r.tenant, r.image_id));
                } else if r.result.is_none() {
                    bad_failures.push(format!("{}/{} done without a result", r.tenant, r.image_id));
                }
            }
            _ => {}
        }
    }
    let sim_poison: BTreeSet<String> = x.stats.poisoned_per_image.keys().cloned().collect();
    let poison_sets_equal = sim_poison == poison_failed;
    let invalid_output_bound = (x.stats.faults.malformed + x.stats.faults.bad_content) / 2;
    let ok2 = bad_failures.is_empty()
        && mispredicted.is_empty()
        && poison_sets_equal
        && invalid_output_failures <= invalid_output_bound;
    invariants.push(Invariant {
        id: 2,
        name: "every good image done with a result; poison images failed with a reason",
        passed: Some(ok2),
        detail: format!(
            "{done_n} done, failed by kind {failed_by_kind:?}; distinct poison images: {} failed \
             vs {} seen by the simulator (sets equal: {poison_sets_equal}); is_poison \
             mismatches {}; invalid-output failures {invalid_output_failures} (allowed ≤ \
             {invalid_output_bound}); unexpected failures {}",
            poison_failed.len(),
            sim_poison.len(),
            mispredicted.len(),
            bad_failures.len()
        ),
    });

    // --- 3. one result per image ------------------------------------------------------------
    let done: Vec<&ImageRecord> = x
        .records
        .iter()
        .filter(|r| r.status == ImageStatus::Done)
        .collect();
    let done_without_result = done.iter().filter(|r| r.result.is_none()).count();
    let not_done_with_result = x
        .records
        .iter()
        .filter(|r| r.status != ImageStatus::Done && r.result.is_some())
        .count();
    let mut paid_per_sha: HashMap<&str, u64> = HashMap::new();
    for r in &done {
        if r.result.as_ref().is_some_and(|x| !x.cached) {
            *paid_per_sha
                .entry(r.sha256.as_deref().unwrap_or(""))
                .or_default() += 1;
        }
    }
    let paid_twice = paid_per_sha.values().filter(|c| **c > 1).count();
    let shas: BTreeSet<&str> = ours
        .iter()
        .filter_map(|(_, r)| r.sha256.as_deref())
        .collect();
    let with_sha = ours.iter().filter(|(_, r)| r.sha256.is_some()).count();
    let cached_results = done
        .iter()
        .filter(|r| r.result.as_ref().is_some_and(|x| x.cached))
        .count();
    // Provider answers per image beyond the one booked with its result (the simulator counts
    // completions per image): calls lost to kills show up here.
    let extra_completions: u64 = ours
        .iter()
        .filter_map(|(_, r)| {
            let sha = r.sha256.as_deref()?;
            let got = x.stats.completions_per_image.get(sha).copied().unwrap_or(0);
            Some(got.saturating_sub(1))
        })
        .sum();
    let ok3 = done_without_result == 0
        && not_done_with_result == 0
        && paid_twice == 0
        && shas.len() == with_sha;
    invariants.push(Invariant {
        id: 3,
        name: "one result per image; one paid result per content",
        passed: Some(ok3),
        detail: format!(
            "{} done records: {done_without_result} without a result, {not_done_with_result} \
             not done with a result; {paid_twice} contents with more than one paid result; \
             {cached_results} cached results; distinct resized sha256 {} of {with_sha}; \
             simulator completions beyond the first per image: {extra_completions}",
            done.len(),
            shas.len()
        ),
    });

    // --- 4. ledger = Σ results + extra spend ------------------------------------------------------
    let l = ledger_totals(x.ledger);
    let sum_result_cost: f64 = x
        .records
        .iter()
        .filter_map(|r| r.result.as_ref())
        .map(|r| r.cost_usd)
        .sum();
    let sum_extra_cost: f64 = x
        .records
        .iter()
        .filter_map(|r| r.extra_spend)
        .map(|e| e.cost_usd)
        .sum();
    let sum_cost = sum_result_cost + sum_extra_cost;
    let sum_in: u64 = x
        .records
        .iter()
        .map(|r| {
            r.result.as_ref().map(|x| x.usage.input_tokens).unwrap_or(0)
                + r.extra_spend.map(|e| e.input_tokens).unwrap_or(0)
        })
        .sum();
    let sum_out: u64 = x
        .records
        .iter()
        .map(|r| {
            r.result
                .as_ref()
                .map(|x| x.usage.output_tokens)
                .unwrap_or(0)
                + r.extra_spend.map(|e| e.output_tokens).unwrap_or(0)
        })
        .sum();
    let sum_at_estimate: f64 = x
        .records
        .iter()
        .map(|r| {
            r.result
                .as_ref()
                .map(|x| x.cost_at_estimate_usd)
                .unwrap_or(0.0)
                + r.extra_spend.map(|e| e.cost_at_estimate_usd).unwrap_or(0.0)
        })
        .sum();
    let with_extra = x.records.iter().filter(|r| r.extra_spend.is_some()).count();
    let booked: u64 = x.records.iter().map(booked_calls).sum();
    let results_estimated = x
        .records
        .iter()
        .filter(|r| r.result.as_ref().is_some_and(|x| x.usage_estimated))
        .count();
    // Per tenant: the ledger partitions that disagree with their records, and the done images
    // whose result tokens equal the difference (the image whose booking went missing).
    let mut tenant_diffs: Vec<Value> = Vec::new();
    let tenants: BTreeSet<&str> = x
        .records
        .iter()
        .map(|r| r.tenant.as_str())
        .chain(x.ledger.iter().map(|(t, _)| t.as_str()))
        .collect();
    for t in tenants {
        let rows: Vec<(String, CostRow)> =
            x.ledger.iter().filter(|(lt, _)| lt == t).cloned().collect();
        let lt = ledger_totals(&rows);
        let recs: Vec<&ImageRecord> = x.records.iter().filter(|r| r.tenant == t).collect();
        let r_images = recs
            .iter()
            .filter(|r| r.status == ImageStatus::Done)
            .count() as u64;
        let r_calls: u64 = recs.iter().map(|r| booked_calls(r)).sum();
        let tok = |r: &ImageRecord, out: bool| {
            let u = r.result.as_ref().map(|x| &x.usage);
            let e = r.extra_spend;
            if out {
                u.map(|u| u.output_tokens).unwrap_or(0) + e.map(|e| e.output_tokens).unwrap_or(0)
            } else {
                u.map(|u| u.input_tokens).unwrap_or(0) + e.map(|e| e.input_tokens).unwrap_or(0)
            }
        };
        let r_in: u64 = recs.iter().map(|r| tok(r, false)).sum();
        let r_out: u64 = recs.iter().map(|r| tok(r, true)).sum();
        if (lt.images, lt.calls, lt.input_tokens, lt.output_tokens)
            == (r_images, r_calls, r_in, r_out)
        {
            continue;
        }
        let (d_in, d_out) = (
            r_in as i64 - lt.input_tokens as i64,
            r_out as i64 - lt.output_tokens as i64,
        );
        let candidates: Vec<String> = recs
            .iter()
            .filter(|r| {
                r.result.as_ref().is_some_and(|x| {
                    x.usage.input_tokens as i64 == d_in.abs()
                        && x.usage.output_tokens as i64 == d_out.abs()
                })
            })
            .map(|r| format!("{}/{} ({})", r.tenant, r.image_id, r.updated_at))
            .take(10)
            .collect();
        tenant_diffs.push(json!({
            "tenant": t,
            "ledger": {"images": lt.images, "calls": lt.calls, "input_tokens": lt.input_tokens,
                       "output_tokens": lt.output_tokens, "cost_usd": lt.cost_usd},
            "records": {"done": r_images, "booked_calls": r_calls, "input_tokens": r_in,
                        "output_tokens": r_out},
            "images_matching_the_token_difference": candidates,
        }));
    }
    let ok4 = (l.cost_usd - sum_cost).abs() < 1e-6
        && l.input_tokens == sum_in
        && l.output_tokens == sum_out
        && l.images == done.len() as u64
        && l.calls == booked
        && (l.cost_at_estimate_usd - sum_at_estimate).abs() < 1e-6;
    invariants.push(Invariant {
        id: 4,
        name: "ledger = Σ over images of result + extra spend (cost, tokens, images, calls)",
        passed: Some(ok4),
        detail: format!(
            "ledger ${:.6} vs Σ results ${sum_result_cost:.6} + extra spend ${sum_extra_cost:.6} \
             on {with_extra} records (diff {:.2e}); input tokens {} vs {sum_in}; output tokens \
             {} vs {sum_out}; images {} vs {} done; calls {} vs {booked} booked on records; at \
             estimate: {} calls ${:.6} vs ${sum_at_estimate:.6} on records ({results_estimated} \
             results with estimated usage); tenants whose ledger differs: {}",
            l.cost_usd,
            (l.cost_usd - sum_cost).abs(),
            l.input_tokens,
            l.output_tokens,
            l.images,
            done.len(),
            l.calls,
            l.calls_at_estimate,
            l.cost_at_estimate_usd,
            if tenant_diffs.is_empty() {
                "none".to_string()
            } else {
                serde_json::to_string(&tenant_diffs).unwrap_or_default()
            },
        ),
    });

    // --- 5. paid calls − ledger calls = lost to kills ------------------------------------------
    let s = x.stats;
    let paid_calls = billed_calls(s);
    let lost = paid_calls as i64 - l.calls as i64;
    // The same against the calls booked on the records (differs from the above only when the
    // ledger and the records disagree, invariant 4).
    let lost_vs_records = paid_calls as i64 - booked as i64;
    let analyze_kills = x
        .kills
        .iter()
        .filter(|k| k.host.starts_with("analyze"))
        .count() as u64;
    let static_bound = analyze_kills * a.batches_per_host as u64 * x.per_invocation_calls;
    let observed_bound: u64 = x.kills.iter().map(|k| k.call_bound).sum();
    let timeouts: f64 = x
        .host_totals
        .iter()
        .filter(|(h, _)| h.starts_with("analyze"))
        .map(|(_, t)| t.get("result_timeout").copied().unwrap_or(0.0))
        .sum();
    let timeout_bound = timeouts as u64 * x.per_invocation_calls;
    let lost_bound = static_bound + timeout_bound + x.shutdown_calls;
    let ok5 = lost >= 0 && lost as u64 <= lost_bound;
    invariants.push(Invariant {
        id: 5,
        name: "paid calls − ledger calls = calls lost to kills (0 ≤ lost ≤ kills × in flight)",
        passed: Some(ok5),
        detail: format!(
            "simulator paid calls {paid_calls} (completions {} + truncated {} + bad content {}); \
             ledger calls {}; lost {lost} (vs calls booked on records: {lost_vs_records}); allowed 0..={lost_bound} = {analyze_kills} analyze \
             kills × {} batches × {} records at once + {} function timeouts × {} + {} in flight \
             at the final stop; bound from what was in flight at each kill: {observed_bound} \
             (lost ≤ that: {})",
            s.completions,
            s.faults.malformed,
            s.faults.bad_content,
            l.calls,
            a.batches_per_host,
            x.per_invocation_calls,
            timeouts,
            x.per_invocation_calls,
            x.shutdown_calls,
            lost <= observed_bound as i64
        ),
    });

    // --- 6. DLQ ----------------------------------------------------------------------------------
    let mut dlq_by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut dlq_not_jobs = 0u64;
    let mut dlq_open: Vec<String> = Vec::new();
    let mut dlq_images: BTreeSet<(String, String)> = BTreeSet::new();
    for m in x.dlq {
        match AnalysisJob::parse(&m.body) {
            Ok(job) => {
                let st = by_id
                    .get(&(job.tenant.as_str(), job.image_id.as_str()))
                    .map(|r| status_str(r))
                    .unwrap_or_else(|| "no record".into());
                if st != "done" && st != "failed" {
                    dlq_open.push(format!("{}/{} {st}", job.tenant, job.image_id));
                }
                *dlq_by_status.entry(st).or_default() += 1;
                dlq_images.insert((job.tenant, job.image_id));
            }
            Err(_) => dlq_not_jobs += 1,
        }
    }
    invariants.push(Invariant {
        id: 6,
        name: "dead-letter queue: every dead job's image is final",
        passed: Some(dlq_open.is_empty() && dlq_not_jobs == 0),
        detail: format!(
            "{} messages ({} images) by image status {dlq_by_status:?}; {dlq_not_jobs} bodies \
             that are no job; analyze queue left {} messages (drained before the stop: {}), \
             notification queue {}",
            x.dlq.len(),
            dlq_images.len(),
            x.depth_left
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into()),
            x.drained,
            x.notify_left
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into()),
        ),
    });

    // --- 7. wall time ------------------------------------------------------------------------------
    let ideal_images_s = x.n as f64 * 60.0 / o.rpm as f64;
    let admitted = s
        .requests
        .saturating_sub(s.rate_limited + s.faults.rate_limit + s.poisoned + s.bad_requests)
        .saturating_sub(s.unauthorized + s.not_found);
    let ideal_requests_s = admitted as f64 * 60.0 / o.rpm as f64;
    let ratio = x.wall_s / ideal_images_s.max(1e-9);
    invariants.push(Invariant {
        id: 7,
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

    // --- table ----------------------------------------------------------------------------------
    let mut t = String::new();
    let row = |t: &mut String, k: &str, v: String| {
        let _ = writeln!(t, "  {k:<46} {v}");
    };
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "AWS fault run: {} images ({:.0}% via the api), seed {}, rpm {}, {} analyze hosts × {} \
         batches, function timeout {}s, maxReceiveCount {}",
        x.n,
        a.api_share * 100.0,
        o.seed,
        o.rpm,
        a.analyze_hosts,
        a.batches_per_host,
        a.function_timeout_secs,
        a.max_receives
    );
    let _ = writeln!(
        t,
        "faults: 5xx {:.0}%, 429 {:.0}% (Retry-After {}s), hang {:.0}% ({} ms, provider \
         timeout {}s), truncated {:.0}%, poison images {:.0}%, duplicates {:.0}%, latency {}+{} ms",
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
            &format!("  kill #{} {}", k.n, k.host),
            format!(
                "{:.1}s during {}: {} records in {} invocations in flight (call bound {}), \
                 uploaded {}, final {}; down {} ms, ready {} ms after restart",
                k.at_s,
                k.phase,
                k.in_flight_records,
                k.in_flight_invocations,
                k.call_bound,
                k.uploaded,
                k.final_images,
                k.down_ms,
                k.ready_after_ms
            ),
        );
    }
    row(
        &mut t,
        "uploads: S3 drops / api POSTs / presigned PUTs",
        format!(
            "{} / {} / {} ({} + {} + {} retries, {} failed)",
            ld(&c.s3_puts),
            ld(&c.api_posts),
            ld(&c.presigned_puts),
            ld(&c.s3_put_retries),
            ld(&c.api_post_retries),
            ld(&c.presigned_put_retries),
            ld(&c.upload_failures)
        ),
    );
    row(
        &mut t,
        "duplicate jobs sent",
        format!(
            "{} of {} planned ({} after the image was final; {} send errors)",
            ld(&c.dup_sent),
            imgs.iter().filter(|i| i.dup_planned).count(),
            ld(&c.dup_late),
            ld(&c.dup_errors)
        ),
    );
    let _ = writeln!(t, "hosts (sums over their invocations)");
    for (h, tot) in x.host_totals {
        let g = |k: &str| tot.get(k).copied().unwrap_or(0.0);
        let line = if h.starts_with("reconcile") {
            format!(
                "{} invocations ({} errors): resized {}, rejected {}, requeued {}, expired {}, \
                 settled {}, errors {}; {} starts",
                g("invocations"),
                g("result_error"),
                g("reconcile_resized"),
                g("reconcile_rejected"),
                g("reconcile_requeued"),
                g("reconcile_expired"),
                g("reconcile_settled"),
                g("reconcile_errors"),
                g("starts")
            )
        } else if h.starts_with("resize") {
            format!(
                "{} invocations ({} ok, {} errors, {} timeouts), {} objects, {} events \
                 dropped, {} test events; {} starts",
                g("invocations"),
                g("result_ok"),
                g("result_error"),
                g("result_timeout"),
                g("objects"),
                g("dropped") + g("event_dropped"),
                g("event_skip"),
                g("starts")
            )
        } else {
            format!(
                "{} batches ({} ok, {} errors, {} timeouts), {} records, {} batch item \
                 failures, {} deleted; {} starts",
                g("invocations"),
                g("result_ok"),
                g("result_error"),
                g("result_timeout"),
                g("records"),
                g("failures"),
                g("deleted"),
                g("starts")
            )
        };
        row(&mut t, h, line);
    }
    let _ = writeln!(t, "results");
    row(
        &mut t,
        "statuses (all records)",
        format!("{:?}", count_by(x.records.iter().map(status_str))),
    );
    row(
        &mut t,
        "Σ results + extra spend: cost / in / out",
        format!("${sum_cost:.6} / {sum_in} / {sum_out}"),
    );
    row(
        &mut t,
        "ledger: cost / in / out / images / calls",
        format!(
            "${:.6} / {} / {} / {} / {}",
            l.cost_usd, l.input_tokens, l.output_tokens, l.images, l.calls
        ),
    );
    row(
        &mut t,
        "ledger: at estimate (calls / cost)",
        format!("{} / ${:.6}", l.calls_at_estimate, l.cost_at_estimate_usd),
    );
    let _ = writeln!(t, "simulator");
    simulator_rows(&mut t, 46, s);
    row(
        &mut t,
        "peak requests in flight",
        s.peak_in_flight.to_string(),
    );
    let (warns, errors, top) = log_summary(x.logs);
    let _ = writeln!(t, "host logs");
    row(&mut t, "WARN / ERROR lines", format!("{warns} / {errors}"));
    for (msg, count) in &top {
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
    let lists: [(&str, Vec<String>); 5] = [
        (
            "stuck",
            stuck
                .iter()
                .map(|r| format!("{}/{} {}", r.tenant, r.image_id, status_str(r)))
                .collect(),
        ),
        ("without a record", no_record.clone()),
        ("never uploaded", never_uploaded.clone()),
        (
            "unexpected failures",
            bad_failures
                .iter()
                .chain(mispredicted.iter())
                .cloned()
                .collect(),
        ),
        ("dead jobs of open images", dlq_open.clone()),
    ];
    for (what, list) in &lists {
        if !list.is_empty() {
            let _ = writeln!(t, "  {what} (first 10 of {}):", list.len());
            for s in list.iter().take(10) {
                let _ = writeln!(t, "        {s}");
            }
        }
    }
    if !ok4 && x.emulator_is_moto {
        let _ = writeln!(
            t,
            "  note: moto's TransactWriteItems is not isolated: a cancelled transaction restores a \
             snapshot of the whole table taken when it began, undoing what concurrent requests \
             wrote meanwhile (half of another `complete` included). On moto a ledger/record \
             mismatch can come from the emulator; check it on LocalStack or AWS."
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "{}  (host logs: {})",
        if passed {
            "ALL INVARIANTS HOLD"
        } else {
            "SOME INVARIANTS FAILED"
        },
        x.logs.display()
    );

    let take = |v: &[String]| v.iter().take(50).cloned().collect::<Vec<_>>();
    let json = json!({
        "passed": passed,
        "target": "aws",
        "options": {
            "images": x.n,
            "kills": x.kills_planned,
            "seed": o.seed,
            "rpm": o.rpm,
            "uploaders": o.uploaders,
            "dup_rate": o.dup_rate,
            "provider_timeout_secs": o.provider_timeout_secs,
            "timeout_secs": o.timeout_secs,
            "stall_secs": o.stall_secs,
            "analyze_hosts": a.analyze_hosts,
            "batches_per_host": a.batches_per_host,
            "function_timeout_secs": a.function_timeout_secs,
            "resize_timeout_secs": a.resize_timeout_secs,
            "resize_concurrency": a.resize_concurrency,
            "api_share": a.api_share,
            "tenants": a.tenants,
            "reconcile_every_secs": a.reconcile_every_secs,
            "reconcile_after_secs": a.reconcile_after_secs,
            "stuck_after_secs": a.stuck_after_secs,
            "max_receives": a.max_receives,
            "drain_secs": a.drain_secs,
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
            "s3_puts": ld(&c.s3_puts),
            "s3_put_retries": ld(&c.s3_put_retries),
            "api_posts": ld(&c.api_posts),
            "api_post_retries": ld(&c.api_post_retries),
            "presigned_puts": ld(&c.presigned_puts),
            "presigned_put_retries": ld(&c.presigned_put_retries),
            "via_api": imgs.iter().filter(|i| i.via_api).count(),
            "confirmed": c.confirmed.load(Ordering::Relaxed),
            "failures": ld(&c.upload_failures),
            "never_uploaded": take(&never_uploaded),
        },
        "duplicates": {
            "planned": imgs.iter().filter(|i| i.dup_planned).count(),
            "sent": ld(&c.dup_sent),
            "sent_after_final": ld(&c.dup_late),
            "send_errors": ld(&c.dup_errors),
        },
        "hosts": x.host_totals,
        "records": {
            "listed": x.records.len(),
            "by_status": count_by(x.records.iter().map(status_str)),
            "stuck": stuck.iter().map(|r| json!({
                "tenant": r.tenant, "image_id": r.image_id, "status": status_str(r),
            })).collect::<Vec<_>>(),
            "without_record": take(&no_record),
            "others": others.len(),
            "failed_by_kind": failed_by_kind,
            "unexpected_failures": take(&bad_failures),
            "poison_mismatches": take(&mispredicted),
        },
        "results": {
            "done": done.len(),
            "cached": cached_results,
            "sum_result_cost_usd": sum_result_cost,
            "sum_extra_spend_cost_usd": sum_extra_cost,
            "records_with_extra_spend": with_extra,
            "sum_input_tokens": sum_in,
            "sum_output_tokens": sum_out,
            "sum_cost_at_estimate_usd": sum_at_estimate,
            "results_with_estimated_usage": results_estimated,
            "booked_calls": booked,
        },
        "ledger": l,
        "ledger_tenants_differing": tenant_diffs,
        "ledger_rows": x.ledger.iter().map(|(t, r)| json!({"tenant": t, "row": r})).collect::<Vec<_>>(),
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
            "peak_in_flight": s.peak_in_flight,
            "images_called": s.requests_per_image.len(),
            "max_requests_per_image": s.requests_per_image.values().max().copied().unwrap_or(0),
            "completions_beyond_first_per_image": extra_completions,
        },
        "calls": {
            "paid": paid_calls,
            "ledger": l.calls,
            "booked_on_records": booked,
            "lost": lost,
            "lost_vs_records": lost_vs_records,
            "lost_bound": lost_bound,
            "observed_in_flight_bound": observed_bound,
            "function_timeouts": timeouts,
            "in_flight_at_final_stop": x.shutdown_in_flight,
        },
        "dlq": {
            "messages": x.dlq.len(),
            "images": dlq_images.len(),
            "by_image_status": dlq_by_status,
            "not_jobs": dlq_not_jobs,
            "open_images": dlq_open,
            "receive_counts": count_by(x.dlq.iter().map(|m| m.receive_count.to_string())),
        },
        "queues_left": {
            "analyze": x.depth_left,
            "notify": x.notify_left,
            "drained_before_stop": x.drained,
        },
        "host_logs": {
            "dir": x.logs,
            "warn_lines": warns,
            "error_lines": errors,
            "top": top.iter().map(|(m, c)| json!({"message": m, "count": c})).collect::<Vec<_>>(),
        },
        "invariants": invariants,
    });
    Report {
        passed,
        table: t,
        json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_lines_track_what_is_in_flight() {
        let inc = Incarnation::default();
        let totals = Mutex::new(BTreeMap::new());
        let ev = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        Host::account(&inc, &totals, &ev(r#"{"ev":"ready","role":"analyze"}"#));
        Host::account(&inc, &totals, &ev(r#"{"ev":"start","inv":1,"records":10}"#));
        Host::account(&inc, &totals, &ev(r#"{"ev":"start","inv":2,"records":3}"#));
        assert!(inc.ready.load(Ordering::SeqCst));
        assert_eq!(inc.in_flight_records.load(Ordering::SeqCst), 13);
        Host::account(
            &inc,
            &totals,
            &ev(
                r#"{"ev":"end","inv":1,"records":10,"result":"ok","failures":2,"deleted":8,"ms":5}"#,
            ),
        );
        Host::account(
            &inc,
            &totals,
            &ev(
                r#"{"ev":"end","inv":3,"records":0,"result":"ok","run":{"resized":2,"stopped":"drained"}}"#,
            ),
        );
        assert_eq!(inc.in_flight_records.load(Ordering::SeqCst), 3);
        assert_eq!(inc.in_flight_invocations.load(Ordering::SeqCst), 0);
        let t = lock(&totals);
        assert_eq!(t["invocations"], 2.0);
        assert_eq!(t["result_ok"], 2.0);
        assert_eq!(t["deleted"], 8.0);
        assert_eq!(t["reconcile_resized"], 2.0);
        assert!(!t.contains_key("inv"));
    }

    #[test]
    fn drop_keys_name_the_image() {
        let img = make_image(5);
        let key = format!(
            "{UPLOAD_PREFIX}t1/{}.{}",
            stem_of(&img.filename),
            ext_of(&img.filename)
        );
        let k = sightline_core::keys::parse_upload_key(&key, UPLOAD_PREFIX).unwrap();
        assert_eq!(
            (k.tenant.as_str(), k.image_id.as_str()),
            ("t1", "fault-0000005")
        );
    }
}
