//! The analyze use-case with a scripted provider on the local adapters.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sightline_core::limiter::{LimitOp, LimitOutcome, Limits};
use sightline_core::model::{AnalysisJob, Detail, ImageRecord, ImageStatus};
use sightline_core::pricing::Usage;
use sightline_core::retry::FailureKind;
use sightline_pipeline::analyze::{AnalyzeOutcome, Analyzer};
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteRepository};
use sightline_pipeline::ports::{
    BlobStore, Clock, ProviderError, RateInfo, RateLimitStore, Repository, StoreError, SystemClock,
    VisionProvider, VisionRequest, VisionResponse,
};
use sightline_pipeline::Settings;

/// One scripted provider answer.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// A valid analysis with usage 1000 in / 100 out.
    Answer,
    /// A valid analysis whose response carried no usage (still billed).
    AnswerWithoutUsage,
    /// A 200 cut off mid-body: billed, unreadable, usage unknown.
    Truncated,
    Fail(FailureKind),
}

/// Answers from a script; records which models were called.
pub(crate) struct Scripted {
    steps: Mutex<VecDeque<Step>>,
    calls: Mutex<Vec<String>>,
    /// How long each call takes.
    pub(crate) latency: Mutex<Duration>,
}

impl Scripted {
    pub(crate) fn new(steps: Vec<Step>) -> Arc<Scripted> {
        Arc::new(Scripted {
            steps: Mutex::new(steps.into()),
            calls: Mutex::new(Vec::new()),
            latency: Mutex::new(Duration::ZERO),
        })
    }
    pub(crate) fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl VisionProvider for Scripted {
    fn name(&self) -> &str {
        "openai"
    }
    fn is_paid(&self) -> bool {
        true
    }
    async fn analyze(&self, req: &VisionRequest) -> Result<VisionResponse, ProviderError> {
        self.calls.lock().unwrap().push(req.model.clone());
        let latency = *self.latency.lock().unwrap();
        tokio::time::sleep(latency).await;
        let step = self
            .steps
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Step::Answer);
        let answer = |usage| VisionResponse {
            analysis: serde_json::json!({"description": "ok", "tags": []}),
            usage,
            model: req.model.clone(),
            rate: RateInfo::default(),
        };
        match step {
            Step::Answer => Ok(answer(Some(Usage {
                input_tokens: 1000,
                output_tokens: 100,
                cached_tokens: 0,
            }))),
            Step::AnswerWithoutUsage => Ok(answer(None)),
            Step::Truncated => Err(ProviderError {
                kind: FailureKind::InvalidOutput,
                message: "provider response is not JSON: EOF".into(),
                rate: RateInfo::default(),
                usage: None,
                billed: true,
            }),
            Step::Fail(kind) => Err(ProviderError {
                billed: kind == FailureKind::InvalidOutput,
                kind,
                message: "scripted".into(),
                rate: RateInfo::default(),
                usage: None,
            }),
        }
    }
}

struct Fixture {
    analyzer: Analyzer,
    repo: Arc<dyn Repository>,
    blobs: Arc<dyn BlobStore>,
    provider: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

/// The resized JPEG every fixture image has (the same bytes: a second image is a cache hit).
const JPEG: &[u8] = &[0xFF, 0xD8, 1, 2, 3];

pub(crate) fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn fixture(steps: Vec<Step>, fallback: &[&str]) -> Fixture {
    fixture_with(
        steps,
        Settings {
            fallback_models: fallback.iter().map(|s| s.to_string()).collect(),
            ..Settings::default()
        },
    )
    .await
}

async fn fixture_with(steps: Vec<Step>, settings: Settings) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
    let repo: Arc<dyn Repository> = Arc::new(SqliteRepository::new(SqliteDb::in_memory().unwrap()));
    let provider = Scripted::new(steps);
    let settings = Settings {
        model: "gpt-4o".into(),
        // The tests deliver up to 5 times, as SQS with the template's maxReceiveCount.
        max_receives: 5,
        ..settings
    };
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        provider.clone(),
        Arc::new(settings),
        Arc::new(SystemClock),
    );
    for (tenant, id) in [("t", "a"), ("t", "b"), ("u", "a")] {
        blobs
            .put(
                &format!("resized/{tenant}/{id}.jpg"),
                JPEG.to_vec(),
                "image/jpeg",
            )
            .await
            .unwrap();
        repo.put_image(&record_of(tenant, id), None).await.unwrap();
    }
    Fixture {
        analyzer,
        repo,
        blobs,
        provider,
        _dir: dir,
    }
}

pub(crate) fn record_of(tenant: &str, id: &str) -> ImageRecord {
    ImageRecord {
        image_id: id.into(),
        tenant: tenant.into(),
        source: format!("{id}.jpg"),
        status: ImageStatus::Queued,
        error: None,
        permanent_failure: false,
        original: None,
        resized: None,
        orientation: None,
        sha256: Some(sha(JPEG)),
        original_sha256: None,
        original_key: None,
        resized_key: Some(format!("resized/{tenant}/{id}.jpg")),
        estimate: None,
        original_estimate: None,
        result: None,
        extra_spend: None,
        detail: None,
        lane: None,
        created_at: "2026-11-22T00:00:00.000Z".into(),
        updated_at: "2026-11-22T00:00:00.000Z".into(),
        generation: None,
    }
}

fn job(id: &str) -> String {
    job_of("t", id)
}

fn job_of(tenant: &str, id: &str) -> String {
    serde_json::to_string(&AnalysisJob {
        v: 1,
        image_id: id.into(),
        tenant: tenant.into(),
        resized_key: format!("resized/{tenant}/{id}.jpg"),
        // Every image has the same bytes: a second one is a cache hit.
        sha256: sha(JPEG),
        width: 1024,
        height: 1024,
        detail: None,
        lane: None,
        check: None,
    })
    .unwrap()
}

#[tokio::test]
async fn success_then_duplicate_then_same_bytes_is_cached() {
    let f = fixture(vec![Step::Answer], &[]).await;
    let first = f.analyzer.handle(&job("a"), 1).await;
    let AnalyzeOutcome::Done { model, cost_usd } = first else {
        panic!("{first:?}")
    };
    assert_eq!(model, "gpt-4o");
    // 1000 in × $2.50 + 100 out × $10 per 1M.
    assert!((cost_usd - 0.0035).abs() < 1e-12);
    assert_eq!(
        f.analyzer.handle(&job("a"), 2).await,
        AnalyzeOutcome::AlreadyDone
    );
    assert_eq!(
        f.analyzer.handle(&job("b"), 1).await,
        AnalyzeOutcome::Cached
    );
    assert_eq!(
        f.provider.calls().len(),
        1,
        "the provider is called once for the same bytes"
    );
    let b = f.repo.get_image("t", "b").await.unwrap().unwrap();
    let r = b.result.unwrap();
    assert!(r.cached && r.cost_usd == 0.0);
    let rows = f.repo.costs("t", "0000-01-01", "9999-12-31").await.unwrap();
    let total: f64 = rows.iter().map(|r| r.cost_usd).sum();
    assert!(
        (total - 0.0035).abs() < 1e-12,
        "ledger counts the call once"
    );
    assert_eq!(rows.iter().map(|r| r.images).sum::<u64>(), 2);
}

#[tokio::test]
async fn transient_errors_go_back_to_the_queue_with_a_delay() {
    let f = fixture(
        vec![
            Step::Fail(FailureKind::Http {
                status: 503,
                retry_after: None,
            }),
            Step::Fail(FailureKind::Http {
                status: 429,
                retry_after: Some(Duration::from_secs(3)),
            }),
            Step::Fail(FailureKind::Timeout),
        ],
        &[],
    )
    .await;
    for _ in 0..3 {
        match f.analyzer.handle(&job("a"), 1).await {
            AnalyzeOutcome::Retry { delay, .. } => assert!(
                delay >= Duration::from_secs(1) && delay <= Duration::from_secs(4),
                "{delay:?}"
            ),
            other => panic!("{other:?}"),
        }
        // Let the limiter block from the 429 pass.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        f.repo.get_image("t", "a").await.unwrap().unwrap().status,
        ImageStatus::Queued
    );
}

#[tokio::test]
async fn long_retry_after_switches_to_the_fallback_model() {
    let f = fixture(
        vec![
            Step::Fail(FailureKind::Http {
                status: 429,
                retry_after: Some(Duration::from_secs(60)),
            }),
            Step::Answer,
        ],
        &["gpt-4.1"],
    )
    .await;
    let out = f.analyzer.handle(&job("a"), 1).await;
    assert!(
        matches!(&out, AnalyzeOutcome::Done { model, .. } if model == "gpt-4.1"),
        "{out:?}"
    );
    assert_eq!(f.provider.calls(), vec!["gpt-4o", "gpt-4.1"]);
}

#[tokio::test]
async fn invalid_output_is_retried_once_then_permanent() {
    let f = fixture(
        vec![
            Step::Fail(FailureKind::InvalidOutput),
            Step::Fail(FailureKind::InvalidOutput),
        ],
        &[],
    )
    .await;
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Failed(_)
    ));
    assert_eq!(f.provider.calls().len(), 2);
    let rec = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert_eq!(rec.status, ImageStatus::Failed);
    assert!(rec.error.unwrap().contains("gpt-4o"));

    let f = fixture(
        vec![Step::Fail(FailureKind::InvalidOutput), Step::Answer],
        &[],
    )
    .await;
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
}

#[tokio::test]
async fn permanent_errors_and_bad_messages_are_not_retried() {
    let f = fixture(
        vec![Step::Fail(FailureKind::Http {
            status: 400,
            retry_after: None,
        })],
        &[],
    )
    .await;
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Failed(_)
    ));
    assert_eq!(
        f.repo.get_image("t", "a").await.unwrap().unwrap().status,
        ImageStatus::Failed
    );
    for body in [
        "",
        "{",
        "[]",
        r#"{"v":1}"#,
        r#"{"v":9,"image_id":"a","tenant":"t","resized_key":"k","sha256":"x","width":1,"height":1}"#,
    ] {
        // Never dropped: handed back so the queue's redrive moves it to the DLQ.
        assert!(
            matches!(
                f.analyzer.handle(body, 1).await,
                // Each reason names what is wrong with the message (JobParseError).
                AnalyzeOutcome::Retry { reason, .. } if reason.contains("job message")
            ),
            "{body:?}"
        );
    }
    let unknown = job("a").replace("\"image_id\":\"a\"", "\"image_id\":\"zzz\"");
    assert!(matches!(
        f.analyzer.handle(&unknown, 1).await,
        AnalyzeOutcome::Retry { reason, .. } if reason.contains("no record")
    ));
}

#[tokio::test]
async fn concurrent_copies_of_the_same_bytes_call_the_provider_once() {
    let f = fixture(vec![Step::Answer, Step::Answer], &[]).await;
    *f.provider.latency.lock().unwrap() = Duration::from_millis(300);
    // Two deliveries of one job and a job for another image with the same bytes, at once,
    // through one Analyzer (one Lambda instance, or one local worker pool).
    let (ja, jb) = (job("a"), job("b"));
    let (x, y, z) = tokio::join!(
        f.analyzer.handle(&ja, 1),
        f.analyzer.handle(&ja, 1),
        f.analyzer.handle(&jb, 1),
    );
    assert_eq!(f.provider.calls().len(), 1, "{x:?} {y:?} {z:?}");
    let done = [&x, &y, &z]
        .iter()
        .filter(|o| matches!(o, AnalyzeOutcome::Done { .. }))
        .count();
    assert_eq!(done, 1, "{x:?} {y:?} {z:?}");
    // The others waited in hand for the one call (300 ms, far below its claim's lease)
    // instead of going back to the queue until the lease ran out: the copy of `a` finds its
    // result, `b` stores it at $0.
    assert!(
        [&x, &y]
            .iter()
            .any(|o| matches!(o, AnalyzeOutcome::AlreadyDone)),
        "{x:?} {y:?}"
    );
    assert!(
        matches!(z, AnalyzeOutcome::Done { .. } | AnalyzeOutcome::Cached),
        "{z:?}"
    );
    assert_eq!(
        f.repo.get_image("t", "b").await.unwrap().unwrap().status,
        ImageStatus::Done
    );
    // Both images have their result on the ledger, one provider call paid for them.
    let rows = f.repo.costs("t", "0000-01-01", "9999-12-31").await.unwrap();
    assert_eq!(rows.iter().map(|r| r.images).sum::<u64>(), 2);
    assert_eq!(rows.iter().map(|r| r.calls).sum::<u64>(), 1);
}

#[tokio::test]
async fn a_fallback_answer_is_never_served_as_the_primary_models() {
    let f = fixture(
        vec![
            Step::Fail(FailureKind::Http {
                status: 503,
                retry_after: None,
            }),
            Step::Answer,
            Step::Answer,
        ],
        &["gpt-4.1"],
    )
    .await;
    let a = f.analyzer.handle(&job("a"), 1).await;
    assert!(matches!(&a, AnalyzeOutcome::Done { model, .. } if model == "gpt-4.1"));
    let rec = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert!(rec.result.unwrap().idempotency_key.contains("gpt-4.1"));
    // Same bytes, primary healthy again: the primary model answers, not gpt-4.1's cache entry.
    let b = f.analyzer.handle(&job("b"), 1).await;
    assert!(
        matches!(&b, AnalyzeOutcome::Done { model, .. } if model == "gpt-4o"),
        "{b:?}"
    );
    assert_eq!(f.provider.calls(), vec!["gpt-4o", "gpt-4.1", "gpt-4o"]);
}

#[tokio::test]
async fn the_last_delivery_marks_the_image_failed_and_still_retries() {
    let f = fixture(
        vec![
            Step::Fail(FailureKind::Http {
                status: 503,
                retry_after: None,
            }),
            Step::Fail(FailureKind::Http {
                status: 503,
                retry_after: None,
            }),
        ],
        &[],
    )
    .await;
    assert!(f.analyzer.handle(&job("a"), 4).await.is_retry());
    assert_eq!(
        f.repo.get_image("t", "a").await.unwrap().unwrap().status,
        ImageStatus::Queued
    );
    // Delivery 5 of 5: the message goes on to the DLQ, the image says why.
    assert!(f.analyzer.handle(&job("a"), 5).await.is_retry());
    let rec = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert_eq!(rec.status, ImageStatus::Failed);
    assert!(rec.error.unwrap().contains("gave up after 5 deliveries"));
}

#[tokio::test]
async fn a_job_whose_bytes_do_not_match_its_sha256_is_never_analysed() {
    // A replayed upload URL put other bytes where the job's object was: the analyzer must
    // not analyse (nor cache under this hash) content the job was not made for.
    let f = fixture(vec![Step::Answer], &[]).await;
    f.blobs
        .put("resized/t/a.jpg", vec![0xFF, 0xD8, 9, 9, 9], "image/jpeg")
        .await
        .unwrap();
    let out = f.analyzer.handle(&job("a"), 1).await;
    assert!(
        matches!(&out, AnalyzeOutcome::Retry { reason, .. } if reason.contains("not the job's")),
        "{out:?}"
    );
    assert!(f.provider.calls().is_empty());
    // On the last delivery the image is failed with the reason.
    assert!(f.analyzer.handle(&job("a"), 5).await.is_retry());
    let rec = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert_eq!(rec.status, ImageStatus::Failed);
    assert!(rec.error.unwrap().contains("not the job's"));
    // Its claim was given back each time: the same bytes for another image go straight
    // through instead of waiting for a lease to run out.
    assert!(matches!(
        f.analyzer.handle(&job("b"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
}

#[tokio::test]
async fn a_job_for_content_its_image_no_longer_has_is_stale() {
    let f = fixture(vec![Step::Answer], &[]).await;
    let other = job("a").replace(&sha(JPEG), &"cd".repeat(32));
    assert!(matches!(
        f.analyzer.handle(&other, 1).await,
        AnalyzeOutcome::Stale(_)
    ));
    assert!(f.provider.calls().is_empty());
    assert_eq!(
        f.repo.get_image("t", "a").await.unwrap().unwrap().status,
        ImageStatus::Queued,
        "the image's own job still runs"
    );
}

#[tokio::test]
async fn the_cache_is_scoped_by_tenant_unless_shared() {
    let f = fixture(vec![Step::Answer, Step::Answer], &[]).await;
    assert!(matches!(
        f.analyzer.handle(&job_of("t", "a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    // Tenant u has the same bytes: it gets its own answer, never tenant t's.
    assert!(matches!(
        f.analyzer.handle(&job_of("u", "a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    assert_eq!(f.provider.calls().len(), 2);
    let t = f
        .repo
        .get_image("t", "a")
        .await
        .unwrap()
        .unwrap()
        .result
        .unwrap();
    let u = f
        .repo
        .get_image("u", "a")
        .await
        .unwrap()
        .unwrap()
        .result
        .unwrap();
    assert_ne!(t.idempotency_key, u.idempotency_key);

    let shared = fixture_with(
        vec![Step::Answer],
        Settings {
            share_cache_across_tenants: true,
            ..Settings::default()
        },
    )
    .await;
    assert!(matches!(
        shared.analyzer.handle(&job_of("t", "a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    assert_eq!(
        shared.analyzer.handle(&job_of("u", "a"), 1).await,
        AnalyzeOutcome::Cached,
        "sharing across tenants is an explicit setting"
    );
    assert_eq!(shared.provider.calls().len(), 1);
}

#[tokio::test]
async fn an_answer_for_an_image_done_meanwhile_is_booked_cached_and_frees_its_claim() {
    let f = fixture(vec![Step::Answer], &[]).await;
    *f.provider.latency.lock().unwrap() = Duration::from_millis(300);
    let analyzer = f.analyzer.clone();
    let call = tokio::spawn(async move { analyzer.handle(&job("a"), 1).await });
    // While the call is in flight, image a gets a result some other way.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = sightline_core::model::AnalysisResult {
        provider: "openai".into(),
        model: "gpt-4o".into(),
        analysis: serde_json::json!({"description": "first"}),
        usage: Usage::default(),
        cost_usd: 0.0,
        cached: true,
        calls: 0,
        usage_estimated: false,
        cost_at_estimate_usd: 0.0,
        lane: Default::default(),
        batch_id: None,
        saved_usd: 0.0,
        reused_from: None,
        idempotency_key: "elsewhere".into(),
        prompt_version: "v1".into(),
        price_version: "x".into(),
        completed_at: "2026-11-30T00:00:00.000Z".into(),
    };
    f.repo.complete("t", "a", &other, 0.0).await.unwrap();
    assert_eq!(call.await.unwrap(), AnalyzeOutcome::AlreadyDone);
    let a = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert_eq!(
        a.extra_spend.map(|e| e.calls),
        Some(1),
        "the late answer is on its image"
    );
    // The paid answer is in the ledger (no image counted) and in the cache: image b, with
    // the same bytes, is served at once at $0, not told to wait for a stuck claim.
    let rows = f.repo.costs("t", "0000-01-01", "9999-12-31").await.unwrap();
    assert_eq!(rows.iter().map(|r| r.calls).sum::<u64>(), 1);
    assert!((rows.iter().map(|r| r.cost_usd).sum::<f64>() - 0.0035).abs() < 1e-12);
    assert_eq!(
        f.analyzer.handle(&job("b"), 1).await,
        AnalyzeOutcome::Cached
    );
    assert_eq!(f.provider.calls().len(), 1);
}

#[tokio::test]
async fn a_truncated_paid_answer_is_booked_at_its_estimate() {
    // Truncated, then a good answer: the result carries both calls, one at its estimate.
    let f = fixture(vec![Step::Truncated, Step::Answer], &[]).await;
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    let r = f
        .repo
        .get_image("t", "a")
        .await
        .unwrap()
        .unwrap()
        .result
        .unwrap();
    let table = sightline_core::PriceTable::builtin();
    let est = table
        .estimate(
            "gpt-4o",
            1024,
            1024,
            &Settings::default().estimate_params(Detail::High),
        )
        .unwrap();
    assert!(r.usage_estimated);
    assert_eq!(r.calls, 2);
    assert!((r.cost_at_estimate_usd - est.cost_usd).abs() < 1e-12);
    assert!((r.cost_usd - (est.cost_usd + 0.0035)).abs() < 1e-12);
    assert_eq!(r.usage.input_tokens, 1000 + est.input_tokens);
    let rows = f.repo.costs("t", "0000-01-01", "9999-12-31").await.unwrap();
    assert_eq!(rows[0].calls_at_estimate, 1);
    assert!((rows[0].cost_usd - r.cost_usd).abs() < 1e-12);

    // Truncated twice: the image fails, and both paid calls are still booked.
    let f = fixture(vec![Step::Truncated, Step::Truncated], &[]).await;
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Failed(_)
    ));
    let rows = f.repo.costs("t", "0000-01-01", "9999-12-31").await.unwrap();
    assert_eq!(
        (rows[0].images, rows[0].calls, rows[0].calls_at_estimate),
        (0, 2, 2)
    );
    assert!((rows[0].cost_usd - 2.0 * est.cost_usd).abs() < 1e-12);
    // ... on the image too: every paid call belongs to an image.
    let failed = f.repo.get_image("t", "a").await.unwrap().unwrap();
    let extra = failed.extra_spend.unwrap();
    assert_eq!(extra.calls, 2);
    assert!((extra.cost_usd - rows[0].cost_usd).abs() < 1e-12);

    // An answer without usage is kept and booked at its estimate, not at $0.
    let f = fixture(vec![Step::AnswerWithoutUsage], &[]).await;
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Done { cost_usd, .. } if (cost_usd - est.cost_usd).abs() < 1e-12
    ));
    let r = f
        .repo
        .get_image("t", "a")
        .await
        .unwrap()
        .unwrap()
        .result
        .unwrap();
    assert!(r.usage_estimated && r.calls == 1);
}

#[tokio::test]
async fn a_duplicate_job_of_a_permanently_failed_image_is_not_paid_again() {
    let f = fixture(vec![Step::Truncated, Step::Truncated, Step::Answer], &[]).await;
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Failed(_)
    ));
    assert_eq!(f.provider.calls().len(), 2);
    let rec = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert!(rec.permanent_failure);
    // A duplicate delivery (SQS delivers at least once) changes nothing and calls nobody.
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Failed(_)
    ));
    assert_eq!(f.provider.calls().len(), 2);

    // An image that only gave up after transient errors may still be completed by a redrive.
    let f = fixture(vec![Step::Fail(FailureKind::Timeout), Step::Answer], &[]).await;
    assert!(f.analyzer.handle(&job("a"), 5).await.is_retry());
    let rec = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert_eq!(rec.status, ImageStatus::Failed);
    assert!(!rec.permanent_failure);
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
}

/// Settings under which one request a second is the whole limit and nothing is waited for in
/// place: whoever takes the slot goes, the next caller is sent back to the queue.
fn one_a_second() -> Settings {
    Settings {
        rpm: 60,
        tpm: 0,
        max_concurrency: 2,
        max_inline_wait: Duration::ZERO,
        ..Settings::default()
    }
}

fn second_analyzer(f: &Fixture, settings: Settings) -> Analyzer {
    Analyzer::new(
        f.blobs.clone(),
        f.repo.clone(),
        f.provider.clone(),
        Arc::new(Settings {
            model: "gpt-4o".into(),
            ..settings
        }),
        Arc::new(SystemClock),
    )
}

#[tokio::test]
async fn analyzers_sharing_a_store_draw_from_one_limit_instead_of_a_share_each() {
    // Without the shared limit each of the 2 instances keeps half of 60 RPM: both go.
    let f = fixture_with(vec![], one_a_second()).await;
    let other = second_analyzer(&f, one_a_second());
    assert!(matches!(
        f.analyzer.handle(&job_of("t", "a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    assert!(matches!(
        other.handle(&job_of("u", "a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));

    // Sharing one limit through a store: the global 60 RPM, whose one slot the first took.
    let f = fixture_with(vec![], one_a_second()).await;
    let store = Arc::new(SqliteRepository::new(SqliteDb::in_memory().unwrap()));
    let first = f.analyzer.clone().with_shared_limit(store.clone());
    let other = second_analyzer(&f, one_a_second()).with_shared_limit(store);
    assert!(matches!(
        first.handle(&job_of("t", "a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    match other.handle(&job_of("u", "a"), 1).await {
        AnalyzeOutcome::Retry { delay, reason } => {
            assert!(reason.contains("rate limit"), "{reason}");
            assert!(
                delay > Duration::from_millis(500) && delay <= Duration::from_millis(1_200),
                "{delay:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.provider.calls().len(), 1);
}

#[tokio::test]
async fn a_429_holds_every_analyzer_sharing_the_limit_until_its_retry_after() {
    let settings = Settings {
        max_inline_wait: Duration::ZERO,
        ..Settings::default()
    };
    let f = fixture_with(
        vec![Step::Fail(FailureKind::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(30)),
        })],
        settings.clone(),
    )
    .await;
    let store = Arc::new(SqliteRepository::new(SqliteDb::in_memory().unwrap()));
    let first = f.analyzer.clone().with_shared_limit(store.clone());
    let other = second_analyzer(&f, settings).with_shared_limit(store);
    assert!(first.handle(&job_of("t", "a"), 1).await.is_retry());
    // The other instance never called: the block reached it through the store.
    match other.handle(&job_of("u", "a"), 1).await {
        AnalyzeOutcome::Retry { delay, .. } => {
            assert!(delay >= Duration::from_secs(29), "{delay:?}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.provider.calls().len(), 1);
}

/// A store whose shared limit cannot be reached.
struct DownLimits;

#[async_trait]
impl RateLimitStore for DownLimits {
    async fn apply_limit(
        &self,
        _key: &str,
        _limits: &Limits,
        _op: &LimitOp,
        _clock: Arc<dyn Clock>,
    ) -> Result<LimitOutcome, StoreError> {
        Err(StoreError::Transient("table unreachable".into()))
    }
}

#[tokio::test]
async fn a_shared_limit_that_cannot_be_reached_sends_the_job_back_without_calling() {
    let f = fixture(vec![], &[]).await;
    let analyzer = f.analyzer.clone().with_shared_limit(Arc::new(DownLimits));
    match analyzer.handle(&job("a"), 1).await {
        AnalyzeOutcome::Retry { reason, .. } => assert!(reason.contains("rate limit"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(f.provider.calls().is_empty());
}
