//! The batch lane with a scripted batch provider on the local adapters: recording jobs as
//! items, submission, and reconciliation of every kind of line, exactly once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sightline_core::batch::{BatchLimits, BatchPhase};
use sightline_core::model::{AnalysisJob, ImageStatus, Lane};
use sightline_core::pricing::{PriceTable, Usage};
use sightline_core::retry::FailureKind;
use sightline_pipeline::analyze::{AnalyzeOutcome, Analyzer};
use sightline_pipeline::batch::{BatchLane, TickReport};
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
use sightline_pipeline::ports::{
    BatchLine, BatchProvider, BatchRequest, BatchState, BatchStore, BlobStore, Clock, LineOutcome,
    ProviderBatch, ProviderError, Queue, RateInfo, Repository, SystemClock, VisionResponse,
};
use sightline_pipeline::Settings;

use super::analyze::{record_of, sha, Scripted};

/// How the scripted provider answers one request.
#[derive(Debug, Clone)]
enum Line {
    /// Answered with usage 1000 in / 100 out, under this (maybe dated) model name.
    Answer(&'static str),
    AnswerWithoutUsage,
    Fail(FailureKind),
    /// An invalid answer that was billed with usage.
    Invalid,
    Expired,
    /// No line at all for the request.
    Missing,
}

#[derive(Default)]
struct Books {
    /// Our batch id → (provider id, custom_ids submitted).
    submitted: Vec<(String, String, Vec<String>)>,
    /// How a request is answered, per submission round (the last round repeats).
    rounds: Vec<HashMap<usize, Line>>,
    /// Provider phase of each batch (default: ended).
    phase: HashMap<String, BatchPhase>,
    results_fetched: u64,
    /// Submissions refused with this failure.
    refuse: Option<FailureKind>,
}

/// A provider batch API from a script: line `i` of a batch (in submission order of custom_ids
/// sorted) gets the round's `Line` for index i; answers come back in reverse order.
struct ScriptedBatches {
    books: Mutex<Books>,
    limits: BatchLimits,
}

impl ScriptedBatches {
    fn new(rounds: Vec<HashMap<usize, Line>>) -> Arc<ScriptedBatches> {
        Arc::new(ScriptedBatches {
            books: Mutex::new(Books {
                rounds,
                ..Books::default()
            }),
            limits: sightline_core::batch::OPENAI_BATCH_LIMITS,
        })
    }
    fn submissions(&self) -> Vec<Vec<String>> {
        let b = self.books.lock().unwrap();
        b.submitted.iter().map(|(_, _, ids)| ids.clone()).collect()
    }
    fn set_phase(&self, provider_id: &str, phase: BatchPhase) {
        let mut b = self.books.lock().unwrap();
        b.phase.insert(provider_id.to_string(), phase);
    }
}

fn usage() -> Usage {
    Usage {
        input_tokens: 1000,
        output_tokens: 100,
        cached_tokens: 0,
    }
}

#[async_trait]
impl BatchProvider for ScriptedBatches {
    fn name(&self) -> &str {
        "openai"
    }
    fn limits(&self) -> BatchLimits {
        self.limits
    }
    fn encode(&self, request: &BatchRequest) -> Result<Vec<u8>, ProviderError> {
        Ok(format!(
            "{}:{}:{}",
            request.custom_id,
            request.request.model,
            request.request.jpeg.len()
        )
        .into_bytes())
    }
    async fn submit(&self, batch_id: &str, encoded: Vec<Vec<u8>>) -> Result<String, ProviderError> {
        let mut b = self.books.lock().unwrap();
        if let Some(kind) = b.refuse.clone() {
            return Err(ProviderError {
                kind,
                message: "refused".into(),
                rate: RateInfo::default(),
                usage: None,
                billed: false,
            });
        }
        let ids = encoded
            .iter()
            .map(|e| {
                let s = String::from_utf8(e.clone()).unwrap();
                s.split(':').next().unwrap().to_string()
            })
            .collect();
        let provider_id = format!("pb{}", b.submitted.len());
        b.submitted
            .push((batch_id.to_string(), provider_id.clone(), ids));
        Ok(provider_id)
    }
    async fn status(&self, provider_batch_id: &str) -> Result<ProviderBatch, ProviderError> {
        let b = self.books.lock().unwrap();
        let phase = b
            .phase
            .get(provider_batch_id)
            .copied()
            .unwrap_or(BatchPhase::Ended);
        Ok(ProviderBatch {
            provider_batch_id: provider_batch_id.to_string(),
            status: match phase {
                BatchPhase::Running => "in_progress".into(),
                BatchPhase::Ended => "completed".into(),
                BatchPhase::Failed => "failed".into(),
            },
            phase,
            error: (phase == BatchPhase::Failed)
                .then(|| "token_limit_exceeded: Enqueued token limit reached".into()),
        })
    }
    async fn results(&self, provider_batch_id: &str) -> Result<Vec<BatchLine>, ProviderError> {
        let mut b = self.books.lock().unwrap();
        b.results_fetched += 1;
        let round = b
            .submitted
            .iter()
            .position(|(_, p, _)| p == provider_batch_id)
            .unwrap();
        let ids = b.submitted[round].2.clone();
        let script = b
            .rounds
            .get(round)
            .or(b.rounds.last())
            .cloned()
            .unwrap_or_default();
        let mut lines = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let line = script.get(&i).cloned().unwrap_or(Line::Answer("gpt-4o"));
            let err = |kind, usage, billed| ProviderError {
                kind,
                message: "scripted line error".into(),
                rate: RateInfo::default(),
                usage,
                billed,
            };
            let answer = |model: &str, usage| VisionResponse {
                analysis: serde_json::json!({"description": "batch answer", "tags": []}),
                usage,
                model: model.to_string(),
                rate: RateInfo::default(),
            };
            let outcome = match line {
                Line::Answer(model) => LineOutcome::Answered(answer(model, Some(usage()))),
                Line::AnswerWithoutUsage => LineOutcome::Answered(answer("", None)),
                Line::Fail(kind) => LineOutcome::Failed(err(kind, None, false)),
                Line::Invalid => {
                    LineOutcome::Failed(err(FailureKind::InvalidOutput, Some(usage()), true))
                }
                Line::Expired => LineOutcome::Unprocessed("batch_expired".into()),
                Line::Missing => continue,
            };
            lines.push(BatchLine {
                custom_id: id.clone(),
                outcome,
            });
        }
        // Output order is not input order.
        lines.reverse();
        Ok(lines)
    }
    async fn find(&self, batch_id: &str, _since_ms: u64) -> Result<Option<String>, ProviderError> {
        let b = self.books.lock().unwrap();
        Ok(b.submitted
            .iter()
            .find(|(ours, _, _)| ours == batch_id)
            .map(|(_, p, _)| p.clone()))
    }
}

struct Fixture {
    analyzer: Analyzer,
    lane: BatchLane,
    repo: Arc<SqliteRepository>,
    queue: Arc<SqliteQueue>,
    batches: Arc<ScriptedBatches>,
    realtime: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

fn jpeg(i: usize) -> Vec<u8> {
    vec![0xFF, 0xD8, (i % 256) as u8, (i / 256) as u8, 7]
}

async fn fixture(images: usize, rounds: Vec<HashMap<usize, Line>>, settings: Settings) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::in_memory().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
    let repo = Arc::new(SqliteRepository::new(db.clone()));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let queue = Arc::new(SqliteQueue::new(db, "analyze", 5, clock.clone()));
    let settings = Arc::new(Settings {
        model: "gpt-4o".into(),
        max_receives: 5,
        batch_poll_every: Duration::from_millis(50),
        ..settings
    });
    let realtime = Scripted::new(Vec::new());
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        realtime.clone(),
        settings.clone(),
        clock.clone(),
    )
    .with_batches(repo.clone());
    let batches = ScriptedBatches::new(rounds);
    let lane = BatchLane {
        blobs: blobs.clone(),
        repo: repo.clone(),
        store: repo.clone(),
        provider: batches.clone(),
        queue: queue.clone(),
        settings,
        clock,
        metrics: sightline_pipeline::metrics::no_metrics(),
        search: None,
    };
    for i in 0..images {
        let id = format!("i{i}");
        blobs
            .put(&format!("resized/t/{id}.jpg"), jpeg(i), "image/jpeg")
            .await
            .unwrap();
        let mut rec = record_of("t", &id);
        rec.sha256 = Some(sha(&jpeg(i)));
        rec.lane = Some(Lane::Batch);
        repo.put_image(&rec, None).await.unwrap();
    }
    Fixture {
        analyzer,
        lane,
        repo,
        queue,
        batches,
        realtime,
        _dir: dir,
    }
}

fn batch_job(i: usize) -> String {
    serde_json::to_string(&AnalysisJob {
        v: 1,
        image_id: format!("i{i}"),
        tenant: "t".into(),
        resized_key: format!("resized/t/i{i}.jpg"),
        sha256: sha(&jpeg(i)),
        width: 1024,
        height: 1024,
        detail: None,
        lane: Some(Lane::Batch),
        check: None,
    })
    .unwrap()
}

impl Fixture {
    async fn record_all(&self, n: usize) {
        for i in 0..n {
            assert_eq!(
                self.analyzer.handle(&batch_job(i), 1).await,
                AnalyzeOutcome::Batched
            );
        }
    }
    async fn tick(&self) -> TickReport {
        self.lane.tick(true).await.unwrap()
    }
    /// Submit, then poll: a tick polls before it submits, so a batch is read at the next one.
    async fn round(&self) -> TickReport {
        let a = self.tick().await;
        let b = self.tick().await;
        TickReport {
            batches_submitted: a.batches_submitted + b.batches_submitted,
            requests_submitted: a.requests_submitted + b.requests_submitted,
            batches_failed: a.batches_failed + b.batches_failed,
            batches_ended: a.batches_ended + b.batches_ended,
            lines_answered: a.lines_answered + b.lines_answered,
            lines_failed: a.lines_failed + b.lines_failed,
            lines_retried: a.lines_retried + b.lines_retried,
            items_to_realtime: a.items_to_realtime + b.items_to_realtime,
            items_cached: a.items_cached + b.items_cached,
            ..b
        }
    }
    async fn ledger(&self) -> (u64, u64, f64, f64) {
        let rows = self
            .repo
            .costs("t", "0000-01-01", "9999-12-31")
            .await
            .unwrap();
        (
            rows.iter().map(|r| r.calls).sum(),
            rows.iter().map(|r| r.batch_calls).sum(),
            rows.iter().map(|r| r.cost_usd).sum(),
            rows.iter().map(|r| r.batch_saved_usd).sum(),
        )
    }
    async fn status(&self, i: usize) -> (ImageStatus, Option<String>) {
        let r = self
            .repo
            .get_image("t", &format!("i{i}"))
            .await
            .unwrap()
            .unwrap();
        (r.status, r.error)
    }
}

/// gpt-4o's batch price of the scripted usage: 1000 in × $1.25 + 100 out × $5 per 1M.
const LINE_COST: f64 = 0.00175;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test]
async fn batch_jobs_become_one_request_per_key_and_answers_are_booked_at_batch_prices() {
    let f = fixture(3, vec![HashMap::new()], Settings::default()).await;
    f.record_all(3).await;
    // A redelivered job waits in the same request; nothing is called in real time.
    assert_eq!(
        f.analyzer.handle(&batch_job(0), 2).await,
        AnalyzeOutcome::Batched
    );
    assert!(f.realtime.calls().is_empty());
    let report = f.round().await;
    assert_eq!(report.requests_submitted, 3);
    assert_eq!(report.lines_answered, 3, "{report:?}");
    assert!(report.is_idle(), "{report:?}");
    for i in 0..3 {
        let r = f
            .repo
            .get_image("t", &format!("i{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status, ImageStatus::Done);
        let res = r.result.unwrap();
        assert_eq!(res.lane, Lane::Batch);
        assert!(close(res.cost_usd, LINE_COST), "{}", res.cost_usd);
        assert!(close(res.saved_usd, 0.0035 - LINE_COST));
    }
    let (calls, batch_calls, cost, saved) = f.ledger().await;
    assert_eq!((calls, batch_calls), (3, 3));
    assert!(close(cost, 3.0 * LINE_COST) && close(saved, 3.0 * (0.0035 - LINE_COST)));
    let batches = f.repo.list_batches(Some("t"), false, 10).await.unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].state, BatchState::Ended);
    assert_eq!(batches[0].counts.succeeded, 3);
    assert!(close(batches[0].cost_usd, 3.0 * LINE_COST));
    // The same bytes again, on either lane, are served from the cache at $0.
    let mut rec = record_of("t", "again");
    rec.sha256 = Some(sha(&jpeg(1)));
    f.repo.put_image(&rec, None).await.unwrap();
    let again = batch_job(1).replace("\"i1\"", "\"again\"");
    assert_eq!(f.analyzer.handle(&again, 1).await, AnalyzeOutcome::Cached);
}

#[tokio::test]
async fn polling_an_ended_batch_again_or_twice_at_once_books_nothing_twice() {
    let f = fixture(
        20,
        vec![HashMap::from([(3, Line::Invalid)])],
        Settings::default(),
    )
    .await;
    f.record_all(20).await;
    // Submit, but let the batch still run: nothing is read yet.
    let pb = {
        let mut report = TickReport::default();
        f.lane.submit(true, &mut report).await.unwrap();
        assert_eq!(report.requests_submitted, 20);
        "pb0"
    };
    f.batches.set_phase(pb, BatchPhase::Running);
    f.tick().await;
    assert_eq!(f.ledger().await.0, 0, "a running batch books nothing");
    f.batches.set_phase(pb, BatchPhase::Ended);
    // Two pollers at once.
    let (a, b) = tokio::join!(f.lane.tick(false), f.lane.tick(false));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.batches_ended + b.batches_ended,
        1,
        "one poller records the batch"
    );
    let once = f.ledger().await;
    assert_eq!(
        (once.0, once.1),
        (20, 20),
        "19 answers and 1 paid invalid answer"
    );
    // Reconciling the ended batch again reads the results again and books nothing.
    let batch = f
        .repo
        .list_batches(None, false, 10)
        .await
        .unwrap()
        .remove(0);
    let mut report = TickReport::default();
    f.lane.reconcile(batch.clone(), &mut report).await.unwrap();
    f.lane.reconcile(batch, &mut report).await.unwrap();
    assert_eq!(f.ledger().await, once);
    assert!(f.batches.books.lock().unwrap().results_fetched >= 3);
    let rows = f.repo.costs("t", "0000-01-01", "9999-12-31").await.unwrap();
    let images: u64 = rows.iter().map(|r| r.images).sum();
    assert_eq!(images, 19);
}

#[tokio::test]
async fn line_errors_retry_in_the_next_batch_then_go_real_time_and_permanent_ones_fail() {
    let transient = Line::Fail(FailureKind::Http {
        status: 500,
        retry_after: None,
    });
    let permanent = Line::Fail(FailureKind::Http {
        status: 400,
        retry_after: None,
    });
    // Round 1: line 0 transient, line 1 permanent, line 2 expired, line 3 missing, line 4
    // invalid. Later rounds: the first line fails transiently every time.
    let rounds = vec![
        HashMap::from([
            (0, transient.clone()),
            (1, permanent),
            (2, Line::Expired),
            (3, Line::Missing),
            (4, Line::Invalid),
        ]),
        HashMap::from([(0, transient.clone())]),
        HashMap::from([(0, transient)]),
    ];
    let f = fixture(6, rounds, Settings::default()).await;
    f.record_all(6).await;
    assert_eq!(f.tick().await.requests_submitted, 6);
    let first = f.tick().await;
    assert_eq!(
        (
            first.lines_answered,
            first.lines_failed,
            first.lines_retried
        ),
        (1, 1, 4),
        "{first:?}"
    );
    // The retried lines go in the next batch at once (flush), not after the timer.
    assert_eq!(first.requests_submitted, 4, "{first:?}");
    // Which image got which line depends on the custom_id order; find the failed one.
    let mut failed = Vec::new();
    for i in 0..6 {
        if f.status(i).await.0 == ImageStatus::Failed {
            failed.push(i);
        }
    }
    assert_eq!(failed.len(), 1);
    let (_, reason) = f.status(failed[0]).await;
    assert!(
        reason.unwrap().contains("batch"),
        "the reason names the lane"
    );
    // One line keeps failing until its attempts (3) are used up, then goes real time.
    let second = f.tick().await;
    assert_eq!(
        (
            second.lines_answered,
            second.lines_retried,
            second.requests_submitted
        ),
        (3, 1, 1),
        "{second:?}"
    );
    let third = f.tick().await;
    assert_eq!(third.items_to_realtime, 1, "{third:?}");
    assert!(third.is_idle(), "{third:?}");
    // Its job is on the real-time queue, marked so.
    let msgs = f.queue.receive(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(msgs.len(), 1);
    let job = AnalysisJob::parse(&msgs[0].body).unwrap();
    assert_eq!(job.lane, Some(Lane::Realtime));
    assert!(matches!(
        f.analyzer.handle(&msgs[0].body, 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    for i in 0..6 {
        let (s, e) = f.status(i).await;
        assert!(
            s.is_final() && (s == ImageStatus::Done || e.is_some()),
            "{i}: {s:?}"
        );
    }
    // Money: 4 answers in batch + 1 invalid answer (paid) + 1 real-time answer.
    let (calls, batch_calls, cost, _) = f.ledger().await;
    assert_eq!((calls, batch_calls), (6, 5));
    assert!(close(cost, 5.0 * LINE_COST + 0.0035), "{cost}");
}

#[tokio::test]
async fn a_refused_batch_gives_its_requests_back_with_the_error_and_a_backoff() {
    let f = fixture(4, vec![HashMap::new()], Settings::default()).await;
    f.record_all(4).await;
    let mut report = TickReport::default();
    f.lane.submit(true, &mut report).await.unwrap();
    // The provider accepted it, then failed it on the enqueued-token limit.
    f.batches.set_phase("pb0", BatchPhase::Failed);
    let r = f.tick().await;
    assert_eq!(r.batches_failed, 1, "{r:?}");
    assert_eq!(
        r.requests_submitted, 0,
        "backing off, not resubmitting at once"
    );
    assert_eq!(r.deferred_items, 4);
    let failed = f.repo.list_batches(None, false, 10).await.unwrap();
    assert_eq!(failed[0].state, BatchState::Failed);
    assert!(failed[0]
        .error
        .as_deref()
        .unwrap()
        .contains("token_limit_exceeded"));
    // After the backoff the same requests go in a new batch and are answered.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let r = f.round().await;
    assert_eq!((r.requests_submitted, r.lines_answered), (4, 4), "{r:?}");
    assert_eq!(f.ledger().await.1, 4);
    // A submission refused outright (HTTP 400) does the same, with the provider's message.
    let f = fixture(2, vec![HashMap::new()], Settings::default()).await;
    f.record_all(2).await;
    f.batches.books.lock().unwrap().refuse = Some(FailureKind::Http {
        status: 400,
        retry_after: None,
    });
    let r = f.tick().await;
    assert_eq!(r.batches_failed, 1);
    assert_eq!(r.pending_items, 2);
}

#[tokio::test]
async fn an_unanswered_submission_is_looked_up_at_the_provider_not_sent_twice() {
    let f = fixture(2, vec![HashMap::new()], Settings::default()).await;
    f.record_all(2).await;
    f.batches.books.lock().unwrap().refuse = Some(FailureKind::Timeout);
    let r = f.tick().await;
    assert_eq!(r.batches_submitted, 0);
    assert_eq!(r.open_batches, 1, "left submitting, its items held");
    assert_eq!(r.pending_items, 0);
    // Nothing is resubmitted while it may be at the provider.
    f.batches.books.lock().unwrap().refuse = None;
    let r = f.tick().await;
    assert_eq!(r.requests_submitted, 0);
    assert!(f.batches.submissions().is_empty());
}

#[tokio::test]
async fn dated_model_names_are_priced_as_the_model_asked_and_unreadable_usage_at_the_estimate() {
    let f = fixture(
        2,
        vec![HashMap::from([
            (0, Line::Answer("gpt-4o-2024-08-06")),
            (1, Line::AnswerWithoutUsage),
        ])],
        Settings::default(),
    )
    .await;
    f.record_all(2).await;
    f.round().await;
    let table = PriceTable::builtin();
    let mut costs = Vec::new();
    for i in 0..2 {
        let r = f
            .repo
            .get_image("t", &format!("i{i}"))
            .await
            .unwrap()
            .unwrap();
        let res = r.result.unwrap();
        assert!(res.cost_usd > 0.0, "never $0 for a paid answer");
        costs.push((res.usage_estimated, res.cost_usd));
    }
    assert!(costs.iter().any(|(est, c)| !est && close(*c, LINE_COST)));
    let estimate = table
        .estimate(
            "gpt-4o",
            1024,
            1024,
            &Settings::default().estimate_params(Default::default()),
        )
        .unwrap();
    let at_estimate = table.batch_cost_usd(&estimate).unwrap();
    assert!(costs.iter().any(|(est, c)| *est && close(*c, at_estimate)));
}

#[tokio::test]
async fn a_tenant_over_its_budget_submits_what_fits_and_the_rest_waits() {
    let table = PriceTable::builtin();
    let estimate = table
        .estimate(
            "gpt-4o",
            1024,
            1024,
            &Settings::default().estimate_params(Default::default()),
        )
        .unwrap();
    let one = table.batch_cost_usd(&estimate).unwrap();
    let settings = Settings {
        budget: sightline_core::budget::BudgetCaps::from_amounts(one * 2.5, 0.0),
        ..Settings::default()
    };
    let f = fixture(8, vec![HashMap::new()], settings).await;
    f.record_all(8).await;
    let r = f.tick().await;
    // 2.5 estimates of room: the third request may cross the cap, as in the real-time lane.
    assert_eq!(r.requests_submitted, 3, "{r:?}");
    assert_eq!(r.deferred_items, 5, "the rest waits for tomorrow");
    assert!(r.next_due_ms.unwrap() > f.lane.clock.now_ms() + 1000);
    let r = f.tick().await;
    assert_eq!((r.lines_answered, r.requests_submitted), (3, 0), "{r:?}");
    let (_, _, cost, _) = f.ledger().await;
    assert!(cost <= one * 2.5 + one + 1e-12, "{cost}");
    let counts = f
        .repo
        .budget_counts(
            "t",
            &sightline_core::budget::Periods::at(f.lane.clock.now_ms()),
            f.lane.clock.now_ms(),
        )
        .await
        .unwrap();
    assert!(
        close(counts.day.reserved_usd, 0.0),
        "the batch's hold is settled"
    );
}
