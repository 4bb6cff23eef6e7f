//! sightline-analyze: an SQS batch (event source mapping with `ReportBatchItemFailures`) →
//! one [`Analyzer::handle`] per record, a few at a time, through the pipeline's
//! [`SqsBatchHandler`] (retries with visibility delays, batch item failures, the deadline, a
//! span per record with its `message_id`, `image_id` and `tenant`, EMF metrics per invocation).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use sightline_pipeline::analyze::Analyzer;
pub use sightline_pipeline::aws::sqs_batch::{
    receive_count, record_span, SqsBatchHandler, UnreportableRetry, DEFAULT_CONCURRENCY,
};

/// The analyze function's handler.
pub type AnalyzeHandler = SqsBatchHandler<Analyzer>;

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
    use sightline_core::budget::{BudgetCaps, Periods};
    use sightline_core::model::{AnalysisResult, ImageRecord, ImageStatus};
    use sightline_pipeline::analyze::AnalyzeOutcome;
    use sightline_pipeline::local::FileBlobStore;
    use sightline_pipeline::metrics::emf::Emf;
    use sightline_pipeline::metrics::emf::MemoryLines;
    use sightline_pipeline::ports::*;
    use sightline_pipeline::providers::local::LocalAnalyzer;
    use sightline_pipeline::Settings;
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    /// The handler with its EMF lines kept in memory.
    fn quiet(mut handler: AnalyzeHandler) -> (AnalyzeHandler, Arc<MemoryLines>) {
        let lines = Arc::new(MemoryLines::default());
        handler.emf = Emf::new("analyze-fn", lines.clone());
        (handler, lines)
    }

    /// A repository whose every call fails transiently (a DynamoDB outage).
    struct DownRepo;

    fn down<T>() -> StoreResult<T> {
        Err(StoreError::Transient("throttled".into()))
    }

    #[async_trait]
    impl Repository for DownRepo {
        async fn reserve_budget(
            &self,
            _: &str,
            _: &Periods,
            _: f64,
            _: &BudgetCaps,
            _: u64,
            _: u64,
        ) -> StoreResult<BudgetHold> {
            down()
        }
        async fn settle_budget(&self, _: &str, _: &Periods, _: &str) -> StoreResult<()> {
            down()
        }
        async fn budget_counts(&self, _: &str, _: &Periods, _: u64) -> StoreResult<BudgetCounts> {
            down()
        }
        async fn tenant_budget(&self, _: &str) -> StoreResult<Option<BudgetCaps>> {
            down()
        }
        async fn set_tenant_budget(&self, _: &str, _: Option<&BudgetCaps>) -> StoreResult<()> {
            down()
        }
        async fn put_image(&self, _: &ImageRecord, _: Option<u64>) -> StoreResult<PutImage> {
            down()
        }
        async fn get_image(&self, _: &str, _: &str) -> StoreResult<Option<ImageRecord>> {
            down()
        }
        async fn list_images(
            &self,
            _: &str,
            _: Option<ImageStatus>,
            _: usize,
            _: Option<&str>,
        ) -> StoreResult<ImagePage> {
            down()
        }
        async fn mark_failed(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: Failure,
            _: &str,
        ) -> StoreResult<()> {
            down()
        }
        async fn claim(&self, _: &str, _: &str, _: Duration, _: u64) -> StoreResult<Claim> {
            down()
        }
        async fn release_claim(&self, _: &str, _: &str) -> StoreResult<()> {
            down()
        }
        async fn complete(
            &self,
            _: &str,
            _: &str,
            _: &AnalysisResult,
            _: f64,
        ) -> StoreResult<Completion> {
            down()
        }
        async fn costs(&self, _: &str, _: &str, _: &str) -> StoreResult<Vec<CostRow>> {
            down()
        }
        async fn set_recheck(&self, _: &str, _: &str, _: Option<u64>) -> StoreResult<()> {
            down()
        }
        async fn due_rechecks(&self, _: u64, _: usize) -> StoreResult<Vec<ImageRecord>> {
            down()
        }
        async fn expire_pending(&self, _: &str, _: &str) -> StoreResult<bool> {
            down()
        }
        async fn delete_image(&self, _: &str, _: &str) -> StoreResult<bool> {
            down()
        }
        async fn cache_result(&self, _: &AnalysisResult) -> StoreResult<()> {
            down()
        }
        async fn book_spend(&self, _: &str, _: &str, _: &str, _: &Spend) -> StoreResult<()> {
            down()
        }
        async fn add_api_key(&self, _: &str, _: &str, _: &str) -> StoreResult<()> {
            down()
        }
        async fn list_api_keys(&self, _: &str) -> StoreResult<Vec<ApiKeyInfo>> {
            down()
        }
        async fn revoke_api_key(&self, _: &str, _: &str) -> StoreResult<bool> {
            down()
        }
        async fn tenant_for_key(&self, _: &str) -> StoreResult<Option<String>> {
            down()
        }
    }

    /// An analyzer whose repository is down: every record is a transient failure.
    fn analyzer_over_down_repo(dir: &std::path::Path) -> Analyzer {
        Analyzer::new(
            Arc::new(FileBlobStore::new(dir)),
            Arc::new(DownRepo),
            Arc::new(LocalAnalyzer),
            Arc::new(Settings::default()),
            Arc::new(SystemClock),
        )
    }

    #[derive(Default)]
    struct RecordingQueue {
        retries: Mutex<Vec<(String, Duration)>>,
    }

    #[async_trait]
    impl Queue for RecordingQueue {
        async fn send(&self, _: Vec<String>) -> StoreResult<()> {
            Ok(())
        }
        async fn receive(&self, _: usize, _: Duration) -> StoreResult<Vec<QueueMessage>> {
            Ok(vec![])
        }
        async fn delete(&self, _: &str) -> StoreResult<()> {
            Ok(())
        }
        async fn retry_after(&self, receipt: &str, delay: Duration) -> StoreResult<()> {
            self.retries
                .lock()
                .unwrap()
                .push((receipt.to_string(), delay));
            Ok(())
        }
    }

    fn record(id: Option<&str>, receipt: &str, body: &str, count: &str) -> SqsMessage {
        let mut m = SqsMessage::default();
        m.message_id = id.map(str::to_string);
        m.receipt_handle = Some(receipt.to_string());
        m.body = Some(body.to_string());
        m.attributes
            .insert("ApproximateReceiveCount".into(), count.into());
        m
    }

    const JOB: &str = r#"{"v":1,"image_id":"img","tenant":"acme","resized_key":"resized/acme/img.jpg","sha256":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","width":10,"height":10}"#;

    #[tokio::test]
    async fn transient_records_are_reported_and_delayed_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(RecordingQueue::default());
        let analyzer = analyzer_over_down_repo(dir.path());
        let (handler, lines) = quiet(AnalyzeHandler::new(analyzer, queue.clone(), "analyze"));
        let mut event = SqsEvent::default();
        event.records = vec![
            record(Some("m1"), "r1", JOB, "2"),
            record(Some("m2"), "r2", "not json", "1"),
            record(None, "r3", JOB, "1"),
        ];
        let (resp, outcomes) = handler.handle_with_outcomes(event.clone(), None).await;
        let mut failed: Vec<&str> = resp
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        failed.sort();
        // m2 is malformed: kept (reported) so the redrive policy moves it to the DLQ.
        assert_eq!(failed, vec!["m1", "m2"]);
        assert!(resp
            .batch_item_failures
            .iter()
            .all(|f| !f.item_identifier.is_empty()));
        assert_eq!(outcomes.len(), 3);
        let m2 = outcomes.iter().find(|(id, _)| id == "m2").unwrap();
        assert!(
            matches!(&m2.1, AnalyzeOutcome::Retry { reason, .. } if reason.contains("malformed"))
        );
        let mut retries = queue.retries.lock().unwrap().clone();
        retries.sort();
        assert_eq!(
            retries.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
            vec!["r1", "r2", "r3"]
        );
        assert!(retries
            .iter()
            .all(|(_, d)| *d > Duration::ZERO && *d <= Duration::from_secs(43_200)));
        let docs = emf_docs(&lines);
        let totals = function_doc(&docs);
        assert_eq!(totals["Retries"], 3.0);
        assert_eq!(totals["ImagesProcessed"], 0.0);
        assert_eq!(totals["RecordLatency"].as_array().map(Vec::len), Some(3));
    }

    #[tokio::test]
    async fn a_retry_without_message_id_fails_the_invocation() {
        let dir = tempfile::tempdir().unwrap();
        let analyzer = analyzer_over_down_repo(dir.path());
        let (handler, _) = quiet(AnalyzeHandler::new(
            analyzer,
            Arc::new(RecordingQueue::default()),
            "analyze",
        ));
        let mut event = SqsEvent::default();
        event.records = vec![record(Some("m1"), "r1", JOB, "1")];
        assert!(handler.handle(event.clone(), None).await.is_ok());
        event.records.push(record(None, "r2", JOB, "1"));
        assert!(handler.handle(event, None).await.is_err());
    }

    #[tokio::test]
    async fn nothing_starts_near_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(RecordingQueue::default());
        let analyzer = analyzer_over_down_repo(dir.path());
        let (handler, lines) = quiet(AnalyzeHandler::new(analyzer, queue.clone(), "analyze"));
        let mut event = SqsEvent::default();
        event.records = vec![
            record(Some("m1"), "r1", JOB, "1"),
            record(Some("m2"), "r2", JOB, "1"),
        ];
        let deadline = SystemTime::now() + Duration::from_secs(10);
        let (resp, outcomes) = handler.handle_with_outcomes(event, Some(deadline)).await;
        assert_eq!(resp.batch_item_failures.len(), 2);
        assert!(outcomes.iter().all(|(_, o)| matches!(
            o,
            AnalyzeOutcome::Retry { delay, reason } if delay.is_zero() && reason.contains("deadline")
        )));
        let retries = queue.retries.lock().unwrap().clone();
        assert!(retries.len() == 2 && retries.iter().all(|(_, d)| d.is_zero()));
        // Both went back to the queue unstarted: retries, and no latency of handling.
        let docs = emf_docs(&lines);
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0]["Retries"], 2.0);
        assert!(docs[0].get("RecordLatency").is_none());
    }

    #[test]
    fn receive_count_defaults_to_one() {
        assert_eq!(receive_count(&record(Some("m"), "r", "", "3")), 3);
        assert_eq!(receive_count(&record(Some("m"), "r", "", "x")), 1);
        assert_eq!(receive_count(&SqsMessage::default()), 1);
    }

    // ---- metrics: the handler over the local adapters with a scripted, paid provider

    use serde_json::Value;
    use sightline_core::pricing::Usage;
    use sightline_core::retry::FailureKind;
    use sightline_pipeline::ingest::{Ingest, IngestOutcome};
    use sightline_pipeline::local::{SqliteDb, SqliteRepository};
    use std::collections::VecDeque;

    const USAGE: Usage = Usage {
        input_tokens: 1000,
        output_tokens: 100,
        cached_tokens: 0,
    };

    /// A paid provider answering from a script (an answer with [`USAGE`] once it runs out).
    struct Scripted {
        steps: Mutex<VecDeque<Result<Usage, FailureKind>>>,
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
            let step = self.steps.lock().unwrap().pop_front().unwrap_or(Ok(USAGE));
            match step {
                Ok(usage) => Ok(VisionResponse {
                    analysis: serde_json::json!({"description": "ok", "tags": []}),
                    usage: Some(usage),
                    model: req.model.clone(),
                    rate: RateInfo::default(),
                }),
                Err(kind) => Err(ProviderError {
                    kind,
                    message: "scripted".into(),
                    rate: RateInfo::default(),
                    usage: None,
                    billed: false,
                }),
            }
        }
    }

    /// A small PNG whose pixels differ for every `n`.
    fn png(n: u8) -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(32, 24, |x, y| image::Rgb([x as u8 * 7, y as u8 * 9, n]));
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    }

    struct Paid {
        handler: AnalyzeHandler,
        lines: Arc<MemoryLines>,
        repo: Arc<dyn Repository>,
        /// One SQS record per image, in order (message id = `m-{image id}`).
        event: SqsEvent,
        _dir: tempfile::TempDir,
    }

    /// Images ingested (resized, recorded, job made) for tenant `acme`, then a handler whose
    /// analyzer calls `steps` on model gpt-4o (then `fallback`), one record at a time.
    async fn paid(
        images: &[(&str, Vec<u8>)],
        steps: Vec<Result<Usage, FailureKind>>,
        fallback: &[&str],
    ) -> Paid {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
        let repo: Arc<dyn Repository> =
            Arc::new(SqliteRepository::new(SqliteDb::in_memory().unwrap()));
        let settings = Arc::new(Settings {
            model: "gpt-4o".into(),
            fallback_models: fallback.iter().map(|m| m.to_string()).collect(),
            ..Settings::default()
        });
        let queue = Arc::new(RecordingQueue::default());
        let ingest = Ingest::new(
            blobs.clone(),
            repo.clone(),
            queue.clone(),
            settings.clone(),
            Arc::new(SystemClock),
            "uploads/",
        );
        let mut event = SqsEvent::default();
        for (id, bytes) in images {
            let out = ingest
                .ingest_bytes("acme", id, "test", None, bytes.clone())
                .await
                .unwrap();
            let IngestOutcome::Queued(job) = out else {
                panic!("not queued: {out:?}")
            };
            let body = serde_json::to_string(&job).unwrap();
            event.records.push(record(
                Some(&format!("m-{id}")),
                &format!("r-{id}"),
                &body,
                "1",
            ));
        }
        let provider = Arc::new(Scripted {
            steps: Mutex::new(steps.into()),
        });
        let analyzer = Analyzer::new(
            blobs,
            repo.clone(),
            provider,
            settings,
            Arc::new(SystemClock),
        );
        let (mut handler, lines) = quiet(AnalyzeHandler::new(analyzer, queue, "analyze"));
        handler.concurrency = 1;
        Paid {
            handler,
            lines,
            repo,
            event,
            _dir: dir,
        }
    }

    fn emf_docs(lines: &MemoryLines) -> Vec<Value> {
        lines
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The document of the counters without a model (exactly one per invocation here).
    fn function_doc(docs: &[Value]) -> Value {
        let found: Vec<&Value> = docs.iter().filter(|d| d.get("Model").is_none()).collect();
        assert_eq!(found.len(), 1, "{docs:?}");
        found[0].clone()
    }

    fn model_doc(docs: &[Value], model: &str) -> Value {
        docs.iter()
            .find(|d| d["Model"] == model)
            .unwrap_or_else(|| panic!("no document for {model}: {docs:?}"))
            .clone()
    }

    /// The unit the document's directive declares for `name`.
    fn unit(doc: &Value, name: &str) -> String {
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "sightline");
        directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["Name"] == name)
            .unwrap_or_else(|| panic!("{name} not declared in {doc}"))["Unit"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn an_invocation_emits_images_tokens_and_cost_as_emf() {
        // Two distinct images, then a copy of the first: two paid calls, one cache hit.
        let f = paid(&[("a", png(1)), ("b", png(2)), ("c", png(1))], vec![], &[]).await;
        let (resp, outcomes) = f.handler.handle_with_outcomes(f.event.clone(), None).await;
        assert!(resp.batch_item_failures.is_empty(), "{outcomes:?}");

        let docs = emf_docs(&f.lines);
        assert_eq!(
            docs.len(),
            2,
            "one line of counters, one for the model: {docs:?}"
        );
        let totals = function_doc(&docs);
        assert_eq!(totals["Function"], "analyze-fn");
        assert_eq!(
            totals["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            serde_json::json!([["Function"]])
        );
        assert_eq!(totals["ImagesProcessed"], 3.0);
        assert_eq!(totals["CacheHits"], 1.0);
        assert_eq!(totals["ImagesFailed"], 0.0);
        assert_eq!(totals["Retries"], 0.0);
        assert_eq!(unit(&totals, "ImagesProcessed"), "Count");
        assert_eq!(unit(&totals, "RecordLatency"), "Milliseconds");
        let latencies = totals["RecordLatency"].as_array().unwrap();
        assert_eq!(latencies.len(), 3);
        assert!(latencies.iter().all(|v| v.as_f64().unwrap() >= 0.0));

        // Tokens and cost are what the results recorded.
        let mut cost = 0.0;
        let mut tokens = (0, 0);
        for id in ["a", "b", "c"] {
            let r = f
                .repo
                .get_image("acme", id)
                .await
                .unwrap()
                .unwrap()
                .result
                .unwrap();
            cost += r.cost_usd;
            tokens.0 += r.usage.input_tokens;
            tokens.1 += r.usage.output_tokens;
        }
        assert_eq!(tokens, (2000, 200));
        assert!(cost > 0.0);
        let m = model_doc(&docs, "gpt-4o");
        assert_eq!(
            m["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            serde_json::json!([["Function"], ["Function", "Model"]])
        );
        assert_eq!(m["InputTokens"], 2000.0);
        assert_eq!(m["OutputTokens"], 200.0);
        assert!(
            (m["CostUsd"].as_f64().unwrap() - cost).abs() < 1e-12,
            "{m} vs {cost}"
        );
        assert_eq!(unit(&m, "CostUsd"), "None");
        assert_eq!(unit(&m, "InputTokens"), "Count");
    }

    #[tokio::test]
    async fn a_throttled_record_counts_a_provider_throttle_and_a_retry() {
        let throttled = FailureKind::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(1)),
        };
        let f = paid(&[("a", png(1))], vec![Err(throttled)], &[]).await;
        let (resp, _) = f.handler.handle_with_outcomes(f.event.clone(), None).await;
        assert_eq!(resp.batch_item_failures.len(), 1);

        let docs = emf_docs(&f.lines);
        let totals = function_doc(&docs);
        assert_eq!(totals["Retries"], 1.0);
        assert_eq!(totals["ImagesProcessed"], 0.0);
        let m = model_doc(&docs, "gpt-4o");
        assert_eq!(m["ProviderThrottles"], 1.0);
        assert_eq!(unit(&m, "ProviderThrottles"), "Count");
        assert!(m.get("CostUsd").is_none(), "nothing was paid: {m}");
    }

    #[tokio::test]
    async fn a_long_throttle_switches_to_the_fallback_model_and_counts_it() {
        let throttled = FailureKind::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(60)),
        };
        let f = paid(&[("a", png(1))], vec![Err(throttled)], &["gpt-4o-mini"]).await;
        let (resp, _) = f.handler.handle_with_outcomes(f.event.clone(), None).await;
        assert!(resp.batch_item_failures.is_empty());

        let docs = emf_docs(&f.lines);
        assert_eq!(function_doc(&docs)["ImagesProcessed"], 1.0);
        let primary = model_doc(&docs, "gpt-4o");
        assert_eq!(primary["ProviderThrottles"], 1.0);
        assert_eq!(primary["FallbackSwitches"], 1.0);
        let result = f
            .repo
            .get_image("acme", "a")
            .await
            .unwrap()
            .unwrap()
            .result
            .unwrap();
        assert_eq!(result.model, "gpt-4o-mini");
        let fallback = model_doc(&docs, "gpt-4o-mini");
        assert_eq!(fallback["InputTokens"], 1000.0);
        assert!((fallback["CostUsd"].as_f64().unwrap() - result.cost_usd).abs() < 1e-12);
    }

    #[tokio::test]
    async fn each_invocation_writes_its_own_lines() {
        let f = paid(&[("a", png(1))], vec![], &[]).await;
        f.handler.handle_with_outcomes(f.event.clone(), None).await;
        // The same message again: already done, nothing processed a second time.
        f.handler.handle_with_outcomes(f.event.clone(), None).await;
        let docs = emf_docs(&f.lines);
        let counters: Vec<&Value> = docs.iter().filter(|d| d.get("Model").is_none()).collect();
        assert_eq!(counters.len(), 2);
        assert_eq!(counters[0]["ImagesProcessed"], 1.0);
        assert_eq!(counters[1]["ImagesProcessed"], 0.0);
        assert_eq!(docs.iter().filter(|d| d["Model"] == "gpt-4o").count(), 1);
    }
}
