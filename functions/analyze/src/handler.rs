//! sightline-analyze: an SQS batch (event source mapping with `ReportBatchItemFailures`) →
//! one [`Analyzer::handle`] per record, a few at a time.
//!
//! A transient outcome makes the message visible again after the outcome's delay
//! (ChangeMessageVisibility) and reports it as a batch item failure, so only that message
//! comes back; everything else is deleted by the event source mapping. A record without a
//! message id cannot be reported (an empty identifier is invalid), so a retry of one fails
//! the whole invocation instead: everything comes back, and what was done is `AlreadyDone`.
//! Near the invocation's deadline no new record is started; those go back at once.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use sightline_pipeline::analyze::{AnalyzeOutcome, Analyzer};
use sightline_pipeline::ports::Queue;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// Records handled at once per invocation.
pub const DEFAULT_CONCURRENCY: usize = 4;

#[derive(Clone)]
pub struct AnalyzeHandler {
    pub analyzer: Analyzer,
    /// The analyze queue (for ChangeMessageVisibility on retries).
    pub queue: Arc<dyn Queue>,
    pub concurrency: usize,
    /// Time one record may take at worst; a record is not started with less time left.
    pub record_budget: Duration,
}

/// A retry the event source mapping cannot be told about (the record has no message id).
#[derive(Debug, thiserror::Error)]
#[error(
    "a record without a message id needs a retry; failing the invocation so the batch comes back"
)]
pub struct UnreportableRetry;

/// The receive count of a record (1 when absent or unreadable).
pub fn receive_count(msg: &SqsMessage) -> u32 {
    msg.attributes
        .get("ApproximateReceiveCount")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1)
        .max(1)
}

impl AnalyzeHandler {
    pub fn new(analyzer: Analyzer, queue: Arc<dyn Queue>) -> AnalyzeHandler {
        let record_budget = analyzer.settings.record_worst_case();
        AnalyzeHandler {
            analyzer,
            queue,
            concurrency: DEFAULT_CONCURRENCY,
            record_budget,
        }
    }

    /// Handle a batch that must end by `deadline` (the Lambda context's); the response lists
    /// the messages to retry.
    pub async fn handle(
        &self,
        event: SqsEvent,
        deadline: Option<SystemTime>,
    ) -> Result<SqsBatchResponse, UnreportableRetry> {
        let (response, outcomes) = self.handle_with_outcomes(event, deadline).await;
        if outcomes
            .iter()
            .any(|(id, outcome)| id.is_empty() && outcome.is_retry())
        {
            error!("{UnreportableRetry}");
            return Err(UnreportableRetry);
        }
        Ok(response)
    }

    /// Like [`handle`](Self::handle), also returning each record's outcome (by message id;
    /// records without one are listed with an empty id).
    pub async fn handle_with_outcomes(
        &self,
        event: SqsEvent,
        deadline: Option<SystemTime>,
    ) -> (SqsBatchResponse, Vec<(String, AnalyzeOutcome)>) {
        let permits = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let mut ids = HashMap::new();
        for record in event.records {
            let me = self.clone();
            let permits = permits.clone();
            let message_id = record.message_id.clone().unwrap_or_default();
            let handle = tasks.spawn(async move {
                // The semaphore is never closed; a failed acquire just runs unthrottled.
                let _permit = permits.acquire_owned().await.ok();
                let too_late = deadline.is_some_and(|d| SystemTime::now() + me.record_budget > d);
                if too_late {
                    return me.not_started(record).await;
                }
                me.handle_record(record).await
            });
            ids.insert(handle.id(), message_id);
        }
        let mut response = SqsBatchResponse::default();
        let mut outcomes = Vec::new();
        while let Some(joined) = tasks.join_next_with_id().await {
            let (message_id, outcome) = match joined {
                Ok((_, pair)) => pair,
                Err(e) => {
                    // A panic in a record's task: retry that message (Analyzer never panics).
                    let id = ids.get(&e.id()).cloned().unwrap_or_default();
                    error!(message_id = %id, error = %e, "record task failed");
                    let outcome = AnalyzeOutcome::Retry {
                        delay: Duration::from_secs(30),
                        reason: format!("task failed: {e}"),
                    };
                    (id, outcome)
                }
            };
            if outcome.is_retry() && !message_id.is_empty() {
                response.add_failure(message_id.clone());
            }
            outcomes.push((message_id, outcome));
        }
        (response, outcomes)
    }

    /// Too close to the deadline to start: straight back to the queue.
    async fn not_started(&self, record: SqsMessage) -> (String, AnalyzeOutcome) {
        let message_id = record.message_id.clone().unwrap_or_default();
        if let Some(receipt) = record.receipt_handle.as_deref().filter(|r| !r.is_empty()) {
            if let Err(e) = self.queue.retry_after(receipt, Duration::ZERO).await {
                warn!(message_id, error = %e, "could not change the message visibility");
            }
        }
        info!(
            message_id,
            "not started: the invocation is about to time out"
        );
        let outcome = AnalyzeOutcome::Retry {
            delay: Duration::ZERO,
            reason: "not started before the invocation deadline".into(),
        };
        (message_id, outcome)
    }

    async fn handle_record(&self, record: SqsMessage) -> (String, AnalyzeOutcome) {
        let message_id = record.message_id.clone().unwrap_or_default();
        let count = receive_count(&record);
        let body = record.body.as_deref().unwrap_or_default();
        let outcome = self.analyzer.handle(body, count).await;
        match &outcome {
            AnalyzeOutcome::Retry { delay, reason } => {
                info!(
                    message_id,
                    receive_count = count,
                    delay_ms = delay.as_millis() as u64,
                    reason,
                    "retry later"
                );
                match record.receipt_handle.as_deref() {
                    Some(receipt) if !receipt.is_empty() => {
                        if let Err(e) = self.queue.retry_after(receipt, *delay).await {
                            // The message still comes back after the queue's visibility timeout.
                            warn!(message_id, error = %e, "could not change the message visibility");
                        }
                    }
                    _ => warn!(
                        message_id,
                        "record has no receipt handle; default visibility applies"
                    ),
                }
            }
            AnalyzeOutcome::Failed(reason) => warn!(message_id, reason, "permanent failure"),
            other => info!(message_id, outcome = ?other, "handled"),
        }
        (message_id, outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use sightline_core::model::{AnalysisResult, ImageRecord, ImageStatus};
    use sightline_pipeline::local::FileBlobStore;
    use sightline_pipeline::ports::*;
    use sightline_pipeline::providers::local::LocalAnalyzer;
    use sightline_pipeline::Settings;
    use std::sync::Mutex;

    /// A repository whose every call fails transiently (a DynamoDB outage).
    struct DownRepo;

    fn down<T>() -> StoreResult<T> {
        Err(StoreError::Transient("throttled".into()))
    }

    #[async_trait]
    impl Repository for DownRepo {
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
        let handler = AnalyzeHandler::new(analyzer, queue.clone());
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
    }

    #[tokio::test]
    async fn a_retry_without_message_id_fails_the_invocation() {
        let dir = tempfile::tempdir().unwrap();
        let analyzer = analyzer_over_down_repo(dir.path());
        let handler = AnalyzeHandler::new(analyzer, Arc::new(RecordingQueue::default()));
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
        let handler = AnalyzeHandler::new(analyzer, queue.clone());
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
    }

    #[test]
    fn receive_count_defaults_to_one() {
        assert_eq!(receive_count(&record(Some("m"), "r", "", "3")), 3);
        assert_eq!(receive_count(&record(Some("m"), "r", "", "x")), 1);
        assert_eq!(receive_count(&SqsMessage::default()), 1);
    }
}
