//! Use-case: an original arrived → prepare it, store the JPEG, record the image, queue a job.
//!
//! Used by the resize Lambda (S3 event) and the local runtime (files and uploads).

use std::sync::Arc;

use sightline_core::keys::{parse_upload_key, resized_key};
use sightline_core::model::{AnalysisJob, ImageRecord, ImageSize, ImageStatus};
use sightline_core::pricing::PriceTable;
use sightline_core::{prepare, PrepareError};
use tracing::{info, warn};

use crate::ports::{rfc3339, BlobStore, Clock, Queue, Repository, StoreError, StoreResult};
use crate::settings::Settings;

/// What happened to one original.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestOutcome {
    /// Resized, recorded and (once sent) queued.
    Queued(AnalysisJob),
    /// A bad image: recorded `failed` with this reason; nothing queued.
    Failed { image_id: String, reason: String },
    /// Not ours (outside the uploads prefix, or a folder marker).
    Ignored(String),
}

#[derive(Clone)]
pub struct Ingest {
    pub blobs: Arc<dyn BlobStore>,
    pub repo: Arc<dyn Repository>,
    pub queue: Arc<dyn Queue>,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub upload_prefix: String,
}

impl Ingest {
    /// Process objects already in the blob store (decoded keys) and send one batch of jobs.
    /// A storage error is returned so the invocation fails and is retried (harmless: every
    /// write is an idempotent overwrite keyed by the image id).
    pub async fn ingest_keys(&self, keys: &[String]) -> StoreResult<Vec<IngestOutcome>> {
        let mut outcomes = Vec::with_capacity(keys.len());
        for key in keys {
            outcomes.push(self.prepare_key(key).await?);
        }
        self.send_jobs(&outcomes).await?;
        Ok(outcomes)
    }

    /// Send the jobs of queued outcomes (one SendMessageBatch per 10 on SQS).
    pub async fn send_jobs(&self, outcomes: &[IngestOutcome]) -> StoreResult<()> {
        let bodies: Vec<String> = outcomes
            .iter()
            .filter_map(|o| match o {
                IngestOutcome::Queued(job) => serde_json::to_string(job).ok(),
                _ => None,
            })
            .collect();
        if bodies.is_empty() {
            return Ok(());
        }
        self.queue.send(bodies).await
    }

    async fn prepare_key(&self, key: &str) -> StoreResult<IngestOutcome> {
        let Some(parsed) = parse_upload_key(key, &self.upload_prefix) else {
            return Ok(IngestOutcome::Ignored(format!(
                "{key} is outside {}",
                self.upload_prefix
            )));
        };
        let max = self.settings.prepare.max_input_bytes;
        // Check the size before downloading anything.
        let size = match self.blobs.size(key).await? {
            Some(s) => s,
            None => return Ok(IngestOutcome::Ignored(format!("{key} no longer exists"))),
        };
        if size > max {
            let err = PrepareError::TooLarge { bytes: size, max };
            return self
                .reject(
                    &parsed.tenant,
                    &parsed.image_id,
                    key,
                    Some(size),
                    &err.to_string(),
                )
                .await;
        }
        let bytes = match self.blobs.get(key, max).await {
            Ok(b) => b,
            Err(StoreError::TooLarge { bytes, max, .. }) => {
                let err = PrepareError::TooLarge { bytes, max };
                return self
                    .reject(
                        &parsed.tenant,
                        &parsed.image_id,
                        key,
                        Some(bytes),
                        &err.to_string(),
                    )
                    .await;
            }
            Err(StoreError::NotFound(_)) => {
                return Ok(IngestOutcome::Ignored(format!("{key} no longer exists")))
            }
            Err(e) => return Err(e),
        };
        self.ingest_bytes(&parsed.tenant, &parsed.image_id, key, bytes)
            .await
    }

    /// Prepare bytes for (tenant, image id); `source` is recorded as where they came from.
    pub async fn ingest_bytes(
        &self,
        tenant: &str,
        image_id: &str,
        source: &str,
        bytes: Vec<u8>,
    ) -> StoreResult<IngestOutcome> {
        // A retried or repeated event for an image that is already analysed: keep it, and
        // its resized JPEG, as they are (checked before any work or write).
        let existing = self.repo.get_image(tenant, image_id).await?;
        if let Some(done) = existing.as_ref().filter(|r| r.result.is_some()) {
            info!(tenant, image_id, "image already analysed; not queued again");
            return Ok(IngestOutcome::Ignored(format!(
                "{} already done",
                done.image_id
            )));
        }
        let opts = self.settings.prepare;
        let original_bytes = bytes.len() as u64;
        let prepared = tokio::task::spawn_blocking(move || prepare(&bytes, &opts))
            .await
            .map_err(|e| StoreError::Permanent(format!("prepare task failed: {e}")))?;
        let img = match prepared {
            Ok(p) => p,
            Err(e) => {
                return self
                    .reject(
                        tenant,
                        image_id,
                        source,
                        Some(original_bytes),
                        &e.to_string(),
                    )
                    .await
            }
        };
        let rkey = resized_key(tenant, image_id);
        self.blobs
            .put(&rkey, img.jpeg.clone(), "image/jpeg")
            .await?;

        let table = PriceTable::builtin();
        let params = self.settings.estimate_params();
        let estimate = table
            .estimate(&self.settings.model, img.width, img.height, &params)
            .ok();
        let original_estimate = table
            .estimate(
                &self.settings.model,
                img.original_width,
                img.original_height,
                &params,
            )
            .ok();
        let now = rfc3339(self.clock.now_ms());
        let created_at = existing
            .map(|r| r.created_at)
            .unwrap_or_else(|| now.clone());
        let record = ImageRecord {
            image_id: image_id.to_string(),
            tenant: tenant.to_string(),
            source: source.to_string(),
            status: ImageStatus::Queued,
            error: None,
            original: Some(ImageSize {
                width: img.original_width,
                height: img.original_height,
                bytes: img.original_bytes,
            }),
            resized: Some(ImageSize {
                width: img.width,
                height: img.height,
                bytes: img.bytes,
            }),
            orientation: Some(img.orientation),
            sha256: Some(img.sha256.clone()),
            resized_key: Some(rkey.clone()),
            estimate,
            original_estimate,
            result: None,
            created_at,
            updated_at: now,
        };
        self.repo.put_image(&record).await?;
        Ok(IngestOutcome::Queued(AnalysisJob {
            v: AnalysisJob::VERSION,
            image_id: image_id.to_string(),
            tenant: tenant.to_string(),
            resized_key: rkey,
            sha256: img.sha256,
            width: img.width,
            height: img.height,
        }))
    }

    pub async fn reject(
        &self,
        tenant: &str,
        image_id: &str,
        source: &str,
        bytes: Option<u64>,
        reason: &str,
    ) -> StoreResult<IngestOutcome> {
        warn!(tenant, image_id, source, reason, "image rejected");
        let now = rfc3339(self.clock.now_ms());
        let existing = self.repo.get_image(tenant, image_id).await?;
        let created_at = existing
            .map(|r| r.created_at)
            .unwrap_or_else(|| now.clone());
        let record = ImageRecord {
            image_id: image_id.to_string(),
            tenant: tenant.to_string(),
            source: source.to_string(),
            status: ImageStatus::Failed,
            error: Some(reason.to_string()),
            original: bytes.map(|b| ImageSize {
                width: 0,
                height: 0,
                bytes: b,
            }),
            resized: None,
            orientation: None,
            sha256: None,
            resized_key: None,
            estimate: None,
            original_estimate: None,
            result: None,
            created_at,
            updated_at: now,
        };
        self.repo.put_image(&record).await?;
        Ok(IngestOutcome::Failed {
            image_id: image_id.to_string(),
            reason: reason.to_string(),
        })
    }
}
