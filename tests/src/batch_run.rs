//! The batch lane end to end against the provider simulator's batch APIs, on any adapters:
//! images recorded for the batch lane go through refused batches (validation, the
//! enqueued-token limit), per-line errors, expiry with part of the lines done and shuffled
//! output, under two pollers at once, with the real-time lane taking what used up its batch
//! attempts. Then the invariants: every image ends, the provider's billed lines equal the
//! ledger's, the ledger equals the results, batch prices are used, and polling again books
//! nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use sightline_core::model::{ImageStatus, Lane};
use sightline_core::pricing::PriceTable;
use sightline_pipeline::analyze::{AnalyzeOutcome, Analyzer};
use sightline_pipeline::batch::{BatchLane, TickReport};
use sightline_pipeline::ingest::{Ingest, IngestOutcome};
use sightline_pipeline::ports::{
    BatchProvider, BatchState, BatchStore, BlobStore, Clock, CostRow, Queue, Repository,
    SystemClock, VisionProvider,
};
use sightline_pipeline::Settings;

use crate::fault_run::{billed_calls, make_image};
use crate::sim::{BatchConfig, SimConfig, SimServer};

/// The adapters a run uses.
#[derive(Clone)]
pub struct Stack {
    pub blobs: Arc<dyn BlobStore>,
    pub repo: Arc<dyn Repository>,
    pub store: Arc<dyn BatchStore>,
    pub queue: Arc<dyn Queue>,
}

/// One tick of the batch lane as the runtime under test runs it (the local loop calls
/// `BatchLane::tick`; on AWS the batch Lambda's handler does).
pub type Tick = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = anyhow::Result<TickReport>> + Send>,
        > + Send
        + Sync,
>;

/// What a run saw, for the report and the assertions.
#[derive(Debug, Default)]
pub struct Outcome {
    pub images: usize,
    pub done: usize,
    pub failed: usize,
    pub failure_reasons: BTreeMap<String, usize>,
    pub batches: usize,
    /// Batches the provider refused (validation or the enqueued-token limit), and the errors
    /// of failed batches by kind.
    pub batches_refused: usize,
    pub token_limit_refusals: usize,
    pub batch_errors: BTreeMap<String, usize>,
    pub sim_batch_lines_billed: u64,
    pub ledger_batch_calls: u64,
    pub sim_realtime_billed: u64,
    pub ledger_realtime_calls: u64,
    pub ledger_cost: f64,
    pub results_cost: f64,
    pub results_fetches: u64,
    pub elapsed: Duration,
}

pub const TENANT: &str = "acme";

/// The simulator's batch faults of a run (validation refusals are switched on for the first
/// round by the run itself).
pub fn batch_faults() -> BatchConfig {
    BatchConfig {
        delay_ms: 150,
        transient_error_rate: 0.04,
        permanent_error_rate: 0.02,
        invalid_output_rate: 0.03,
        shuffle: true,
        ..BatchConfig::default()
    }
}

/// Settings of a run against `sim` (batches of 50: 300 images make 6 per round), for
/// `provider` `openai` (gpt-4.1-mini) or `anthropic` (claude-haiku-4-5).
pub fn settings(sim: &SimServer, provider: &str) -> Settings {
    let mut s = Settings::default();
    s.set("provider", provider, "test").ok();
    s.openai_base_url = sim.url("/v1");
    s.anthropic_base_url = sim.url("");
    s.model = if provider == "anthropic" {
        "claude-haiku-4-5".into()
    } else {
        "gpt-4.1-mini".into()
    };
    s.lane = Lane::Batch;
    s.batch_max_requests = 50;
    s.batch_attempts = 4;
    s.batch_poll_every = Duration::from_millis(100);
    s.max_receives = 5;
    s.provider_timeout = Duration::from_secs(20);
    s
}

/// The local `BatchLane` tick (what `serve` and `run --wait` call).
pub fn lane_tick(lane: BatchLane) -> Tick {
    Arc::new(move || {
        let lane = lane.clone();
        Box::pin(async move { Ok(lane.tick(true).await?) })
    })
}

/// Record `n` images for the batch lane, run until every one is final, then check. With
/// `two_pollers`, every round runs two ticks at once (as two overlapping schedules would).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    n: usize,
    two_pollers: bool,
    stack: Stack,
    sim: &SimServer,
    settings: Arc<Settings>,
    provider: Arc<dyn VisionProvider>,
    batch_provider: Arc<dyn BatchProvider>,
    tick: Tick,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ingest = Ingest::new(
        stack.blobs.clone(),
        stack.repo.clone(),
        stack.queue.clone(),
        settings.clone(),
        clock.clone(),
        sightline_core::keys::UPLOAD_PREFIX,
    );
    let analyzer = Analyzer::new(
        stack.blobs.clone(),
        stack.repo.clone(),
        provider,
        settings.clone(),
        clock.clone(),
    )
    .with_batches(stack.store.clone());
    let lane = BatchLane {
        blobs: stack.blobs.clone(),
        repo: stack.repo.clone(),
        store: stack.store.clone(),
        provider: batch_provider,
        queue: stack.queue.clone(),
        settings: settings.clone(),
        clock: clock.clone(),
        metrics: sightline_pipeline::metrics::no_metrics(),
        search: None,
    };
    let ids: Vec<String> = (0..n).map(|i| format!("b{i:04}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let img = make_image(i);
        let key = format!("uploads/{TENANT}/{id}");
        match ingest
            .ingest_bytes(TENANT, id, &img.filename, Some(&key), img.bytes)
            .await?
        {
            IngestOutcome::Queued(job) => ensure!(job.lane == Some(Lane::Batch), "lane"),
            other => bail!("{id} was not queued: {other:?}"),
        }
    }
    // First one tick under validation refusals (every batch it submits is refused), then the
    // enqueued-token limit and expiry (60% of the lines done) until round 8, then only line
    // faults.
    let mut cfg = sim.config().await;
    cfg.batch = BatchConfig {
        fail_validation: true,
        ..batch_faults()
    };
    sim.set_config(cfg.clone()).await?;
    drain(&analyzer, &*stack.queue).await?;
    let first = tick().await?;
    ensure!(
        first.batches_submitted + first.batches_failed > 0,
        "the first tick submitted nothing: {first:?}"
    );
    // About one batch of input tokens may be enqueued at once: of the batches sent together,
    // the rest are created and then fail on the limit. Batches run for 2 s meanwhile, so they
    // overlap however slowly the store lets the submitter create them.
    cfg.batch = BatchConfig {
        enqueued_token_limit: 15_000,
        expire_done_fraction: Some(0.6),
        delay_ms: 2_000,
        ..batch_faults()
    };
    sim.set_config(cfg.clone()).await?;
    let mut round = 0u32;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        drain(&analyzer, &*stack.queue).await?;
        let (a, b) = if two_pollers {
            let (a, b) = tokio::join!(tick(), tick());
            (a?, b?)
        } else {
            let a = tick().await?;
            (a, tick().await?)
        };
        round += 1;
        if round == 8 {
            cfg.batch = batch_faults();
            sim.set_config(cfg.clone()).await?;
        }
        let mut open = 0;
        for id in &ids {
            let r = stack.repo.get_image(TENANT, id).await?.context("record")?;
            if !r.status.is_final() {
                open += 1;
            }
        }
        if open == 0 && b.is_idle() && stack_queue_empty(&analyzer, &*stack.queue).await? {
            break;
        }
        if Instant::now() > deadline {
            bail!("{open} images still open after {round} rounds: {a:?} {b:?}");
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    // Polling every ended batch again (its results fetched again) books nothing.
    let before = ledger(&*stack.repo).await?;
    let batches = stack.store.list_batches(Some(TENANT), false, 1000).await?;
    for b in batches.iter().filter(|b| b.state == BatchState::Ended) {
        let mut report = TickReport::default();
        lane.reconcile(b.clone(), &mut report).await?;
        ensure!(
            report.lines_answered == 0,
            "a second reconciliation answered lines"
        );
    }
    if two_pollers {
        let (a, b) = tokio::join!(tick(), tick());
        a?;
        b?;
    } else {
        tick().await?;
        tick().await?;
    }
    let after = ledger(&*stack.repo).await?;
    ensure!(
        totals(&before) == totals(&after),
        "polling again changed the ledger: {:?} → {:?}",
        totals(&before),
        totals(&after)
    );
    outcome(n, &ids, &stack, sim, &after, &batches, started).await
}

/// Handle every visible job (the analyze worker's part): batch-lane jobs become items,
/// real-time ones (sent back after their batch attempts) are analysed now.
async fn drain(analyzer: &Analyzer, queue: &dyn Queue) -> anyhow::Result<()> {
    loop {
        let msgs = queue.receive(10, Duration::from_secs(60)).await?;
        if msgs.is_empty() {
            return Ok(());
        }
        for m in msgs {
            match analyzer.handle(&m.body, m.receive_count).await {
                AnalyzeOutcome::Retry { delay, .. } => {
                    queue
                        .retry_after(&m.receipt, delay.min(Duration::from_secs(1)))
                        .await?
                }
                _ => queue.delete(&m.receipt).await?,
            }
        }
    }
}

async fn stack_queue_empty(analyzer: &Analyzer, queue: &dyn Queue) -> anyhow::Result<bool> {
    drain(analyzer, queue).await?;
    Ok(queue.receive(1, Duration::from_millis(1)).await?.is_empty())
}

async fn ledger(repo: &dyn Repository) -> anyhow::Result<Vec<CostRow>> {
    Ok(repo.costs(TENANT, "0000-01-01", "9999-12-31").await?)
}

fn totals(rows: &[CostRow]) -> (u64, u64, u64, String) {
    (
        rows.iter().map(|r| r.calls).sum(),
        rows.iter().map(|r| r.batch_calls).sum(),
        rows.iter().map(|r| r.images).sum(),
        format!("{:.12}", rows.iter().map(|r| r.cost_usd).sum::<f64>()),
    )
}

async fn outcome(
    n: usize,
    ids: &[String],
    stack: &Stack,
    sim: &SimServer,
    rows: &[CostRow],
    batches: &[sightline_pipeline::ports::BatchRecord],
    started: Instant,
) -> anyhow::Result<Outcome> {
    let table = PriceTable::builtin();
    let mut o = Outcome {
        images: n,
        ..Outcome::default()
    };
    for id in ids {
        let r = stack.repo.get_image(TENANT, id).await?.context("record")?;
        match r.status {
            ImageStatus::Done => o.done += 1,
            ImageStatus::Failed => {
                o.failed += 1;
                let reason = r.error.clone().unwrap_or_default();
                ensure!(!reason.is_empty(), "{id} failed without a reason");
                let kind = reason.split(':').take(2).collect::<Vec<_>>().join(":");
                *o.failure_reasons.entry(kind).or_default() += 1;
            }
            other => bail!("{id} ended {other:?}"),
        }
        if let Some(x) = &r.extra_spend {
            o.results_cost += x.cost_usd;
        }
        if let Some(res) = &r.result {
            o.results_cost += res.cost_usd;
            if res.lane == Lane::Batch && !res.cached && !res.usage_estimated {
                let price = table.model(&res.model)?;
                let expected = price.batch_cost_usd(&res.usage);
                ensure!(
                    (res.cost_usd - expected).abs() < 1e-12,
                    "{id}: booked {} for a batch answer whose batch price is {expected}",
                    res.cost_usd
                );
            }
        }
    }
    let stats = sim.stats().await;
    o.sim_batch_lines_billed = stats.batch.lines_billed;
    o.results_fetches = stats.batch.results_fetches;
    o.sim_realtime_billed = billed_calls(&stats);
    o.ledger_batch_calls = rows.iter().map(|r| r.batch_calls).sum();
    o.ledger_realtime_calls = rows.iter().map(|r| r.calls).sum::<u64>() - o.ledger_batch_calls;
    o.ledger_cost = rows.iter().map(|r| r.cost_usd).sum();
    o.batches = batches.len();
    for b in batches.iter().filter(|b| b.state == BatchState::Failed) {
        let e = b.error.clone().unwrap_or_default();
        *o.batch_errors
            .entry(e.chars().take(48).collect())
            .or_default() += 1;
        if b.requests > 0 {
            o.batches_refused += 1;
        }
    }
    o.token_limit_refusals = batches
        .iter()
        .filter(|b| {
            b.error
                .as_deref()
                .is_some_and(|e| e.contains("token_limit_exceeded"))
        })
        .count();
    o.elapsed = started.elapsed();
    Ok(o)
}

impl Outcome {
    /// The invariants every run must hold (`token_limit`: the provider has an enqueued-token
    /// limit that must have refused some batch).
    pub fn check(&self, token_limit: bool) -> anyhow::Result<()> {
        ensure!(self.done + self.failed == self.images, "{self:?}");
        ensure!(
            self.sim_batch_lines_billed == self.ledger_batch_calls,
            "provider billed {} batch lines, the ledger booked {}",
            self.sim_batch_lines_billed,
            self.ledger_batch_calls
        );
        ensure!(
            self.sim_realtime_billed == self.ledger_realtime_calls,
            "provider billed {} real-time calls, the ledger booked {}",
            self.sim_realtime_billed,
            self.ledger_realtime_calls
        );
        ensure!(
            (self.ledger_cost - self.results_cost).abs() < 1e-9,
            "ledger ${} != results ${}",
            self.ledger_cost,
            self.results_cost
        );
        ensure!(self.batches_refused > 0, "no batch was refused: {self:?}");
        ensure!(
            !token_limit || self.token_limit_refusals > 0,
            "the token limit never bit: {self:?}"
        );
        Ok(())
    }
}

/// A simulator for a run: the default OpenAI answers, batch faults set by the run.
pub async fn start_sim() -> anyhow::Result<SimServer> {
    SimServer::start(SimConfig {
        seed: 7,
        // 2% of the images are refused by the provider whichever the lane (a permanent 400).
        faults: crate::sim::FaultPlan {
            poison_rate: 0.02,
            ..Default::default()
        },
        ..SimConfig::default()
    })
    .await
}
