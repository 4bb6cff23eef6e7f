//! sightline-reconcile: an EventBridge schedule → [`Reconciler::sweep`], in chunks.
//!
//! The sweep finishes what a crash left between two writes (see
//! `sightline_pipeline::reconcile`). It has no deadline of its own, so the handler calls it in
//! chunks of [`CHUNK`] images and starts no chunk with less than [`RESERVE`] left before the
//! invocation's deadline; after the first chunk, a chunk is also cut to what fits before the
//! reserve at the slowest pace seen (a chunk of lost uploads to resize is much slower than one of
//! rechecks to clear). It stops as well when `max` images were looked at
//! (`SIGHTLINE_RECONCILE_MAX`), when a chunk found fewer due images than it asked for, or when a
//! chunk did nothing but fail (the store is probably down; failing images are looked at again
//! after `reconcile_after`). What is left is due at the next scheduled run.
//!
//! A store error outside a single image (the query of due images) fails the invocation, so
//! Lambda retries the asynchronous invocation; every step of the sweep is idempotent.
//!
//! A manual invocation with `{"reindex": {"tenant": "acme", "all": false, "cursor": null}}` gives
//! the tenant's analysed images their vectors instead (`sightline reindex` on AWS): those missing
//! one, or all with `all` (after a change of embedding model), page by page until the reserve
//! before the deadline; the answer's `next_cursor`, when set, continues where it stopped.
//!
//! Each invocation writes its metrics as CloudWatch EMF lines: the lost uploads it resized
//! (images processed and failed, time per upload, each in a span with its key, tenant and
//! image id) and the jobs it sent again (`JobsRequeued`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use serde::Serialize;
use sightline_pipeline::aws::generation::GenerationSide;
use sightline_pipeline::delivery::{DeliveryReport, ATTEMPT_WORST_CASE, DELIVERY_CONCURRENCY};
use sightline_pipeline::generation::SweepReport as GenerationSweep;
use sightline_pipeline::metrics::emf::{Emf, EmfBatch};
use sightline_pipeline::metrics::{Metric, Recorder};
use sightline_pipeline::ports::StoreResult;
use sightline_pipeline::reconcile::{Reconciler, SweepReport};
use tracing::{info, warn};

/// The payload of the every-minute schedule: `{"task": "deliveries"}` attempts due webhook
/// deliveries only.
pub const DELIVERIES_TASK: &str = "deliveries";
/// Deliveries attempted per page.
pub const DELIVERY_PAGE: usize = 50;

/// Environment variable: most images one invocation looks at.
pub const MAX_ENV: &str = "SIGHTLINE_RECONCILE_MAX";
/// Default of [`MAX_ENV`].
pub const DEFAULT_MAX: usize = 1000;
/// Images per call of [`Reconciler::sweep`].
pub const CHUNK: usize = 100;
/// No chunk is started with less than this left before the deadline (a chunk runs its images
/// one after the other; a resize of a large upload takes seconds).
pub const RESERVE: Duration = Duration::from_secs(60);

/// `SIGHTLINE_RECONCILE_MAX` from the process environment.
pub fn max_from_env() -> anyhow::Result<usize> {
    max_from_lookup(&|k| std::env::var(k).ok())
}

/// `SIGHTLINE_RECONCILE_MAX` found by `get` (empty = unset): a whole number of at least 1.
pub fn max_from_lookup(get: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<usize> {
    let Some(v) = get(MAX_ENV)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
    else {
        return Ok(DEFAULT_MAX);
    };
    let n: usize = v
        .parse()
        .with_context(|| format!("{MAX_ENV}={v:?} is not a whole number"))?;
    if n == 0 {
        bail!("{MAX_ENV} must be at least 1");
    }
    Ok(n)
}

/// Why an invocation stopped starting chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The last chunk found fewer due images than it asked for: nothing else is due.
    Drained,
    /// `max` images were looked at.
    MaxReached,
    /// The last chunk only met images that failed again.
    NoProgress,
    /// Less than the reserve was left before the invocation's deadline.
    Deadline,
}

/// What one invocation did: the sweep reports of its chunks, summed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    #[serde(flatten)]
    pub report: SweepReport,
    /// Generation rows and jobs moved on (when generation jobs are on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generations: Option<GenerationSweep>,
    /// Webhook deliveries attempted (when generation jobs are on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<DeliveryReport>,
    /// Calls of [`Reconciler::sweep`].
    pub chunks: u32,
    pub stopped: Stop,
}

/// Images one sweep report accounts for.
fn looked_at(r: &SweepReport) -> u64 {
    r.resized + r.rejected + r.requeued + r.expired + r.settled + r.errors
}

/// Time per image of a chunk that looked at `seen` images in `elapsed`.
fn per_image(elapsed: Duration, seen: u64) -> Duration {
    if seen == 0 {
        return Duration::ZERO;
    }
    let nanos = elapsed.as_nanos() / u128::from(seen);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Images that fit in `spare` at `pace` (unbounded while the pace is unknown).
fn fitting(spare: Duration, pace: Duration) -> u64 {
    if pace.is_zero() {
        return u64::MAX;
    }
    u64::try_from(spare.as_nanos() / pace.as_nanos()).unwrap_or(u64::MAX)
}

/// A manual reindex request (the `reindex` member of the invocation's payload).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReindexRequest {
    pub tenant: String,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub cursor: Option<String>,
}

/// What a reindex invocation did; `next_cursor`: invoke again with it to go on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReindexRun {
    pub tenant: String,
    #[serde(flatten)]
    pub report: sightline_pipeline::search::ReindexReport,
    pub next_cursor: Option<String>,
}

/// Done images per reindex page.
pub const REINDEX_PAGE: usize = 50;

#[derive(Clone)]
pub struct ReconcileHandler {
    pub reconciler: Reconciler,
    /// Vectors and their embedder, for manual reindex runs (None: no vector bucket here).
    pub search: Option<Arc<sightline_pipeline::search::Search>>,
    /// Generation jobs and their webhooks (None: generation is off here).
    pub generation: Option<GenerationSide>,
    /// Most images looked at per invocation.
    pub max: usize,
    /// Images per sweep call.
    pub chunk: usize,
    /// Time that must be left before the deadline to start a chunk.
    pub reserve: Duration,
    /// Where each invocation's metrics are written (stdout in Lambda).
    pub emf: Emf,
}

impl ReconcileHandler {
    pub fn new(reconciler: Reconciler, max: usize) -> ReconcileHandler {
        ReconcileHandler {
            reconciler,
            search: None,
            generation: None,
            max,
            chunk: CHUNK,
            reserve: RESERVE,
            emf: Emf::lambda("reconcile"),
        }
    }

    /// Handle one invocation: a reindex request (`{"reindex": {...}}`) or else a sweep; the
    /// answer is the run's report as JSON.
    pub async fn handle_event(
        &self,
        event: serde_json::Value,
        deadline: Option<SystemTime>,
    ) -> anyhow::Result<serde_json::Value> {
        if let Some(request) = event.get("reindex") {
            let request: ReindexRequest = serde_json::from_value(request.clone()).context(
                "the reindex request: {\"tenant\": \"...\", \"all\": false, \"cursor\": null}",
            )?;
            let run = self
                .reindex(&request, || {
                    deadline.map(|d| {
                        d.duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO)
                    })
                })
                .await?;
            info!(?run, "reindex finished");
            return Ok(serde_json::to_value(run)?);
        }
        if event.get("task").and_then(|t| t.as_str()) == Some(DELIVERIES_TASK) {
            let report = self.deliver(deadline).await?;
            return Ok(serde_json::to_value(report)?);
        }
        Ok(serde_json::to_value(self.handle(event, deadline).await?)?)
    }

    /// Attempt due webhook deliveries, page by page, while no less than the reserve is left
    /// (the every-minute schedule; the sweep does it too).
    pub async fn deliver(&self, deadline: Option<SystemTime>) -> StoreResult<DeliveryReport> {
        let mut total = DeliveryReport::default();
        let Some(side) = &self.generation else {
            return Ok(total);
        };
        loop {
            // A page is what fits before the reserve even if every receiver hangs.
            let page = match deadline {
                None => DELIVERY_PAGE,
                Some(d) => {
                    let spare = d
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .saturating_sub(self.reserve);
                    let rounds = (spare.as_secs_f64() / ATTEMPT_WORST_CASE.as_secs_f64()) as usize;
                    DELIVERY_PAGE.min(rounds * DELIVERY_CONCURRENCY)
                }
            };
            if page == 0 {
                break;
            }
            let r = side.deliveries.deliver_due(page).await?;
            total.attempted += r.attempted;
            total.delivered += r.delivered;
            total.retrying += r.retrying;
            total.dead += r.dead;
            total.gone += r.gone;
            if (r.attempted as usize) < page {
                break;
            }
        }
        if total.attempted > 0 {
            info!(?total, "webhook deliveries attempted");
        }
        Ok(total)
    }

    /// Reindex page by page while no less than the reserve is left.
    pub async fn reindex(
        &self,
        request: &ReindexRequest,
        mut time_left: impl FnMut() -> Option<Duration>,
    ) -> anyhow::Result<ReindexRun> {
        let search = self
            .search
            .as_ref()
            .context("no vector store here (SIGHTLINE_VECTOR_BUCKET is not set)")?;
        let mut run = ReindexRun {
            tenant: request.tenant.clone(),
            report: Default::default(),
            next_cursor: request.cursor.clone(),
        };
        loop {
            if time_left().is_some_and(|t| t < self.reserve) {
                return Ok(run);
            }
            let (page, next) = search
                .reindex_page(
                    &request.tenant,
                    request.all,
                    run.next_cursor.as_deref(),
                    REINDEX_PAGE,
                )
                .await
                .map_err(|e| anyhow::anyhow!("reindex of {}: {e}", request.tenant))?;
            run.report.indexed += page.indexed;
            run.report.skipped += page.skipped;
            run.report.failed += page.failed;
            run.next_cursor = next;
            if run.next_cursor.is_none() {
                return Ok(run);
            }
        }
    }

    /// Handle one invocation (an EventBridge scheduled event, or any JSON for a manual run)
    /// that must end by `deadline` (the Lambda context's).
    pub async fn handle(
        &self,
        event: serde_json::Value,
        deadline: Option<SystemTime>,
    ) -> StoreResult<Run> {
        match serde_json::from_value::<EventBridgeEvent>(event) {
            Ok(e) => info!(
                event_id = e.id.as_deref().unwrap_or_default(),
                time = ?e.time,
                source = %e.source,
                detail_type = %e.detail_type,
                "scheduled reconcile"
            ),
            Err(_) => info!("reconcile invoked without an EventBridge event (manual run)"),
        }
        let batch = Arc::new(EmfBatch::default());
        let mut me = self.clone();
        me.reconciler.ingest.metrics = batch.clone();
        let run = me
            .run(|| {
                deadline.map(|d| {
                    d.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                })
            })
            .await;
        if let Ok(run) = &run {
            batch.record(Metric::JobsRequeued, None, run.report.requeued as f64);
        }
        self.emf.flush(&batch);
        let mut run = run?;
        if let Some(side) = &self.generation {
            // Rows whose analysis ended unseen, rows whose message was lost, jobs to finish;
            // then their webhooks.
            run.generations = Some(side.generations.sweep().await?);
            run.deliveries = Some(self.deliver(deadline).await?);
        }
        if run.report.errors > 0 {
            warn!(?run, "reconcile finished; some images failed and stay due");
        } else {
            info!(?run, "reconcile finished");
        }
        Ok(run)
    }

    /// Sweep in chunks while there is work, budget and time; `time_left` tells how long the
    /// invocation may still run (None: no deadline). After the first chunk, a chunk is also cut
    /// to what fits before the reserve at the slowest pace seen so far (resizes of large uploads
    /// take seconds each; settling a finished image takes milliseconds).
    pub async fn run(&self, mut time_left: impl FnMut() -> Option<Duration>) -> StoreResult<Run> {
        let chunk = self.chunk.max(1) as u64;
        let mut total = SweepReport::default();
        let mut looked = 0u64;
        let mut chunks = 0u32;
        // Time left before the last chunk, and the images it looked at.
        let mut last: Option<(Duration, u64)> = None;
        // Slowest time per image seen so far.
        let mut pace = Duration::ZERO;
        let stopped = loop {
            let left = (self.max as u64).saturating_sub(looked);
            if left == 0 {
                break Stop::MaxReached;
            }
            let mut want = chunk.min(left);
            let now_left = time_left();
            if let Some(t) = now_left {
                if let Some((before, seen)) = last {
                    pace = pace.max(per_image(before.saturating_sub(t), seen));
                }
                want = want.min(fitting(t.saturating_sub(self.reserve), pace));
                if t < self.reserve || want == 0 {
                    info!(
                        left_ms = t.as_millis() as u64,
                        pace_ms = pace.as_millis() as u64,
                        "stopping before the invocation deadline; the rest waits for the next run"
                    );
                    break Stop::Deadline;
                }
            }
            let r = self.reconciler.sweep(want as usize).await?;
            chunks += 1;
            let seen = looked_at(&r);
            last = now_left.map(|t| (t, seen));
            looked += seen;
            total.resized += r.resized;
            total.rejected += r.rejected;
            total.requeued += r.requeued;
            total.expired += r.expired;
            total.settled += r.settled;
            // A failing image is rescheduled after `reconcile_after`, so no later chunk of this
            // run meets it again: the errors of the chunks add up.
            total.errors += r.errors;
            if seen == r.errors {
                break if r.errors == 0 {
                    Stop::Drained
                } else {
                    Stop::NoProgress
                };
            }
            if seen < want {
                break Stop::Drained;
            }
        };
        Ok(Run {
            report: total,
            generations: None,
            deliveries: None,
            chunks,
            stopped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sightline_core::model::{ImageRecord, ImageSize, ImageStatus};
    use sightline_pipeline::ingest::Ingest;
    use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
    use sightline_pipeline::metrics::emf::MemoryLines;
    use sightline_pipeline::ports::{rfc3339, BlobStore, Clock, Queue, Repository, SystemClock};
    use sightline_pipeline::Settings;

    struct Fixture {
        _dir: tempfile::TempDir,
        blobs: Arc<FileBlobStore>,
        repo: Arc<SqliteRepository>,
        queue: Arc<SqliteQueue>,
        handler: ReconcileHandler,
        emf: Arc<MemoryLines>,
    }

    /// The Lambda's wiring over the local adapters: the repository does not hold the queue,
    /// so jobs are sent after the record is written (as with DynamoDB and SQS).
    fn fixture(chunk: usize, max: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteDb::in_memory().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let blobs = Arc::new(FileBlobStore::new(dir.path()));
        let repo = Arc::new(SqliteRepository::new(db.clone()));
        let queue = Arc::new(SqliteQueue::new(db, "analyze", 5, clock.clone()));
        let settings = Arc::new(Settings {
            pending_ttl: Duration::from_secs(60),
            ..Settings::default()
        });
        let ingest = Ingest::new(
            blobs.clone(),
            repo.clone(),
            queue.clone(),
            settings,
            clock,
            "uploads/",
        );
        let mut handler = ReconcileHandler::new(Reconciler::new(ingest), max);
        handler.chunk = chunk;
        let emf = Arc::new(MemoryLines::default());
        handler.emf = Emf::new("reconcile-fn", emf.clone());
        Fixture {
            _dir: dir,
            blobs,
            repo,
            queue,
            handler,
            emf,
        }
    }

    fn now_ms() -> u64 {
        SystemClock.now_ms()
    }

    /// A record with only what every record has (built from JSON, so fields added to the
    /// model later take their defaults).
    fn record(id: &str, status: ImageStatus, created_ms: u64) -> ImageRecord {
        let at = rfc3339(created_ms);
        serde_json::from_value(serde_json::json!({
            "image_id": id, "tenant": "acme", "source": format!("uploads/acme/{id}.jpg"),
            "status": status, "created_at": at, "updated_at": at,
        }))
        .unwrap()
    }

    /// `n` images with nothing left to do but a recheck that is due.
    async fn due_done(f: &Fixture, n: usize) {
        let now = now_ms();
        for i in 0..n {
            let r = record(&format!("done-{i:04}"), ImageStatus::Done, now);
            f.repo
                .put_image(&r, Some(now - 10_000 + i as u64))
                .await
                .unwrap();
        }
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut out, image::ImageFormat::Jpeg)
            .unwrap();
        out.into_inner()
    }

    #[tokio::test]
    async fn sweeps_in_chunks_until_nothing_is_due() {
        let f = fixture(100, 1000);
        due_done(&f, 250).await;
        let run = f.handler.run(|| None).await.unwrap();
        assert_eq!(run.report.settled, 250);
        assert_eq!((run.chunks, run.stopped), (3, Stop::Drained));
        assert!(f
            .repo
            .due_rechecks(now_ms(), 1000)
            .await
            .unwrap()
            .is_empty());
        // Nothing due: one empty chunk.
        let again = f.handler.run(|| None).await.unwrap();
        assert!(again.report.is_empty());
        assert_eq!((again.chunks, again.stopped), (1, Stop::Drained));
    }

    #[tokio::test]
    async fn looks_at_no_more_than_max_images() {
        let f = fixture(100, 150);
        due_done(&f, 250).await;
        let run = f.handler.run(|| None).await.unwrap();
        assert_eq!(run.report.settled, 150);
        assert_eq!((run.chunks, run.stopped), (2, Stop::MaxReached));
        assert_eq!(
            f.repo.due_rechecks(now_ms(), 1000).await.unwrap().len(),
            100
        );
        // The next run takes the rest.
        let next = f.handler.run(|| None).await.unwrap();
        assert_eq!(next.report.settled, 100);
        assert_eq!(next.stopped, Stop::Drained);
    }

    #[tokio::test]
    async fn starts_no_chunk_near_the_deadline() {
        let f = fixture(10, 1000);
        due_done(&f, 25).await;
        // Plenty of time for the first chunk, then the clock runs out.
        let mut left = vec![Duration::from_secs(30), Duration::from_secs(300)];
        let run = f.handler.run(|| left.pop()).await.unwrap();
        assert_eq!(run.report.settled, 10);
        assert_eq!((run.chunks, run.stopped), (1, Stop::Deadline));

        // Through `handle` with the Lambda context's deadline.
        let soon = SystemTime::now() + Duration::from_secs(30);
        let run = f
            .handler
            .handle(serde_json::json!({}), Some(soon))
            .await
            .unwrap();
        assert!(run.report.is_empty());
        assert_eq!((run.chunks, run.stopped), (0, Stop::Deadline));
        assert_eq!(f.repo.due_rechecks(now_ms(), 100).await.unwrap().len(), 15);
        let later = SystemTime::now() + Duration::from_secs(300);
        let run = f
            .handler
            .handle(serde_json::json!({}), Some(later))
            .await
            .unwrap();
        assert_eq!(run.report.settled, 15);
        assert_eq!(run.stopped, Stop::Drained);
    }

    #[tokio::test]
    async fn later_chunks_fit_the_time_left_at_the_pace_seen() {
        let f = fixture(10, 1000);
        due_done(&f, 25).await;
        // Before each chunk: 300 s left; after 10 images, 200 s (10 s each: 140 s spare above the
        // reserve fits 14, the chunk size 10 wins); after 10 more, 100 s (40 s spare fits 4);
        // then 59 s, under the reserve.
        let mut left = vec![59, 100, 200, 300]
            .into_iter()
            .map(Duration::from_secs)
            .collect::<Vec<_>>();
        let run = f.handler.run(|| left.pop()).await.unwrap();
        assert_eq!(run.report.settled, 24);
        assert_eq!((run.chunks, run.stopped), (3, Stop::Deadline));
        assert_eq!(f.repo.due_rechecks(now_ms(), 100).await.unwrap().len(), 1);

        // At a pace where not even one more image fits before the reserve, stop.
        let f = fixture(10, 1000);
        due_done(&f, 25).await;
        let mut left = vec![Duration::from_secs(62), Duration::from_secs(300)];
        let run = f.handler.run(|| left.pop()).await.unwrap();
        // 10 images in 238 s (23.8 s each), and only 2 s to spare.
        assert_eq!(run.report.settled, 10);
        assert_eq!((run.chunks, run.stopped), (1, Stop::Deadline));
    }

    #[tokio::test]
    async fn records_that_can_never_be_analysed_are_failed_not_retried_forever() {
        let f = fixture(5, 1000);
        let now = now_ms();
        // Queued without a resized key: no job can ever be rebuilt for these.
        for i in 0..3 {
            let r = record(&format!("broken-{i}"), ImageStatus::Queued, now);
            f.repo.put_image(&r, Some(now - 60_000)).await.unwrap();
        }
        due_done(&f, 4).await;
        let run = f.handler.run(|| None).await.unwrap();
        assert_eq!((run.report.rejected, run.report.settled), (3, 4));
        assert_eq!(run.report.errors, 0);
        assert_eq!(run.stopped, Stop::Drained);
        assert!(f.repo.due_rechecks(now_ms(), 100).await.unwrap().is_empty());
        let failed = f.repo.get_image("acme", "broken-0").await.unwrap().unwrap();
        assert_eq!(failed.status, ImageStatus::Failed);
        assert!(failed.error.unwrap().contains("without a resized image"));
    }

    #[tokio::test]
    async fn finishes_what_a_crash_left() {
        let f = fixture(100, 1000);
        let now = now_ms();
        // An upload whose resize never ran.
        f.blobs
            .put("uploads/acme/lost.jpg", jpeg(64, 48), "image/jpeg")
            .await
            .unwrap();
        let mut lost = record("lost", ImageStatus::Pending, now - 120_000);
        lost.original_key = Some("uploads/acme/lost.jpg".into());
        f.repo.put_image(&lost, Some(now - 1_000)).await.unwrap();
        // A recorded job that was never sent.
        let mut unsent = record("unsent", ImageStatus::Queued, now - 120_000);
        unsent.sha256 = Some("cd".repeat(32));
        unsent.resized_key = Some(format!("resized/acme/unsent/{}.jpg", "cd".repeat(32)));
        unsent.resized = Some(ImageSize {
            width: 32,
            height: 24,
            bytes: 900,
        });
        f.repo.put_image(&unsent, Some(now - 1_000)).await.unwrap();
        // An upload URL nobody used, older than the pending TTL (60 s here).
        let mut unused = record("unused", ImageStatus::Pending, now - 3_600_000);
        unused.original_key = Some("uploads/acme/unused.jpg".into());
        f.repo.put_image(&unused, Some(now - 1_000)).await.unwrap();

        let event = serde_json::json!({
            "version": "0", "id": "e-1", "detail-type": "Scheduled Event",
            "source": "aws.events", "account": "123456789012",
            "time": "2026-01-01T00:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:events:us-east-1:123456789012:rule/sweep"], "detail": {}
        });
        let run = f.handler.handle(event.clone(), None).await.unwrap();
        let r = &run.report;
        assert_eq!(
            (r.resized, r.requeued, r.expired, r.settled, r.errors),
            (1, 1, 1, 0, 0),
            "{run:?}"
        );
        let lost = f.repo.get_image("acme", "lost").await.unwrap().unwrap();
        assert_eq!(lost.status, ImageStatus::Queued);
        assert!(f.repo.get_image("acme", "unused").await.unwrap().is_none());
        let msgs = f.queue.receive(10, Duration::from_secs(30)).await.unwrap();
        let mut ids: Vec<String> = msgs
            .iter()
            .map(|m| {
                serde_json::from_str::<serde_json::Value>(&m.body).unwrap()["image_id"].to_string()
            })
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["\"lost\"", "\"unsent\""]);
        // The invocation's metrics: the lost upload resized, the unsent job sent.
        let lines = f.emf.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let doc: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(doc["Function"], "reconcile-fn");
        assert_eq!(doc["ImagesProcessed"], 1.0);
        assert_eq!(doc["JobsRequeued"], 1.0);
        assert_eq!(doc["RecordLatency"].as_array().map(Vec::len), Some(1));
        // Everything moved on: the next run finds nothing.
        let again = f.handler.handle(event, None).await.unwrap();
        assert!(again.report.is_empty(), "{again:?}");
    }

    #[test]
    fn max_comes_from_the_environment() {
        let with = |v: Option<&'static str>| {
            move |k: &str| (k == MAX_ENV).then_some(v).flatten().map(str::to_string)
        };
        assert_eq!(max_from_lookup(&with(None)).unwrap(), DEFAULT_MAX);
        assert_eq!(max_from_lookup(&with(Some(" "))).unwrap(), DEFAULT_MAX);
        assert_eq!(max_from_lookup(&with(Some("250"))).unwrap(), 250);
        assert!(max_from_lookup(&with(Some("0"))).is_err());
        assert!(max_from_lookup(&with(Some("-3"))).is_err());
        assert!(max_from_lookup(&with(Some("lots"))).is_err());
    }

    #[test]
    fn the_run_is_reported_as_flat_json() {
        let run = Run {
            report: SweepReport {
                resized: 1,
                rejected: 0,
                requeued: 2,
                expired: 3,
                settled: 4,
                errors: 0,
            },
            generations: None,
            deliveries: None,
            chunks: 2,
            stopped: Stop::MaxReached,
        };
        assert_eq!(
            serde_json::to_value(&run).unwrap(),
            serde_json::json!({"resized": 1, "rejected": 0, "requeued": 2, "expired": 3,
                               "settled": 4, "errors": 0, "chunks": 2, "stopped": "max_reached"})
        );
    }

    /// `n` done images of acme with results and resized JPEGs, but no vectors.
    async fn done_unindexed(f: &Fixture, n: usize) {
        let now = now_ms();
        let bytes = jpeg(64, 48);
        for i in 0..n {
            let id = format!("img-{i:04}");
            let key = format!("resized/acme/{id}.jpg");
            f.blobs
                .put(&key, bytes.clone(), "image/jpeg")
                .await
                .unwrap();
            let at = rfc3339(now);
            let r: ImageRecord = serde_json::from_value(serde_json::json!({
                "image_id": id, "tenant": "acme", "source": format!("uploads/acme/{id}.jpg"),
                "status": "done", "created_at": at, "updated_at": at, "resized_key": key,
                "result": {
                    "provider": "local", "model": "sightline-local-v1",
                    "analysis": {"description": "a test", "tags": ["x"]},
                    "usage": {"input_tokens": 0, "output_tokens": 0}, "cost_usd": 0.0,
                    "cached": false, "idempotency_key": format!("k{i}"), "prompt_version": "v1",
                    "price_version": "p", "completed_at": at
                }
            }))
            .unwrap();
            f.repo.put_image(&r, None).await.unwrap();
        }
    }

    fn with_search(f: &mut Fixture) {
        let search = sightline_pipeline::search::Search::new(
            f.repo.clone(),
            f.blobs.clone(),
            Arc::new(sightline_pipeline::local::SqliteVectorStore::new(
                SqliteDb::in_memory().unwrap(),
            )),
            Some(Arc::new(
                sightline_pipeline::providers::local_embed::LocalEmbedder,
            )),
            Arc::new(Settings::default()),
            Arc::new(SystemClock),
        );
        f.handler.search = Some(Arc::new(search));
    }

    #[tokio::test]
    async fn a_reindex_request_stops_before_the_deadline_and_its_cursor_carries_on() {
        let mut f = fixture(100, 1000);
        with_search(&mut f);
        done_unindexed(&f, 120).await;
        // Enough time for two pages, then under the reserve.
        let mut calls = 0;
        let request = ReindexRequest {
            tenant: "acme".into(),
            all: false,
            cursor: None,
        };
        let first = f
            .handler
            .reindex(&request, || {
                calls += 1;
                Some(if calls <= 2 {
                    Duration::from_secs(600)
                } else {
                    Duration::from_secs(1)
                })
            })
            .await
            .unwrap();
        assert_eq!(first.report.indexed, 2 * REINDEX_PAGE as u64);
        let cursor = first.next_cursor.clone().expect("more to do");
        // The next invocation goes on from the cursor, through the JSON payload.
        let answer = f
            .handler
            .handle_event(
                serde_json::json!({"reindex": {"tenant": "acme", "cursor": cursor}}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(answer["indexed"], 120 - 2 * REINDEX_PAGE as u64, "{answer}");
        assert!(answer["next_cursor"].is_null(), "{answer}");
        // Everything has its vector now.
        let again = f
            .handler
            .handle_event(serde_json::json!({"reindex": {"tenant": "acme"}}), None)
            .await
            .unwrap();
        assert_eq!(
            (again["indexed"].as_u64(), again["skipped"].as_u64()),
            (Some(0), Some(120))
        );
        // A malformed request is an error that says what is expected.
        let err = f
            .handler
            .handle_event(serde_json::json!({"reindex": {"tenant": 7}}), None)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("reindex request"), "{err:#}");
    }

    #[tokio::test]
    async fn without_a_vector_store_a_reindex_request_fails_clearly() {
        let f = fixture(100, 1000);
        let err = f
            .handler
            .handle_event(serde_json::json!({"reindex": {"tenant": "acme"}}), None)
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("SIGHTLINE_VECTOR_BUCKET"),
            "{err:#}"
        );
    }

    // ---- generation jobs: the sweep moves rows and jobs on, the schedule delivers webhooks

    use sightline_pipeline::delivery::{Deliveries, Posted, WebhookPoster};
    use sightline_pipeline::generation::{Generations, Generators, Submission};
    use sightline_pipeline::ports::{Failure, GenerationStore};
    use sightline_pipeline::providers::gen_local::LocalGenerator;
    use sightline_pipeline::webhook_url::{Mode, SystemResolver};
    use std::sync::Mutex;

    /// A request's URL and headers.
    type Post = (String, Vec<(String, String)>);

    /// A receiver that answers from a script (then 200) and keeps what it was sent.
    struct ScriptedPoster {
        statuses: Mutex<Vec<u16>>,
        posts: Mutex<Vec<Post>>,
    }

    #[async_trait::async_trait]
    impl WebhookPoster for ScriptedPoster {
        async fn post(
            &self,
            url: &str,
            headers: &[(&str, &str)],
            _body: Vec<u8>,
        ) -> Result<Posted, String> {
            self.posts.lock().unwrap().push((
                url.to_string(),
                headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ));
            let mut statuses = self.statuses.lock().unwrap();
            let status = if statuses.is_empty() {
                200
            } else {
                statuses.remove(0)
            };
            Ok(Posted {
                status,
                retry_after: None,
            })
        }
    }

    #[tokio::test]
    async fn the_sweep_finishes_a_job_whose_row_ended_unseen_and_the_minute_task_retries_its_webhook(
    ) {
        let f = fixture(10, 100);
        let db = SqliteDb::in_memory().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let settings = Arc::new(Settings {
            webhook_secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            webhook_retry_scale: 0.0001,
            ..Settings::default()
        });
        let store = Arc::new(SqliteRepository::new(db.clone()));
        let gen_queue: Arc<dyn Queue> =
            Arc::new(SqliteQueue::new(db, "generate", 5, clock.clone()));
        let generations = Arc::new(Generations::new(
            store.clone(),
            f.repo.clone(),
            f.blobs.clone(),
            gen_queue.clone(),
            Arc::new(Generators::new(Box::new(|_: &str| {
                Ok(Arc::new(LocalGenerator) as _)
            }))),
            settings.clone(),
            clock.clone(),
            Mode::Local,
            Arc::new(SystemResolver::default()),
        ));
        let poster = Arc::new(ScriptedPoster {
            statuses: Mutex::new(vec![503]),
            posts: Mutex::new(Vec::new()),
        });
        let mut handler = f.handler.clone();
        handler.generation = Some(GenerationSide {
            generations: generations.clone(),
            deliveries: Arc::new(Deliveries {
                store: store.clone(),
                poster: poster.clone(),
                secrets: settings.clone(),
                settings: settings.clone(),
                clock: clock.clone(),
            }),
        });
        let plan = sightline_core::generate::plan_job(
            &sightline_core::generate::TemplateSet::from_toml(
                "[templates.t]\nprompt = \"a {thing}\"\nmodel = \"local-canvas\"\n",
            )
            .unwrap(),
            Some("t"),
            sightline_core::generate::RowsInput::Csv(b"thing\nmug\n"),
            &sightline_core::generate::Limits::default(),
        )
        .unwrap();
        let job = generations
            .submit(Submission {
                tenant: "acme".into(),
                template: "t".into(),
                requests: plan,
                webhook_url: Some("http://127.0.0.1:9/hook".into()),
                webhook_rows: false,
                regenerate: None,
                source: "test".into(),
                job_id: None,
            })
            .await
            .unwrap();
        let msg = gen_queue
            .receive(1, std::time::Duration::from_secs(30))
            .await
            .unwrap()
            .remove(0);
        generations.handle(&msg.body, 1).await;
        let row = store
            .get_row("acme", &job.job_id, 1)
            .await
            .unwrap()
            .unwrap();
        // The image's analysis fails, and nothing tells the row (the analyzer crashed).
        f.repo
            .mark_failed(
                "acme",
                row.image_id.as_deref().unwrap(),
                "bad image",
                Failure::Permanent,
                &rfc3339(clock.now_ms()),
            )
            .await
            .unwrap();

        let event = serde_json::json!({"detail-type": "Scheduled Event", "source": "aws.events"});
        let run = handler.handle(event, None).await.unwrap();
        assert_eq!(run.generations.map(|g| g.finished), Some(1), "{run:?}");
        let finished = store.get_job("acme", &job.job_id).await.unwrap().unwrap();
        assert_eq!(finished.status, sightline_core::genjob::JobStatus::Finished);
        // Its webhook was attempted in the same run and answered 503: to be retried.
        assert_eq!(
            run.deliveries.map(|d| (d.attempted, d.retrying)),
            Some((1, 1))
        );

        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let out = handler
            .handle_event(serde_json::json!({"task": "deliveries"}), None)
            .await
            .unwrap();
        assert_eq!(out["delivered"], 1, "{out}");
        let posts = poster.posts.lock().unwrap();
        assert_eq!(posts.len(), 2);
        // Both attempts carry the same message id, signed.
        let id = |i: usize| {
            posts[i]
                .1
                .iter()
                .find(|(k, _)| k == "webhook-id")
                .map(|(_, v)| v.clone())
        };
        assert!(id(0).is_some() && id(0) == id(1));
        assert!(posts[1]
            .1
            .iter()
            .any(|(k, v)| k == "webhook-signature" && v.starts_with("v1,")));
    }
}
