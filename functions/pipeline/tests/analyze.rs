//! The analyze use-case with a scripted provider on the local adapters.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sightline_core::model::{AnalysisJob, ImageRecord, ImageStatus};
use sightline_core::pricing::Usage;
use sightline_core::retry::FailureKind;
use sightline_pipeline::analyze::{AnalyzeOutcome, Analyzer};
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteRepository};
use sightline_pipeline::ports::{
    BlobStore, ProviderError, RateInfo, Repository, SystemClock, VisionProvider, VisionRequest,
    VisionResponse,
};
use sightline_pipeline::Settings;

type Step = Result<(), FailureKind>;

/// Answers from a script; records which models were called.
struct Scripted {
    steps: Mutex<VecDeque<Step>>,
    calls: Mutex<Vec<String>>,
    /// How long each call takes.
    latency: Mutex<Duration>,
}

impl Scripted {
    fn new(steps: Vec<Step>) -> Arc<Scripted> {
        Arc::new(Scripted {
            steps: Mutex::new(steps.into()),
            calls: Mutex::new(Vec::new()),
            latency: Mutex::new(Duration::ZERO),
        })
    }
    fn calls(&self) -> Vec<String> {
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
        let step = self.steps.lock().unwrap().pop_front().unwrap_or(Ok(()));
        match step {
            Ok(()) => Ok(VisionResponse {
                analysis: serde_json::json!({"description": "ok", "tags": []}),
                usage: Usage {
                    input_tokens: 1000,
                    output_tokens: 100,
                    cached_tokens: 0,
                },
                model: req.model.clone(),
                rate: RateInfo::default(),
            }),
            Err(kind) => Err(ProviderError {
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
    provider: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

async fn fixture(steps: Vec<Step>, fallback: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
    let repo: Arc<dyn Repository> = Arc::new(SqliteRepository::new(SqliteDb::in_memory().unwrap()));
    let provider = Scripted::new(steps);
    let settings = Settings {
        model: "gpt-4o".into(),
        fallback_models: fallback.iter().map(|s| s.to_string()).collect(),
        ..Settings::default()
    };
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        provider.clone(),
        Arc::new(settings),
        Arc::new(SystemClock),
    );
    for id in ["a", "b"] {
        blobs
            .put(
                &format!("resized/t/{id}.jpg"),
                vec![0xFF, 0xD8, 1, 2, 3],
                "image/jpeg",
            )
            .await
            .unwrap();
        repo.put_image(&record(id)).await.unwrap();
    }
    Fixture {
        analyzer,
        repo,
        provider,
        _dir: dir,
    }
}

fn record(id: &str) -> ImageRecord {
    ImageRecord {
        image_id: id.into(),
        tenant: "t".into(),
        source: format!("{id}.jpg"),
        status: ImageStatus::Queued,
        error: None,
        original: None,
        resized: None,
        orientation: None,
        sha256: Some("ab".repeat(32)),
        resized_key: Some(format!("resized/t/{id}.jpg")),
        estimate: None,
        original_estimate: None,
        result: None,
        created_at: "2026-11-22T00:00:00.000Z".into(),
        updated_at: "2026-11-22T00:00:00.000Z".into(),
    }
}

fn job(id: &str) -> String {
    serde_json::to_string(&AnalysisJob {
        v: 1,
        image_id: id.into(),
        tenant: "t".into(),
        resized_key: format!("resized/t/{id}.jpg"),
        // Both images have the same bytes: the second is a cache hit.
        sha256: "ab".repeat(32),
        width: 1024,
        height: 1024,
    })
    .unwrap()
}

#[tokio::test]
async fn success_then_duplicate_then_same_bytes_is_cached() {
    let f = fixture(vec![Ok(())], &[]).await;
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
            Err(FailureKind::Http {
                status: 503,
                retry_after: None,
            }),
            Err(FailureKind::Http {
                status: 429,
                retry_after: Some(Duration::from_secs(3)),
            }),
            Err(FailureKind::Timeout),
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
            Err(FailureKind::Http {
                status: 429,
                retry_after: Some(Duration::from_secs(60)),
            }),
            Ok(()),
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
            Err(FailureKind::InvalidOutput),
            Err(FailureKind::InvalidOutput),
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

    let f = fixture(vec![Err(FailureKind::InvalidOutput), Ok(())], &[]).await;
    assert!(matches!(
        f.analyzer.handle(&job("a"), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
}

#[tokio::test]
async fn permanent_errors_and_bad_messages_are_not_retried() {
    let f = fixture(
        vec![Err(FailureKind::Http {
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
                AnalyzeOutcome::Retry { reason, .. } if reason.contains("malformed")
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
    let f = fixture(vec![Ok(()), Ok(())], &[]).await;
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
    assert!([&x, &y, &z].iter().all(|o| matches!(
        o,
        AnalyzeOutcome::Done { .. } | AnalyzeOutcome::Retry { .. }
    )));
    let rows = f.repo.costs("t", "0000-01-01", "9999-12-31").await.unwrap();
    assert_eq!(rows.iter().map(|r| r.images).sum::<u64>(), 1);
}

#[tokio::test]
async fn a_fallback_answer_is_never_served_as_the_primary_models() {
    let f = fixture(
        vec![
            Err(FailureKind::Http {
                status: 503,
                retry_after: None,
            }),
            Ok(()),
            Ok(()),
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
            Err(FailureKind::Http {
                status: 503,
                retry_after: None,
            }),
            Err(FailureKind::Http {
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
