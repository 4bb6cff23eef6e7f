//! In-process queue workers for the local runtime: receive a batch, handle each message,
//! delete what finished, hand transient failures back with a visibility delay — the same
//! contract the Lambdas have with SQS. One pool serves the analysis and generation queues.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::analyze::{AnalyzeOutcome, Analyzer};
use crate::generation::{GenerateOutcome, Generations};
use crate::ports::{Queue, QueueMessage};

/// A use-case that handles one queue message.
#[async_trait]
pub trait Handler: Clone + Send + Sync + 'static {
    type Outcome: std::fmt::Debug + Send + Sync;
    async fn handle(&self, body: &str, receive_count: u32) -> Self::Outcome;
    /// Some(delay): make the message visible again after it; None: delete it.
    fn retry_delay(outcome: &Self::Outcome) -> Option<Duration>;
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
