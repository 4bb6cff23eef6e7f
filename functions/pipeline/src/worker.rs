//! In-process queue workers for the local runtime: receive a batch, handle each message,
//! delete what finished, hand transient failures back with a visibility delay — the same
//! contract the analyze Lambda has with SQS.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::analyze::{AnalyzeOutcome, Analyzer};
use crate::ports::{Queue, QueueMessage};

/// Called after each handled message (progress bars, logs).
pub type OnOutcome = Arc<dyn Fn(&QueueMessage, &AnalyzeOutcome) + Send + Sync>;

#[derive(Clone)]
pub struct WorkerPool {
    pub queue: Arc<dyn Queue>,
    pub analyzer: Analyzer,
    pub workers: usize,
    pub batch_size: usize,
    pub visibility: Duration,
    pub idle_poll: Duration,
    pub on_outcome: Option<OnOutcome>,
}

impl WorkerPool {
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
                let outcome = self.analyzer.handle(&msg.body, msg.receive_count).await;
                debug!(message_id = %msg.message_id, ?outcome, "handled");
                let ack = match &outcome {
                    AnalyzeOutcome::Retry { delay, .. } => {
                        self.queue.retry_after(&msg.receipt, *delay).await
                    }
                    _ => self.queue.delete(&msg.receipt).await,
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
