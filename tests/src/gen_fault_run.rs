//! The generation fault run: generation jobs through `sightline serve` while the provider
//! simulator injects faults on the Images API and on the check's chat completions, and serve is
//! killed with SIGKILL and restarted on the same data dir; then the invariants are checked and
//! reported. The generation lane's counterpart of [`crate::fault_run`].
//!
//! Used by `src/bin/gen-fault-run.rs` (and `scripts/gen-fault-run.sh`); not part of the default
//! tests.
//!
//! What one run does:
//!
//! 1. Starts the simulator in-process ([`sim_config`]): 5xx, 429 with Retry-After, hangs and
//!    cut bodies on both APIs, an RPM limit; prompts with the refusal marker are refused by its
//!    safety system, and `[mismatch]` rows fail their check.
//! 2. Starts `sightline serve` with the simulator as provider and a webhook secret.
//! 3. Posts job A (`--rows` rows, webhook to a receiver that fails three times first), and once
//!    a quarter of A is final, job B: the same rows again while A still runs, so both race for
//!    the same idempotency keys; B's webhook receiver answers 410.
//! 4. Kills serve `--kills` times at random moments of the two jobs' progress, restarting it
//!    after 0.2–2 s.
//! 5. Waits until every job is finished and its webhook delivered or stopped, then posts the
//!    same rows a third time (job C, no kill) and waits for it.
//! 6. Collects every job's report, `GET /v1/costs`, the deliveries, what the receivers got and
//!    the simulator's stats, and checks the invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sightline_core::generate::{
    plan_job, Limits as JobLimits, RowsInput, TemplateSet, TemplateSpec,
};
use sightline_core::webhook::{ReceivedHeaders, WebhookSecret, DEFAULT_TOLERANCE};

use crate::fault_run::{billed_calls, free_port, log_summary, Invariant, Serve, API_KEY};
use crate::sim::images::REFUSE_MARKER;
use crate::sim::{FaultPlan, SimConfig, SimServer, SimStats};
use crate::webhook_receiver::WebhookReceiver;

/// Key the simulator accepts and serve sends.
const SIM_KEY: &str = "sk-gen-fault-run";
/// The local tenant's webhook secret (serve's SIGHTLINE_WEBHOOK_SECRET).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Image model of the template (priced per image and by tokens).
pub const IMAGE_MODEL: &str = "gpt-image-1-mini";
/// Model of the check by analysis.
pub const CHECK_MODEL: &str = "gpt-4.1-mini";
/// The template: one prompt per row, the row's variables in it.
const PROMPT: &str = "A studio photo of {product} in {colour}";

/// Command-line options of `gen-fault-run`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gen-fault-run",
    about = "Run generation jobs through `sightline serve` under provider faults and SIGKILLs, \
             the same rows twice at once and once more afterwards; check and report the \
             invariants"
)]
pub struct Options {
    /// Rows per job [default: 1000; 200 with --quick].
    #[arg(long)]
    pub rows: Option<usize>,
    /// SIGKILLs of serve at random moments [default: 4; 2 with --quick].
    #[arg(long)]
    pub kills: Option<usize>,
    /// Small development run: --rows 200 --kills 2 unless given.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the kill moments and of the simulator's faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The simulator's requests-per-minute limit (images and chat alike), and serve's
    /// SIGHTLINE_RPM and SIGHTLINE_GENERATION_IPM.
    #[arg(long, default_value_t = 6000)]
    pub rpm: u64,
    /// serve's workers (SIGHTLINE_WORKERS).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Simulator: probability of a 5xx per request.
    #[arg(long, default_value_t = 0.1)]
    pub error_rate: f64,
    /// Simulator: probability of an injected 429 per request.
    #[arg(long, default_value_t = 0.03)]
    pub rate_limit_rate: f64,
    /// Simulator: Retry-After of an injected 429, seconds.
    #[arg(long, default_value_t = 1.0)]
    pub retry_after_s: f64,
    /// Simulator: probability of a hang (then a dropped connection) per request.
    #[arg(long, default_value_t = 0.01)]
    pub timeout_rate: f64,
    /// Simulator: how long a hang lasts, ms (serve gives up after --provider-timeout-secs).
    #[arg(long, default_value_t = 3000)]
    pub timeout_hang_ms: u64,
    /// Simulator: probability of a cut 200 answer per request (paid, unusable).
    #[arg(long, default_value_t = 0.02)]
    pub malformed_rate: f64,
    /// Simulator: fixed latency, ms.
    #[arg(long, default_value_t = 20)]
    pub latency_ms: u64,
    /// Simulator: extra random latency 0..=jitter, ms.
    #[arg(long, default_value_t = 20)]
    pub jitter_ms: u64,
    /// serve's provider timeout (SIGHTLINE_TIMEOUT_SECS).
    #[arg(long, default_value_t = 2)]
    pub provider_timeout_secs: u64,
    /// Every `n`th row's prompt carries the simulator's refusal marker (0: none).
    #[arg(long, default_value_t = 97)]
    pub refuse_every: usize,
    /// Every `n`th row fails its check, and again after its regeneration (0: none).
    #[arg(long, default_value_t = 53)]
    pub mismatch_every: usize,
    /// Give up waiting after this long (from the first job).
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
    /// Give up when no row moved for this long (longer than a killed row's claim lease plus
    /// the queue's visibility).
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
    #[arg(long, default_value = "target/gen-fault-run")]
    pub work_dir: PathBuf,
    /// Also write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

impl Options {
    pub fn row_count(&self) -> usize {
        self.rows.unwrap_or(if self.quick { 200 } else { 1000 })
    }

    pub fn kill_count(&self) -> usize {
        self.kills.unwrap_or(if self.quick { 2 } else { 4 })
    }

    fn validate(&self) -> anyhow::Result<()> {
        let n = self.row_count();
        // The API's job limit.
        if n == 0 || n > 10_000 {
            bail!("--rows must be 1..=10000");
        }
        if self.workers == 0 || self.rpm == 0 {
            bail!("--workers and --rpm must be ≥ 1");
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
        latency_ms: o.latency_ms,
        jitter_ms: o.jitter_ms,
        seed: o.seed,
        timeout_hang_ms: o.timeout_hang_ms,
        faults: FaultPlan {
            error_rate: o.error_rate,
            rate_limit_rate: o.rate_limit_rate,
            retry_after_s: o.retry_after_s,
            timeout_rate: o.timeout_rate,
            malformed_rate: o.malformed_rate,
            ..FaultPlan::default()
        },
        ..SimConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

/// What a row is meant to end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Generated once, checked, done.
    Done,
    /// Refused by the safety system: failed with the refusal as its reason, nothing paid.
    Refused,
    /// Fails its check, regenerated once, fails again: mismatch, two images paid.
    Mismatch,
}

impl Expect {
    /// Usable images the provider should answer for the row's prompt over the whole run.
    pub fn images(self) -> u64 {
        match self {
            Expect::Done => 1,
            Expect::Refused => 0,
            Expect::Mismatch => 2,
        }
    }
}

/// The rows of every job (row numbers from 1) and what each should end as.
pub fn plan_rows(o: &Options) -> Vec<(Value, Expect)> {
    let every = |n: usize, i: usize| n > 0 && i.is_multiple_of(n);
    (1..=o.row_count())
        .map(|i| {
            let (product, expect) = if every(o.refuse_every, i) {
                (format!("a {REFUSE_MARKER} thing {i}"), Expect::Refused)
            } else if every(o.mismatch_every, i) {
                (format!("lamp {i} [mismatch]"), Expect::Mismatch)
            } else {
                (format!("lamp {i}"), Expect::Done)
            };
            let row = json!({
                "sku": format!("SKU-{i}"),
                "product": product,
                "colour": format!("colour {}", i % 7),
            });
            (row, expect)
        })
        .collect()
}

/// The jobs' inline template.
fn template() -> TemplateSpec {
    TemplateSpec {
        prompt: Some(PROMPT.into()),
        model: Some(IMAGE_MODEL.into()),
        size: Some("1024x1024".into()),
        quality: Some("low".into()),
        output_key: Some("products/{sku}.png".into()),
        ..TemplateSpec::default()
    }
}

/// The prompt a row renders to, by the renderer serve uses (what the simulator counts images
/// by); empty when the row does not render.
pub fn prompt_of(row: &Value) -> String {
    let Ok(set) = TemplateSet::inline(&template()) else {
        return String::new();
    };
    let rows = json!([row]).to_string();
    plan_job(
        &set,
        None,
        RowsInput::Json(rows.as_bytes()),
        &JobLimits::default(),
    )
    .ok()
    .and_then(|mut requests| requests.pop())
    .map(|request| request.prompt)
    .unwrap_or_default()
}

/// The job's JSON body: the inline template, the rows, the webhook.
fn job_body(rows: &[(Value, Expect)], webhook_url: &str) -> Value {
    json!({
        "template": template(),
        "rows": rows.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
        "webhook_url": webhook_url,
    })
}

// ---------------------------------------------------------------------------------------------
// Talking to serve
// ---------------------------------------------------------------------------------------------

struct Run {
    serve: Serve,
    http: reqwest::Client,
    started: Instant,
}

impl Run {
    fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.serve.port)
    }

    fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// GET with the tenant's key; `None` while serve is down or answers 5xx.
    async fn get(&self, path: &str) -> anyhow::Result<Option<Value>> {
        let r = match self
            .http
            .get(self.api(path))
            .header("x-api-key", API_KEY)
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => return Ok(None),
        };
        let status = r.status();
        if status.is_server_error() {
            return Ok(None);
        }
        if !status.is_success() {
            bail!(
                "GET {path}: HTTP {status}: {}",
                r.text().await.unwrap_or_default()
            );
        }
        match r.json().await {
            Ok(v) => Ok(Some(v)),
            Err(_) => Ok(None),
        }
    }

    /// GET, retried while serve is down (up to a minute).
    async fn get_retrying(&self, path: &str) -> anyhow::Result<Value> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.get(path).await? {
                return Ok(v);
            }
            if Instant::now() > until {
                bail!("GET {path}: serve did not answer for a minute");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// POST a job, retried while serve is down; its id. A POST whose answer a kill lost may
    /// have stored a job all the same: the run lists the jobs at the end and checks them all.
    async fn submit(&self, body: &Value) -> anyhow::Result<String> {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let sent = self
                .http
                .post(self.api("/v1/generations"))
                .header("x-api-key", API_KEY)
                .json(body)
                .send()
                .await;
            if let Ok(r) = sent {
                let status = r.status();
                if status.is_success() {
                    let v: Value = r.json().await.context("job answer")?;
                    return v
                        .pointer("/job/job_id")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .with_context(|| format!("no job id in {v}"));
                }
                if !status.is_server_error() {
                    bail!(
                        "POST /v1/generations: HTTP {status}: {}",
                        r.text().await.unwrap_or_default()
                    );
                }
            }
            if Instant::now() > until {
                bail!("POST /v1/generations: serve did not take the job for two minutes");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Final rows of a job report (done, mismatch, failed).
fn final_rows(report: &Value) -> u64 {
    ["done", "mismatch", "failed"]
        .iter()
        .map(|k| {
            report
                .pointer(&format!("/counts/{k}"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        })
        .sum()
}

fn is_finished(report: &Value) -> bool {
    report.pointer("/job/status").and_then(Value::as_str) == Some("finished")
}

/// The job's `generation.job.finished` delivery, when recorded.
fn job_delivery<'a>(deliveries: &'a [Value], job_id: &str) -> Option<&'a Value> {
    deliveries.iter().find(|d| {
        d["job_id"].as_str() == Some(job_id)
            && d["event"].as_str() == Some("generation.job.finished")
    })
}

async fn all_deliveries(run: &Run) -> anyhow::Result<Vec<Value>> {
    let v = run
        .get_retrying("/v1/webhooks/deliveries?limit=1000")
        .await?;
    Ok(v["deliveries"].as_array().cloned().unwrap_or_default())
}

async fn all_jobs(run: &Run) -> anyhow::Result<Vec<String>> {
    let v = run.get_retrying("/v1/generations?limit=1000").await?;
    Ok(v["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .filter_map(|j| j["job_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// One kill of serve.
#[derive(Debug, Clone, serde::Serialize)]
struct KillEvent {
    n: usize,
    at_s: f64,
    /// Final rows of jobs A and B at the kill.
    final_rows: u64,
    down_ms: u64,
    ready_after_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Run the whole thing; `Ok(true)` when every invariant held.
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    opts.validate()?;
    let n = opts.row_count();
    let kills_planned = opts.kill_count();
    let rows = plan_rows(&opts);
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

    let sim_cfg = sim_config(&opts);
    let sim = SimServer::start(sim_cfg.clone()).await?;
    // A's receiver fails three times, then takes it; B's answers 410 (stop) to every attempt.
    let hook_a = WebhookReceiver::start(vec![500, 503, 500]).await?;
    let hook_b = WebhookReceiver::start(vec![410; 64]).await?;
    let port = free_port()?;
    let log_level = std::env::var("SIGHTLINE_LOG").unwrap_or_else(|_| "warn".into());
    let env: Vec<(String, String)> = [
        ("OPENAI_API_KEY", SIM_KEY.to_string()),
        ("OPENAI_BASE_URL", sim.base_url.clone()),
        ("SIGHTLINE_PROVIDER", "openai".into()),
        ("SIGHTLINE_MODEL", CHECK_MODEL.into()),
        ("SIGHTLINE_RPM", opts.rpm.to_string()),
        ("SIGHTLINE_TPM", "0".into()),
        ("SIGHTLINE_GENERATION_IPM", opts.rpm.to_string()),
        ("SIGHTLINE_WORKERS", opts.workers.to_string()),
        (
            "SIGHTLINE_TIMEOUT_SECS",
            opts.provider_timeout_secs.to_string(),
        ),
        ("SIGHTLINE_RECONCILE_EVERY_SECS", "2".into()),
        ("SIGHTLINE_RECONCILE_AFTER_SECS", "5".into()),
        ("SIGHTLINE_STUCK_AFTER_SECS", "60".into()),
        ("SIGHTLINE_WEBHOOK_SECRET", SECRET.into()),
        // 5 s, 5 min, 30 min… become 5 ms, 0.3 s, 1.8 s…
        ("SIGHTLINE_WEBHOOK_RETRY_SCALE", "0.001".into()),
        ("SIGHTLINE_LOG", log_level),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .build()?;
    let run = Run {
        serve: Serve::new(bin, port, data_dir.clone(), log.clone(), env),
        http,
        started: Instant::now(),
    };
    run.serve.start(&run.http).await?;
    eprintln!(
        "gen-fault-run: serve on 127.0.0.1:{port} (data {}), simulator at {}; {n} rows × 2 jobs, {kills_planned} kills, seed {}",
        data_dir.display(),
        sim.base_url,
        opts.seed
    );

    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x6E11_F0A7);
    // Kill moments as fractions of A's and B's rows final.
    let mut marks: Vec<f64> = (0..kills_planned)
        .map(|_| rng.gen_range(0.05..0.85))
        .collect();
    marks.sort_by(f64::total_cmp);
    let mut marks = marks.into_iter().peekable();
    let mut kills: Vec<KillEvent> = Vec::new();

    let job_a = run.submit(&job_body(&rows, &hook_a.url)).await?;
    eprintln!("gen-fault-run: {:>6.1}s  job A {job_a}", run.elapsed_s());
    let mut job_b: Option<String> = None;
    let planned_rows = 2 * n as u64;
    let deadline = run.started + Duration::from_secs(opts.timeout_secs);
    let mut last_progress = (0u64, Instant::now());
    let mut last_ready = Instant::now();
    let mut last_print = Instant::now();
    let wait_end: &'static str;
    loop {
        let mut done_rows = 0u64;
        let mut finished = 0usize;
        let mut fraction_a = 0.0;
        for (label, id) in [("A", Some(&job_a)), ("B", job_b.as_ref())] {
            let Some(id) = id else { continue };
            if let Some(report) = run.get(&format!("/v1/generations/{id}")).await? {
                let f = final_rows(&report);
                done_rows += f;
                finished += usize::from(is_finished(&report));
                if label == "A" {
                    fraction_a = f as f64 / n as f64;
                }
            }
        }
        if done_rows != last_progress.0 {
            last_progress = (done_rows, Instant::now());
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "gen-fault-run: {:>6.1}s  rows final {done_rows} of {planned_rows}, kills {}",
                run.elapsed_s(),
                kills.len()
            );
        }
        if job_b.is_none() && fraction_a >= 0.25 {
            let id = run.submit(&job_body(&rows, &hook_b.url)).await?;
            eprintln!("gen-fault-run: {:>6.1}s  job B {id}", run.elapsed_s());
            job_b = Some(id);
            continue;
        }
        let fraction = done_rows as f64 / planned_rows as f64;
        let rested = last_ready.elapsed() >= Duration::from_millis(1500);
        if let Some(&mark) = marks.peek() {
            if job_b.is_some() && fraction >= mark && rested {
                marks.next();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
                let at_s = run.elapsed_s();
                run.serve.kill();
                let down = Duration::from_millis(rng.gen_range(200..=2000));
                eprintln!(
                    "gen-fault-run: {at_s:>6.1}s  SIGKILL #{} (rows final {done_rows}); restarting in {} ms",
                    kills.len() + 1,
                    down.as_millis()
                );
                tokio::time::sleep(down).await;
                let ready = run.serve.start(&run.http).await?;
                last_ready = Instant::now();
                kills.push(KillEvent {
                    n: kills.len() + 1,
                    at_s,
                    final_rows: done_rows,
                    down_ms: down.as_millis() as u64,
                    ready_after_ms: ready.as_millis() as u64,
                });
                continue;
            }
        }
        if job_b.is_some() && finished == 2 && marks.peek().is_none() {
            // Every job's webhook delivered or stopped (a kill can lose an answer between
            // POST and record: those jobs are in the list too).
            let deliveries = all_deliveries(&run).await?;
            let jobs = all_jobs(&run).await?;
            let settled = jobs.iter().all(|j| {
                job_delivery(&deliveries, j)
                    .is_some_and(|d| d["status"].as_str() != Some("pending"))
            });
            if settled {
                wait_end = "all final";
                break;
            }
        }
        if Instant::now() > deadline {
            wait_end = "timeout";
            break;
        }
        if last_progress.1.elapsed() > Duration::from_secs(opts.stall_secs) {
            wait_end = "stalled";
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let race_s = run.elapsed_s();
    eprintln!("gen-fault-run: {race_s:>6.1}s  jobs A and B: {wait_end}");

    // The rerun: the same rows once more, with no kill: nothing may be paid.
    let stats_before_c = sim.stats().await;
    let ledger_before_c = run.get_retrying("/v1/costs").await?;
    let mut job_c: Option<String> = None;
    let mut c_end = "not run";
    if wait_end == "all final" {
        let id = run.submit(&job_body(&rows, &hook_a.url)).await?;
        eprintln!(
            "gen-fault-run: {:>6.1}s  job C (rerun) {id}",
            run.elapsed_s()
        );
        let until = Instant::now() + Duration::from_secs(600);
        c_end = "timeout";
        while Instant::now() < until {
            let report = run.get_retrying(&format!("/v1/generations/{id}")).await?;
            if is_finished(&report) {
                let deliveries = all_deliveries(&run).await?;
                if job_delivery(&deliveries, &id)
                    .is_some_and(|d| d["status"].as_str() != Some("pending"))
                {
                    c_end = "all final";
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        job_c = Some(id);
    }
    let wall_s = run.elapsed_s();

    // Collect.
    let job_ids = all_jobs(&run).await?;
    let mut reports: BTreeMap<String, Value> = BTreeMap::new();
    for id in &job_ids {
        reports.insert(
            id.clone(),
            run.get_retrying(&format!("/v1/generations/{id}")).await?,
        );
    }
    let costs = run.get_retrying("/v1/costs").await?;
    let deliveries = all_deliveries(&run).await?;
    let stats = sim.stats().await;
    run.serve.shutdown();
    let (warns, errors, top_logs) = log_summary(&log);

    let named = Named {
        a: job_a,
        b: job_b,
        c: job_c,
    };
    let inputs = Inputs {
        opts: &opts,
        rows: &rows,
        named: &named,
        reports: &reports,
        costs: &costs,
        ledger_before_c: &ledger_before_c,
        deliveries: &deliveries,
        hook_a: &hook_a,
        hook_b: &hook_b,
        stats: &stats,
        stats_before_c: &stats_before_c,
        kills: &kills,
        wait_end,
        c_end,
        race_s,
        wall_s,
    };
    let report = evaluate(&inputs);
    let mut table = report.table;
    let _ = writeln!(
        table,
        "serve log: {warns} WARN, {errors} ERROR lines ({}); most frequent:",
        log.display()
    );
    for (msg, count) in &top_logs {
        let _ = writeln!(table, "  {count:>6} × {msg}");
    }
    eprint!("{table}");
    if let Some(path) = &opts.report {
        let mut json = report.json;
        json["serve_log"] = json!({"warn": warns, "error": errors, "top": top_logs});
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.passed)
}

// ---------------------------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------------------------

struct Named {
    a: String,
    b: Option<String>,
    c: Option<String>,
}

struct Inputs<'a> {
    opts: &'a Options,
    rows: &'a [(Value, Expect)],
    named: &'a Named,
    reports: &'a BTreeMap<String, Value>,
    costs: &'a Value,
    ledger_before_c: &'a Value,
    deliveries: &'a [Value],
    hook_a: &'a WebhookReceiver,
    hook_b: &'a WebhookReceiver,
    stats: &'a SimStats,
    stats_before_c: &'a SimStats,
    kills: &'a [KillEvent],
    wait_end: &'static str,
    c_end: &'static str,
    race_s: f64,
    wall_s: f64,
}

struct Report {
    passed: bool,
    table: String,
    json: Value,
}

fn f64_at(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer).and_then(Value::as_f64).unwrap_or(0.0)
}

fn u64_at(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// Why a row that should have been generated ended failed anyway, if the retry policy allows
/// it: two unusable answers in a row are permanent (as in the analysis lane).
fn allowed_failure(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("invalid")
        || e.contains("unusable")
        || e.contains("not json")
        || e.contains("provider response")
        || e.contains("does not decode")
}

fn evaluate(x: &Inputs<'_>) -> Report {
    let o = x.opts;
    let mut inv: Vec<Invariant> = Vec::new();
    let rows_by_number: BTreeMap<u64, &(Value, Expect)> = x
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| (i as u64 + 1, r))
        .collect();
    let kills_done = x.kills.len() as u64;
    // A call in flight at a kill may be paid at the provider and never booked.
    let lost_bound = kills_done * o.workers as u64 * 2;

    // --- 1. every job finished, every row final --------------------------------------------
    let unfinished: Vec<String> = x
        .reports
        .iter()
        .filter(|(_, r)| !is_finished(r))
        .map(|(id, r)| {
            format!(
                "{id} ({} of {} final)",
                final_rows(r),
                u64_at(r, "/counts/total")
            )
        })
        .collect();
    let jobs_expected = 2 + usize::from(x.named.c.is_some());
    let ok1 = unfinished.is_empty()
        && x.wait_end == "all final"
        && x.c_end == "all final"
        && x.reports.len() >= jobs_expected;
    inv.push(Invariant {
        id: 1,
        name: "every job finished, every row final",
        passed: Some(ok1),
        detail: format!(
            "{} jobs ({} posted; {} more stored by POSTs whose answer a kill lost); A and B: {}; \
             rerun: {}; unfinished: {:?}",
            x.reports.len(),
            jobs_expected,
            x.reports.len().saturating_sub(jobs_expected),
            x.wait_end,
            x.c_end,
            unfinished
        ),
    });

    // --- 2. every row ended as planned -------------------------------------------------------
    let mut wrong: Vec<String> = Vec::new();
    let mut policy_failures = 0u64;
    // Rows A, B (or a job a lost answer stored) failed by policy: the rerun may pay for those.
    let mut policy_failed_rows: BTreeSet<u64> = BTreeSet::new();
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (id, report) in x.reports {
        for r in report["rows"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let number = r["row"].as_u64().unwrap_or(0);
            let status = r["status"].as_str().unwrap_or("?");
            let error = r["error"].as_str().unwrap_or("");
            let Some((_, expect)) = rows_by_number.get(&number) else {
                wrong.push(format!("{id} row {number}: not a planned row"));
                continue;
            };
            let ok = match (expect, status) {
                (Expect::Done, "done") => r.pointer("/check/matches") == Some(&json!(true)),
                (Expect::Done, "failed") if allowed_failure(error) => {
                    policy_failures += 1;
                    if x.named.c.as_deref() != Some(id.as_str()) {
                        policy_failed_rows.insert(number);
                    }
                    true
                }
                (Expect::Refused, "failed") => error.contains("safety system"),
                (Expect::Mismatch, "mismatch") => r["attempt"].as_u64() == Some(2),
                _ => false,
            };
            *outcomes
                .entry(match expect {
                    Expect::Done => "planned done",
                    Expect::Refused => "planned refused",
                    Expect::Mismatch => "planned mismatch",
                })
                .or_default() += 1;
            if !ok {
                wrong.push(format!("{id} row {number}: {status} {error}"));
            }
        }
    }
    inv.push(Invariant {
        id: 2,
        name: "every row ended as planned (done and matching; refused; mismatch after one regeneration)",
        passed: Some(wrong.is_empty()),
        detail: format!(
            "rows {outcomes:?}; {policy_failures} failed after two unusable answers in a row \
             (permanent by the retry policy); wrong: {} {:?}",
            wrong.len(),
            wrong.iter().take(5).collect::<Vec<_>>()
        ),
    });

    // --- 3. one paid image per idempotency key -----------------------------------------------
    let s = x.stats;
    let mut extra_images = 0u64;
    let mut over: Vec<String> = Vec::new();
    let mut missing = 0u64;
    for (row, expect) in x.rows {
        let prompt = prompt_of(row);
        let got = s
            .images
            .usable_per_prompt
            .get(&prompt)
            .copied()
            .unwrap_or(0);
        let want = expect.images();
        if got > want {
            extra_images += got - want;
            over.push(format!("{prompt:?}: {got} (want {want})"));
        } else if got < want {
            missing += want - got;
        }
    }
    // Rows whose current image was generated for them, not reused: one per key across every
    // job (a regenerated row's image is its second key's).
    let generated_rows_per_key: BTreeMap<String, u64> = {
        let mut m = BTreeMap::new();
        for report in x.reports.values() {
            for r in report["rows"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let delivered = matches!(r["status"].as_str(), Some("done" | "mismatch"));
                if delivered && r["reused"].as_bool() == Some(false) {
                    let prompt = r
                        .pointer("/request/prompt")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    *m.entry(prompt.to_string()).or_default() += 1;
                }
            }
        }
        m
    };
    let keys_generated_twice: Vec<&String> = generated_rows_per_key
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    let ok3 = extra_images <= lost_bound && keys_generated_twice.is_empty();
    inv.push(Invariant {
        id: 3,
        name: "one paid image per idempotency key across the racing jobs and the rerun",
        passed: Some(ok3),
        detail: format!(
            "usable images beyond one per key (two for regenerated rows): {extra_images} \
             (allowed 0..={lost_bound}: calls in flight at {kills_done} kills); {missing} \
             fewer than planned (rows failed by policy); keys whose image more than one row \
             generated: {} {:?}; over: {:?}",
            keys_generated_twice.len(),
            keys_generated_twice.iter().take(3).collect::<Vec<_>>(),
            over.iter().take(3).collect::<Vec<_>>()
        ),
    });

    // --- 4. ledger = Σ jobs ----------------------------------------------------------------------
    let sum_gen: f64 = x
        .reports
        .values()
        .map(|r| f64_at(r, "/generation_cost_usd"))
        .sum();
    let sum_ana: f64 = x
        .reports
        .values()
        .map(|r| f64_at(r, "/analysis_cost_usd"))
        .sum();
    let ledger_gen = f64_at(x.costs, "/by_kind/generation/cost_usd");
    let ledger_ana = f64_at(x.costs, "/by_kind/analysis/cost_usd");
    let ledger_total = f64_at(x.costs, "/total/cost_usd");
    let ok4 = (ledger_gen - sum_gen).abs() < 1e-6
        && (ledger_ana - sum_ana).abs() < 1e-6
        && (ledger_total - sum_gen - sum_ana).abs() < 1e-6;
    inv.push(Invariant {
        id: 4,
        name: "ledger = Σ jobs' generation + analysis costs",
        passed: Some(ok4),
        detail: format!(
            "generation: ledger ${ledger_gen:.6} vs Σ jobs ${sum_gen:.6}; analysis: ledger \
             ${ledger_ana:.6} vs Σ jobs ${sum_ana:.6}; total ${ledger_total:.6}"
        ),
    });

    // --- 5. paid calls − lost to kills = booked calls -------------------------------------------
    let image_billed = s.images.billed;
    let image_booked = u64_at(x.costs, "/by_kind/generation/calls");
    // The chat route's paid calls: all the simulator's paid calls but the image route's
    // unusable 200s (the fault counters are shared by the routes).
    let chat_billed = billed_calls(s).saturating_sub(s.images.billed - s.images.images);
    let chat_booked = u64_at(x.costs, "/by_kind/analysis/calls");
    let lost_images = image_billed as i64 - image_booked as i64;
    let lost_chat = chat_billed as i64 - chat_booked as i64;
    let ok5 = (0..=lost_bound as i64).contains(&lost_images)
        && (0..=lost_bound as i64).contains(&lost_chat);
    inv.push(Invariant {
        id: 5,
        name: "paid calls − lost to kills = booked calls (images and checks)",
        passed: Some(ok5),
        detail: format!(
            "images: simulator paid {image_billed} ({} usable, {} cut), ledger {image_booked}, \
             lost {lost_images}; checks: simulator paid {chat_billed}, ledger {chat_booked}, \
             lost {lost_chat}; allowed 0..={lost_bound} each (kills {kills_done} × workers {} × 2)",
            s.images.images,
            s.images.billed - s.images.images,
            o.workers
        ),
    });

    // --- 6. the rerun pays nothing ---------------------------------------------------------------
    let c_report = x.named.c.as_ref().and_then(|c| x.reports.get(c));
    let before = x.stats_before_c;
    // A refusal is not remembered: the rerun asks once more for each refused row (a 400,
    // unpaid), and for nothing else.
    let refused_rows = x.rows.iter().filter(|(_, e)| *e == Expect::Refused).count() as u64;
    let c_image_calls = s.images.requests - before.images.requests;
    let c_image_paid = s.images.billed - before.images.billed;
    let c_chat_calls = s.requests - before.requests;
    let ledger_moved =
        (f64_at(x.costs, "/total/cost_usd") - f64_at(x.ledger_before_c, "/total/cost_usd")).abs();
    // Rows of the rerun that paid: only rows that failed by policy before may.
    let c_paid_rows: Vec<u64> = c_report
        .and_then(|r| r["rows"].as_array())
        .map(|rows| {
            rows.iter()
                .filter(|r| r["generation_cost_usd"].as_f64().unwrap_or(0.0) > 0.0)
                .filter_map(|r| r["row"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    let c_cost = c_report
        .map(|r| f64_at(r, "/generation_cost_usd") + f64_at(r, "/analysis_cost_usd"))
        .unwrap_or(0.0);
    let unexpected_paid: Vec<&u64> = c_paid_rows
        .iter()
        .filter(|r| !policy_failed_rows.contains(r))
        .collect();
    let ok6 = c_report.is_some_and(|r| u64_at(r, "/counts/failed") >= refused_rows)
        && unexpected_paid.is_empty()
        && if policy_failed_rows.is_empty() {
            c_cost == 0.0
                && c_image_paid == 0
                && c_image_calls <= refused_rows
                && c_chat_calls == 0
                && ledger_moved < 1e-9
        } else {
            (ledger_moved - c_cost).abs() < 1e-6
        };
    inv.push(Invariant {
        id: 6,
        name: "the same rows again pay nothing (no call, ledger unchanged)",
        passed: Some(ok6),
        detail: match c_report {
            Some(r) => format!(
                "rerun: counts {}; generation ${:.6}, analysis ${:.6}; image calls \
                 {c_image_calls} (the {refused_rows} refused rows asked again), paid \
                 {c_image_paid}; chat calls {c_chat_calls}; ledger moved ${ledger_moved:.6}; \
                 rows paid again {c_paid_rows:?} (allowed: {policy_failed_rows:?}, failed by \
                 policy before)",
                r["counts"],
                f64_at(r, "/generation_cost_usd"),
                f64_at(r, "/analysis_cost_usd")
            ),
            None => "the rerun did not run (jobs A and B did not end)".into(),
        },
    });

    // --- 7. webhooks: signed, delivered through failures, stopped by 410 ---------------------
    let secret = WebhookSecret::parse(SECRET).ok();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut problems: Vec<String> = Vec::new();
    let mut attempts_a = 0usize;
    for (receiver, label) in [(x.hook_a, "A"), (x.hook_b, "B")] {
        for d in receiver.deliveries() {
            if label == "A" {
                attempts_a += 1;
            }
            let pairs = d.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            let verified = secret.as_ref().map(|s| {
                s.verify(
                    &ReceivedHeaders::from_pairs(pairs),
                    &d.body,
                    now,
                    DEFAULT_TOLERANCE,
                )
            });
            if !matches!(verified, Some(Ok(()))) {
                problems.push(format!(
                    "receiver {label}: a delivery does not verify: {verified:?}"
                ));
            }
        }
    }
    let received = |receiver: &WebhookReceiver, job: &str| -> Vec<(String, u16)> {
        receiver
            .deliveries()
            .iter()
            .filter_map(|d| {
                let body: Value = serde_json::from_slice(&d.body).ok()?;
                (body.pointer("/data/job_id").and_then(Value::as_str) == Some(job))
                    .then(|| (d.header("webhook-id").unwrap_or("").to_string(), d.answered))
            })
            .collect()
    };
    let mut gone_attempts = 0usize;
    for id in x.reports.keys() {
        let to_b = x.named.b.as_deref() == Some(id.as_str());
        let (receiver, want) = if to_b {
            (x.hook_b, "gone")
        } else {
            (x.hook_a, "delivered")
        };
        let got = received(receiver, id);
        let ids: BTreeSet<&String> = got.iter().map(|(i, _)| i).collect();
        if ids.len() != 1 {
            problems.push(format!("job {id}: webhook ids {ids:?}"));
        }
        let status = job_delivery(x.deliveries, id).and_then(|d| d["status"].as_str());
        if status != Some(want) {
            problems.push(format!("job {id}: delivery {status:?}, want {want}"));
        }
        if to_b {
            gone_attempts = got.len();
            // One 410 ends it; a kill between the answer and its record may send once more.
            if got.is_empty() || got.len() as u64 > 1 + kills_done {
                problems.push(format!(
                    "job {id}: {} attempts to the 410 receiver",
                    got.len()
                ));
            }
        } else if !got.iter().any(|(_, status)| (200..300).contains(status)) {
            problems.push(format!("job {id}: no 2xx among {} attempts", got.len()));
        }
    }
    inv.push(Invariant {
        id: 7,
        name: "webhooks signed and verified, delivered through 3 failures, stopped by a 410",
        passed: Some(problems.is_empty()),
        detail: format!(
            "{attempts_a} attempts to receiver A (500, 503, 500, then 200s), {gone_attempts} to \
             the 410 receiver; problems: {problems:?}"
        ),
    });

    // --- 8. throughput (reported) ----------------------------------------------------------------
    let ideal_s = (s.images.billed + chat_billed) as f64 * 60.0 / o.rpm as f64;
    inv.push(Invariant {
        id: 8,
        name: "wall time (reported)",
        passed: None,
        detail: format!(
            "jobs A and B {:.1} s, whole run {:.1} s; the paid calls alone need {ideal_s:.1} s \
             at {} RPM; kills at {:?} s",
            x.race_s,
            x.wall_s,
            o.rpm,
            x.kills
                .iter()
                .map(|k| (k.at_s * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        ),
    });

    let passed = inv.iter().all(|i| i.passed != Some(false));
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\ngen-fault-run: {} rows × 2 racing jobs + a rerun, {} kills, seed {}",
        o.row_count(),
        kills_done,
        o.seed
    );
    for i in &inv {
        let mark = match i.passed {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "info",
        };
        let _ = writeln!(
            table,
            "{:>2}. [{mark}] {}\n      {}",
            i.id, i.name, i.detail
        );
    }
    let _ = writeln!(
        table,
        "simulator: images {} requests, {} usable, {} refused, faults {:?}; chat {} requests",
        s.images.requests, s.images.images, s.images.refused, s.faults, s.requests
    );
    let json = json!({
        "passed": passed,
        "rows": o.row_count(),
        "seed": o.seed,
        "kills": x.kills,
        "job_ids": { "a": x.named.a, "b": x.named.b, "rerun": x.named.c },
        "invariants": inv.iter().map(|i| json!({
            "id": i.id, "name": i.name, "passed": i.passed, "detail": i.detail,
        })).collect::<Vec<_>>(),
        "jobs": x.reports.iter().map(|(id, r)| json!({
            "job_id": id,
            "counts": r["counts"],
            "generation_cost_usd": r["generation_cost_usd"],
            "analysis_cost_usd": r["analysis_cost_usd"],
        })).collect::<Vec<_>>(),
        "costs": { "total": x.costs["total"], "by_kind": x.costs["by_kind"] },
        "simulator": x.stats,
        "race_s": x.race_s,
        "wall_s": x.wall_s,
    });
    Report {
        passed,
        table,
        json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(rows: usize) -> Options {
        Options::parse_from(["gen-fault-run", "--rows", &rows.to_string()])
    }

    #[test]
    fn planned_rows_mark_every_nth_refused_and_mismatched_and_render_distinct_prompts() {
        let rows = plan_rows(&opts(200));
        assert_eq!(rows.len(), 200);
        let count = |e: Expect| rows.iter().filter(|(_, x)| *x == e).count();
        assert_eq!(count(Expect::Refused), 2, "rows 97 and 194");
        assert_eq!(count(Expect::Mismatch), 3, "rows 53, 106, 159");
        assert!(prompt_of(&rows[96].0).contains(REFUSE_MARKER));
        assert!(prompt_of(&rows[52].0).contains("[mismatch]"));
        let prompts: BTreeSet<String> = rows.iter().map(|(r, _)| prompt_of(r)).collect();
        assert_eq!(prompts.len(), 200, "one idempotency key per row");
        assert_eq!(
            prompt_of(&rows[0].0),
            "A studio photo of lamp 1 in colour 1"
        );
    }

    #[test]
    fn the_job_body_carries_the_template_rows_and_webhook() {
        let rows = plan_rows(&opts(3));
        let body = job_body(&rows, "http://127.0.0.1:9/hook");
        assert_eq!(body["template"]["prompt"], PROMPT);
        assert_eq!(body["template"]["model"], IMAGE_MODEL);
        assert_eq!(body["rows"].as_array().map(Vec::len), Some(3));
        assert_eq!(body["rows"][2]["sku"], "SKU-3");
        assert_eq!(body["webhook_url"], "http://127.0.0.1:9/hook");
    }

    #[test]
    fn only_unusable_answers_excuse_a_failed_row() {
        assert!(allowed_failure(
            "invalid image from the provider: not a PNG"
        ));
        assert!(!allowed_failure("budget exceeded"));
        assert!(!allowed_failure("gave up after 6 attempts"));
    }
}
