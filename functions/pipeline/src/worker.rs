//! In-process queue workers for the local runtime: receive a batch, handle each message,
//! delete what finished, hand transient failures back with a visibility delay — the same
//! contract the Lambdas have with SQS. One pool serves the analysis and generation queues.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::{debug, warn};

use sightline_core::model::AnalysisJob;

use crate::analyze::{AnalyzeOutcome, Analyzer};
use crate::generation::{image_id_of, GenerateOutcome, GenerationMessage, Generations};
use crate::metrics::Recorder;
use crate::ports::{Queue, QueueMessage};

/// A use-case that handles one queue message.
#[async_trait]
pub trait Handler: Clone + Send + Sync + 'static {
    type Outcome: std::fmt::Debug + Send + Sync;
    async fn handle(&self, body: &str, receive_count: u32) -> Self::Outcome;
    /// Some(delay): make the message visible again after it; None: delete it.
    fn retry_delay(outcome: &Self::Outcome) -> Option<Duration>;
    /// The outcome of a message sent back unhandled (too near a deadline, a crashed task).
    fn unhandled(delay: Duration, reason: String) -> Self::Outcome;
    /// The reason of a permanent failure, for the log.
    fn failure(outcome: &Self::Outcome) -> Option<&str>;
    /// The ids a message's log span carries, read from its body (best effort).
    fn ids(body: &str) -> MessageIds;
    /// The longest one message may take: a Lambda starts none with less time left.
    fn worst_case(&self) -> Duration;
    /// Where its metric events go.
    fn recorder(&self) -> Arc<dyn Recorder>;
    /// A copy whose metric events go to `recorder` (one invocation's EMF batch).
    fn with_recorder(&self, recorder: Arc<dyn Recorder>) -> Self;
}

/// What a message names, for its log span.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageIds {
    pub tenant: Option<String>,
    pub image_id: Option<String>,
    pub job_id: Option<String>,
    pub row: Option<u32>,
}

#[async_trait]
impl Handler for Analyzer {
    type Outcome = AnalyzeOutcome;
    async fn handle(&self, body: &str, receive_count: u32) -> AnalyzeOutcome {
        Analyzer::handle(self, body, receive_count).await
    }
    fn retry_delay(outcome: &AnalyzeOutcome) -> Option<Duration> {
        match outcome {
            AnalyzeOutcome::Retry { delay, .. } => Some(*delay),
            _ => None,
        }
    }
    fn unhandled(delay: Duration, reason: String) -> AnalyzeOutcome {
        AnalyzeOutcome::Retry { delay, reason }
    }
    fn failure(outcome: &AnalyzeOutcome) -> Option<&str> {
        match outcome {
            AnalyzeOutcome::Failed(reason) => Some(reason),
            _ => None,
        }
    }
    fn ids(body: &str) -> MessageIds {
        match AnalysisJob::parse(body) {
            Ok(job) => MessageIds {
                tenant: Some(job.tenant),
                image_id: Some(job.image_id),
                job_id: None,
                row: None,
            },
            Err(_) => MessageIds::default(),
        }
    }
    fn worst_case(&self) -> Duration {
        self.settings.record_worst_case()
    }
    fn recorder(&self) -> Arc<dyn Recorder> {
        self.metrics.clone()
    }
    fn with_recorder(&self, recorder: Arc<dyn Recorder>) -> Self {
        let mut me = self.clone();
        me.metrics = recorder;
        me
    }
}

#[async_trait]
impl Handler for Generations {
    type Outcome = GenerateOutcome;
    async fn handle(&self, body: &str, receive_count: u32) -> GenerateOutcome {
        Generations::handle(self, body, receive_count).await
    }
    fn retry_delay(outcome: &GenerateOutcome) -> Option<Duration> {
        match outcome {
            GenerateOutcome::Retry { delay, .. } => Some(*delay),
            _ => None,
        }
    }
    fn unhandled(delay: Duration, reason: String) -> GenerateOutcome {
        GenerateOutcome::Retry { delay, reason }
    }
    fn failure(outcome: &GenerateOutcome) -> Option<&str> {
        match outcome {
            GenerateOutcome::Failed(reason) => Some(reason),
            _ => None,
        }
    }
    fn ids(body: &str) -> MessageIds {
        match GenerationMessage::parse(body) {
            Ok(m) => MessageIds {
                image_id: Some(image_id_of(&m.job_id, m.row, m.attempt)),
                tenant: Some(m.tenant),
                job_id: Some(m.job_id),
                row: Some(m.row),
            },
            Err(_) => MessageIds::default(),
        }
    }
    fn worst_case(&self) -> Duration {
        self.worst_case()
    }
    fn recorder(&self) -> Arc<dyn Recorder> {
        self.metrics.clone()
    }
    fn with_recorder(&self, recorder: Arc<dyn Recorder>) -> Self {
        let mut me = self.clone();
        me.metrics = recorder;
        me
    }
}

/// Called after each handled message (progress bars, logs).
pub type OnOutcome<O = AnalyzeOutcome> = Arc<dyn Fn(&QueueMessage, &O) + Send + Sync>;

pub struct WorkerPool<H: Handler = Analyzer> {
    pub queue: Arc<dyn Queue>,
    pub handler: H,
    pub workers: usize,
    pub batch_size: usize,
    pub visibility: Duration,
    pub idle_poll: Duration,
    pub on_outcome: Option<OnOutcome<H::Outcome>>,
}

impl<H: Handler> Clone for WorkerPool<H> {
    fn clone(&self) -> Self {
        WorkerPool {
            queue: self.queue.clone(),
            handler: self.handler.clone(),
            workers: self.workers,
            batch_size: self.batch_size,
            visibility: self.visibility,
            idle_poll: self.idle_poll,
            on_outcome: self.on_outcome.clone(),
        }
    }
}

impl<H: Handler> WorkerPool<H> {
    /// Run until `stop` turns true.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let mut handles = Vec::new();
        for _ in 0..self.workers.max(1) {
            let pool = self.clone();
            let stop = stop.clone();
            handles.push(tokio::spawn(async move { pool.worker(stop).await }));
        }
        for h in handles {
            if let Err(e) = h.await {
                warn!(error = %e, "worker task ended abnormally");
            }
        }
    }

    async fn worker(&self, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let batch = match self.queue.receive(self.batch_size, self.visibility).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "queue receive failed");
                    Vec::new()
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(self.idle_poll) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            for msg in batch {
                let outcome = self.handler.handle(&msg.body, msg.receive_count).await;
                debug!(message_id = %msg.message_id, ?outcome, "handled");
                let ack = match H::retry_delay(&outcome) {
                    Some(delay) => self.queue.retry_after(&msg.receipt, delay).await,
                    None => self.queue.delete(&msg.receipt).await,
                };
                if let Err(e) = ack {
                    warn!(error = %e, message_id = %msg.message_id, "queue ack failed; message will reappear");
                }
                if let Some(cb) = &self.on_outcome {
                    cb(&msg, &outcome);
                }
            }
        }
    }
}
