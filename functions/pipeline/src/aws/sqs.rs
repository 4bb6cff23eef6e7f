//! SQS queue.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use futures_util::TryStreamExt;

use super::{sdk_err, sqs_seconds};
use crate::ports::{Queue, QueueMessage, StoreError, StoreResult};

/// SendMessageBatch calls in flight at once for one send.
const SEND_CONCURRENCY: usize = 8;

/// One SQS queue, by URL.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: Client,
    url: String,
    /// Long-poll wait for `receive` (0 = short poll).
    wait: Duration,
}

impl SqsQueue {
    pub fn new(client: Client, url: impl Into<String>) -> SqsQueue {
        SqsQueue {
            client,
            url: url.into(),
            wait: Duration::from_secs(1),
        }
    }

    /// Long-poll wait used by `receive` (clamped to 20 s).
    pub fn with_wait(mut self, wait: Duration) -> SqsQueue {
        self.wait = wait.min(Duration::from_secs(20));
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One SendMessageBatch of up to 10 bodies.
    async fn send_batch(&self, chunk: &[String]) -> StoreResult<()> {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, body)| {
                SendMessageBatchRequestEntry::builder()
                    .id(format!("m{i}"))
                    .message_body(body)
                    .build()
                    .map_err(|e| StoreError::Permanent(format!("sqs batch entry: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_err("sqs SendMessageBatch", e))?;
        if let Some(f) = out.failed().first() {
            let msg = format!(
                "sqs SendMessageBatch: {} of {} entries failed, first {}: {} {}",
                out.failed().len(),
                chunk.len(),
                f.id(),
                f.code(),
                f.message().unwrap_or_default()
            );
            // Sender faults (bad input) won't heal; the rest are worth a retry. The whole
            // invocation is retried, and re-sending is harmless (idempotent analysis).
            return Err(if f.sender_fault() {
                StoreError::Permanent(msg)
            } else {
                StoreError::Transient(msg)
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Queue for SqsQueue {
    async fn send(&self, bodies: Vec<String>) -> StoreResult<()> {
        // Batches of 10 (SQS's most), SEND_CONCURRENCY in flight: a 10,000-row generation
        // job is queued in about a second, not fifteen.
        futures_util::stream::iter(bodies.chunks(10).map(Ok))
            .try_for_each_concurrent(SEND_CONCURRENCY, |chunk| self.send_batch(chunk))
            .await
    }

    async fn receive(&self, max: usize, visibility: Duration) -> StoreResult<Vec<QueueMessage>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .visibility_timeout(sqs_seconds(visibility))
            .wait_time_seconds(sqs_seconds(self.wait).min(20))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| sdk_err("sqs ReceiveMessage", e))?;
        Ok(out
            .messages()
            .iter()
            .filter_map(|m| {
                let receive_count = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                Some(QueueMessage {
                    message_id: m.message_id()?.to_string(),
                    receipt: m.receipt_handle()?.to_string(),
                    body: m.body().unwrap_or_default().to_string(),
                    receive_count,
                })
            })
            .collect())
    }

    async fn delete(&self, receipt: &str) -> StoreResult<()> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| sdk_err("sqs DeleteMessage", e))?;
        Ok(())
    }

    async fn retry_after(&self, receipt: &str, delay: Duration) -> StoreResult<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(sqs_seconds(delay))
            .send()
            .await
            .map_err(|e| sdk_err("sqs ChangeMessageVisibility", e))?;
        Ok(())
    }
}
