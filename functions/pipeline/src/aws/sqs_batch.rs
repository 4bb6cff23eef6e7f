//! The SQS side of a queue-driven Lambda (event source mapping with
//! `ReportBatchItemFailures`): one [`Handler::handle`] per record, a few at a time. The analyze
//! and generate functions are this over the [`crate::analyze::Analyzer`] and the
//! [`crate::generation::Generations`].
//!
//! A transient outcome makes the message visible again after the outcome's delay
//! (ChangeMessageVisibility) and reports it as a batch item failure, so only that message
//! comes back; everything else is deleted by the event source mapping. A record without a
//! message id cannot be reported (an empty identifier is invalid), so a retry of one fails
//! the whole invocation instead: everything comes back, and what was done is done already.
//! Near the invocation's deadline no new record is started; those go back at once.
//!
//! Every record is handled in a span with its `message_id` and what its body names (tenant,
//! image id, generation job and row), so each log line of the record carries them. The
//! metrics of an invocation are written as CloudWatch EMF lines when it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, error_span, info, warn, Instrument, Span};

use crate::metrics::emf::{Emf, EmfBatch};
use crate::metrics::Metric;
use crate::ports::Queue;
use crate::worker::Handler;

/// Records handled at once per invocation.
pub const DEFAULT_CONCURRENCY: usize = 4;

pub struct SqsBatchHandler<H: Handler> {
    pub inner: H,
    /// The queue the records come from (for ChangeMessageVisibility on retries).
    pub queue: Arc<dyn Queue>,
    pub concurrency: usize,
    /// Time one record may take at worst; a record is not started with less time left.
    pub record_budget: Duration,
    /// Where each invocation's metrics are written (stdout in Lambda).
    pub emf: Emf,
}

impl<H: Handler> Clone for SqsBatchHandler<H> {
    fn clone(&self) -> Self {
        SqsBatchHandler {
            inner: self.inner.clone(),
            queue: self.queue.clone(),
            concurrency: self.concurrency,
            record_budget: self.record_budget,
            emf: self.emf.clone(),
        }
    }
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

/// The span of one record: its message id, and the ids its body names when it reads as a
/// message of `H` (a malformed body is logged by the handler, without them). At ERROR level
/// so that no log level filters it out: a WARN line must carry the ids too.
pub fn record_span<H: Handler>(record: &SqsMessage) -> Span {
    let span = error_span!(
        "record",
        message_id = record.message_id.as_deref().unwrap_or_default(),
        image_id = tracing::field::Empty,
        tenant = tracing::field::Empty,
        job_id = tracing::field::Empty,
        row = tracing::field::Empty,
    );
    let ids = H::ids(record.body.as_deref().unwrap_or_default());
    if let Some(v) = &ids.image_id {
        span.record("image_id", v.as_str());
    }
    if let Some(v) = &ids.tenant {
        span.record("tenant", v.as_str());
    }
    if let Some(v) = &ids.job_id {
        span.record("job_id", v.as_str());
    }
    if let Some(v) = ids.row {
        span.record("row", v);
    }
    span
}

impl<H: Handler> SqsBatchHandler<H> {
    /// EMF lines name the function `function` (the Lambda's own name when it has one).
    pub fn new(inner: H, queue: Arc<dyn Queue>, function: &str) -> SqsBatchHandler<H> {
        let record_budget = inner.worst_case();
        SqsBatchHandler {
            inner,
            queue,
            emf: Emf::lambda(function),
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
            .any(|(id, outcome)| id.is_empty() && H::retry_delay(outcome).is_some())
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
    ) -> (SqsBatchResponse, Vec<(String, H::Outcome)>) {
        // This invocation's metric events, written as EMF once every record is done.
        let batch = Arc::new(EmfBatch::default());
        let mut me = self.clone();
        me.inner = self.inner.with_recorder(batch.clone());
        let result = me.handle_batch(event, deadline).await;
        self.emf.flush(&batch);
        result
    }

    async fn handle_batch(
        &self,
        event: SqsEvent,
        deadline: Option<SystemTime>,
    ) -> (SqsBatchResponse, Vec<(String, H::Outcome)>) {
        let permits = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let mut ids = HashMap::new();
        for record in event.records {
            let me = self.clone();
            let permits = permits.clone();
            let message_id = record.message_id.clone().unwrap_or_default();
            let span = record_span::<H>(&record);
            let handle = tasks.spawn(
                async move {
                    // The semaphore is never closed; a failed acquire just runs unthrottled.
                    let _permit = permits.acquire_owned().await.ok();
                    let too_late =
                        deadline.is_some_and(|d| SystemTime::now() + me.record_budget > d);
                    if too_late {
                        return me.not_started(record).await;
                    }
                    me.handle_record(record).await
                }
                .instrument(span),
            );
            ids.insert(handle.id(), message_id);
        }
        let mut response = SqsBatchResponse::default();
        let mut outcomes = Vec::new();
        while let Some(joined) = tasks.join_next_with_id().await {
            let (message_id, outcome) = match joined {
                Ok((_, pair)) => pair,
                Err(e) => {
                    // A panic in a record's task: retry that message (handlers never panic).
                    let id = ids.get(&e.id()).cloned().unwrap_or_default();
                    error!(message_id = %id, error = %e, "record task failed");
                    self.inner.recorder().record(Metric::Retries, None, 1.0);
                    let outcome =
                        H::unhandled(Duration::from_secs(30), format!("task failed: {e}"));
                    (id, outcome)
                }
            };
            if H::retry_delay(&outcome).is_some() && !message_id.is_empty() {
                response.add_failure(message_id.clone());
            }
            outcomes.push((message_id, outcome));
        }
        (response, outcomes)
    }

    /// Too close to the deadline to start: straight back to the queue.
    async fn not_started(&self, record: SqsMessage) -> (String, H::Outcome) {
        let message_id = record.message_id.clone().unwrap_or_default();
        if let Some(receipt) = record.receipt_handle.as_deref().filter(|r| !r.is_empty()) {
            if let Err(e) = self.queue.retry_after(receipt, Duration::ZERO).await {
                warn!(error = %e, "could not change the message visibility");
            }
        }
        info!("not started: the invocation is about to time out");
        self.inner.recorder().record(Metric::Retries, None, 1.0);
        let outcome = H::unhandled(
            Duration::ZERO,
            "not started before the invocation deadline".into(),
        );
        (message_id, outcome)
    }

    async fn handle_record(&self, record: SqsMessage) -> (String, H::Outcome) {
        let message_id = record.message_id.clone().unwrap_or_default();
        let count = receive_count(&record);
        let body = record.body.as_deref().unwrap_or_default();
        let outcome = self.inner.handle(body, count).await;
        if let Some(delay) = H::retry_delay(&outcome) {
            info!(
                receive_count = count,
                delay_ms = delay.as_millis() as u64,
                outcome = ?outcome,
                "retry later"
            );
            match record.receipt_handle.as_deref() {
                Some(receipt) if !receipt.is_empty() => {
                    if let Err(e) = self.queue.retry_after(receipt, delay).await {
                        // The message still comes back after the queue's visibility timeout.
                        warn!(error = %e, "could not change the message visibility");
                    }
                }
                _ => warn!("record has no receipt handle; default visibility applies"),
            }
        } else if let Some(reason) = H::failure(&outcome) {
            warn!(reason, "permanent failure");
        } else {
            info!(outcome = ?outcome, "handled");
        }
        (message_id, outcome)
    }
}
