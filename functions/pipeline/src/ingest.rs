//! Use-case: an original arrived → prepare it, store the JPEG, record the image, queue a job.
//!
//! Used by the resize Lambda (S3 event), the local runtime (files and uploads) and the
//! reconciler (uploads whose resize never happened).
//!
//! Integrity and durability rules:
//! - The resized JPEG's key names its sha256, so a later upload never changes what an earlier
//!   job reads.
//! - The record remembers the original's sha256. A second, different upload to the same image
//!   id is refused (the first one stands); the same upload again (a retried event) is harmless
//!   and re-sends the job.
//! - The record and its job become deliverable together: in one transaction where the
//!   repository holds the queue (SQLite), else the record is written with a recheck time
//!   first, the job sent, and the recheck moved on (the reconciler re-sends what a crash left).
//! - Concurrent prepares share a memory budget, each weighed by what its header says it needs.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use sightline_core::keys::{parse_upload_key, resized_key};
use sightline_core::model::{AnalysisJob, ImageRecord, ImageSize, ImageStatus, Lane};
use sightline_core::pricing::PriceTable;
use sightline_core::{memory_estimate, prepare, PrepareError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::ports::{
    rfc3339, BlobStore, Clock, JobDelivery, PutImage, Queue, Repository, StoreError, StoreResult,
};
use crate::settings::Settings;

/// What happened to one original.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestOutcome {
    /// Resized, recorded and queued.
    Queued(AnalysisJob),
    /// A bad image: recorded `failed` with this reason; nothing queued.
    Failed { image_id: String, reason: String },
    /// A second, different upload to an image that already has one: refused, the record and
    /// its job keep the first upload's content.
    Refused { image_id: String, reason: String },
    /// Not ours (outside the uploads prefix, a folder marker, gone, or already analysed).
    Ignored(String),
}

/// Memory permits are counted in 64 KiB units (a semaphore counts in u32-sized steps).
const UNIT: u64 = 64 * 1024;

/// Bounds concurrent resizes: a count of admitted resizes (each may hold its input while it
/// waits) and a memory budget that each prepare reserves its header's estimate from.
#[derive(Clone, Debug)]
pub struct ResizeBudget {
    slots: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    units: u32,
}

impl ResizeBudget {
    pub fn new(memory_bytes: u64, slots: usize) -> ResizeBudget {
        let units = (memory_bytes / UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        ResizeBudget {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            memory: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    pub fn from_settings(s: &Settings) -> ResizeBudget {
        ResizeBudget::new(s.resize_memory_budget, s.max_concurrent_resizes)
    }

    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        // The semaphores are never closed; an error would only mean running unbounded.
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Wait until `bytes` fit in the budget. One image larger than the whole budget waits for
    /// the budget to be free and then runs alone.
    async fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let units = bytes.div_ceil(UNIT).clamp(1, u64::from(self.units)) as u32;
        self.memory.clone().acquire_many_owned(units).await.ok()
    }

    /// Bytes reserved right now (for tests and metrics).
    pub fn reserved_bytes(&self) -> u64 {
        u64::from(self.units).saturating_sub(self.memory.available_permits() as u64) * UNIT
    }
}

#[derive(Clone)]
pub struct Ingest {
    pub blobs: Arc<dyn BlobStore>,
    pub repo: Arc<dyn Repository>,
    pub queue: Arc<dyn Queue>,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub upload_prefix: String,
    pub budget: ResizeBudget,
    /// Where metric events go (nowhere unless the runtime wires a recorder).
    pub metrics: Arc<dyn crate::metrics::Recorder>,
}

impl Ingest {
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        repo: Arc<dyn Repository>,
        queue: Arc<dyn Queue>,
        settings: Arc<Settings>,
        clock: Arc<dyn Clock>,
        upload_prefix: &str,
    ) -> Ingest {
        Ingest {
            budget: ResizeBudget::from_settings(&settings),
            blobs,
            repo,
            queue,
            settings,
            clock,
            upload_prefix: upload_prefix.to_string(),
            metrics: crate::metrics::no_metrics(),
        }
    }

    /// Process objects already in the blob store (decoded keys), a few at a time within the
    /// resize budget. A storage error is returned so the invocation fails and is retried
    /// (harmless: a retried upload re-sends its job, nothing is paid or counted twice).
    pub async fn ingest_keys(&self, keys: &[String]) -> StoreResult<Vec<IngestOutcome>> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, key) in keys.iter().enumerate() {
            let me = self.clone();
            let key = key.clone();
            // Each key's logs stay under the caller's span (the Lambda request id).
            let task = async move { (i, me.ingest_key(&key).await) };
            tasks.spawn(tracing::Instrument::in_current_span(task));
        }
        let mut outcomes: Vec<Option<IngestOutcome>> = vec![None; keys.len()];
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(o))) => outcomes[i] = Some(o),
                Ok((_, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error
                        .get_or_insert(StoreError::Transient(format!("resize task failed: {e}")));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(outcomes.into_iter().flatten().collect()),
        }
    }

    /// One object under the upload prefix, in a span naming it (every log line of the object
    /// carries its key, tenant and image id; at ERROR level so no log level filters it out);
    /// the outcome and its time go to the metrics.
    pub async fn ingest_key(&self, key: &str) -> StoreResult<IngestOutcome> {
        let started = std::time::Instant::now();
        let (tenant, image_id) = parse_upload_key(key, &self.upload_prefix)
            .map(|p| (p.tenant, p.image_id))
            .unwrap_or_default();
        let span = tracing::error_span!("upload", key, %tenant, %image_id);
        let outcome = tracing::Instrument::instrument(self.ingest_object(key), span).await;
        crate::metrics::observe_ingest(&*self.metrics, &outcome, started.elapsed());
        outcome
    }

    async fn ingest_object(&self, key: &str) -> StoreResult<IngestOutcome> {
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
                    None,
                    &err.to_string(),
                )
                .await;
        }
        // Admitted resizes hold their input while they wait for memory: bound how many.
        let _slot = self.budget.admit().await;
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
                        None,
                        &err.to_string(),
                    )
                    .await;
            }
            Err(StoreError::NotFound(_)) => {
                return Ok(IngestOutcome::Ignored(format!("{key} no longer exists")))
            }
            Err(e) => return Err(e),
        };
        self.ingest_bytes(&parsed.tenant, &parsed.image_id, key, Some(key), bytes)
            .await
    }

    /// Prepare bytes for (tenant, image id); `source` is recorded as where they came from and
    /// `original_key` as the blob key of the original, when it is one.
    pub async fn ingest_bytes(
        &self,
        tenant: &str,
        image_id: &str,
        source: &str,
        original_key: Option<&str>,
        bytes: Vec<u8>,
    ) -> StoreResult<IngestOutcome> {
        let original_sha256 = hex::encode(Sha256::digest(&bytes));
        // Checked before any work or write.
        let existing = self.repo.get_image(tenant, image_id).await?;
        if let Some(rec) = &existing {
            if rec.result.is_some() {
                info!(tenant, image_id, "image already analysed; not queued again");
                return Ok(IngestOutcome::Ignored(format!("{image_id} already done")));
            }
            match &rec.original_sha256 {
                Some(first) if *first != original_sha256 => {
                    return Ok(self.refuse(tenant, image_id));
                }
                // The same upload again (a retried event, a reconciler pass): its job may be
                // lost, so send it again; the analyzer makes duplicates harmless.
                Some(_) if rec.status == ImageStatus::Queued => {
                    if let Some(job) = job_of(rec) {
                        self.resend(rec, &job).await?;
                        return Ok(IngestOutcome::Queued(job));
                    }
                }
                Some(_) if rec.status == ImageStatus::Failed => {
                    return Ok(IngestOutcome::Failed {
                        image_id: image_id.to_string(),
                        reason: rec.error.clone().unwrap_or_default(),
                    });
                }
                _ => {}
            }
        }
        let opts = self.settings.prepare;
        let original_bytes = bytes.len() as u64;
        let bytes = Arc::new(bytes);
        // Weigh the prepare by its header before it may allocate anything.
        let header = bytes.clone();
        let need = tokio::task::spawn_blocking(move || memory_estimate(&header, &opts))
            .await
            .unwrap_or_else(|e| Err(crashed(e)));
        let need = match need {
            Ok(n) => n,
            Err(e) => {
                return self
                    .reject(
                        tenant,
                        image_id,
                        source,
                        Some(original_bytes),
                        Some(&original_sha256),
                        &e.to_string(),
                    )
                    .await
            }
        };
        let memory = self.budget.reserve(need).await;
        let input = bytes.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare(&input, &opts))
            .await
            .unwrap_or_else(|e| Err(crashed(e)));
        drop(memory);
        drop(bytes);
        let img = match prepared {
            Ok(p) => p,
            Err(e) => {
                return self
                    .reject(
                        tenant,
                        image_id,
                        source,
                        Some(original_bytes),
                        Some(&original_sha256),
                        &e.to_string(),
                    )
                    .await
            }
        };
        let rkey = resized_key(tenant, image_id, &img.sha256);
        self.blobs
            .put(&rkey, img.jpeg.clone(), "image/jpeg")
            .await?;

        let table = PriceTable::builtin();
        // The upload's own detail, else the tenant's, else the default: decided once here, so
        // the recorded estimate and the call agree.
        let detail = self
            .settings
            .detail_for(tenant, existing.as_ref().and_then(|r| r.detail));
        // A generated image (its record names its job row) is analysed with its check.
        let generation = existing.as_ref().and_then(|r| r.generation.clone());
        let check = generation.as_ref().map(|g| g.check.clone());
        let prompt = self.settings.analysis_prompt(check.as_ref());
        let params = self.settings.estimate_params_with(detail, &prompt);
        // The upload's own lane, else the key rule, else the default: decided once, here. A
        // generated image goes in real time: its job waits for its check.
        let lane = if generation.is_some() {
            Lane::Realtime
        } else {
            self.settings.lane_for(
                existing.as_ref().and_then(|r| r.lane),
                original_key.unwrap_or(source),
            )
        };
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
        let now_ms = self.clock.now_ms();
        let now = rfc3339(now_ms);
        let created_at = existing
            .map(|r| r.created_at)
            .unwrap_or_else(|| now.clone());
        let record = ImageRecord {
            image_id: image_id.to_string(),
            tenant: tenant.to_string(),
            source: source.to_string(),
            status: ImageStatus::Queued,
            error: None,
            permanent_failure: false,
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
            original_sha256: Some(original_sha256),
            original_key: original_key.map(str::to_string),
            resized_key: Some(rkey.clone()),
            estimate,
            original_estimate,
            result: None,
            extra_spend: None,
            detail: Some(detail),
            lane: Some(lane),
            generation,
            created_at,
            updated_at: now,
        };
        let job = AnalysisJob {
            v: AnalysisJob::VERSION,
            image_id: image_id.to_string(),
            tenant: tenant.to_string(),
            resized_key: rkey,
            sha256: img.sha256,
            width: img.width,
            height: img.height,
            detail: Some(detail),
            lane: (!lane.is_realtime()).then_some(lane),
            check,
        };
        let body = job_body(&job)?;
        let soon = now_ms + self.settings.reconcile_after.as_millis() as u64;
        let later = now_ms + self.settings.stuck_after.as_millis() as u64;
        let (put, delivery) = self
            .repo
            .put_queued(&record, &body, now_ms, soon, later)
            .await?;
        match put {
            PutImage::Stored => {}
            PutImage::HasResult => {
                return Ok(IngestOutcome::Ignored(format!("{image_id} already done")))
            }
            PutImage::OtherUpload => return Ok(self.refuse(tenant, image_id)),
        }
        if delivery == JobDelivery::SendIt {
            // Recorded with a recheck `soon`: a crash before the send leaves it to the
            // reconciler. Once sent, the next look is when the job would be stuck.
            self.queue.send(vec![body]).await?;
            self.repo.set_recheck(tenant, image_id, Some(later)).await?;
        }
        Ok(IngestOutcome::Queued(job))
    }

    /// Send a recorded image's job again and push its recheck back (reconciler, retried events).
    pub async fn resend(&self, record: &ImageRecord, job: &AnalysisJob) -> StoreResult<()> {
        self.queue.send(vec![job_body(job)?]).await?;
        let later = self.clock.now_ms() + self.settings.stuck_after.as_millis() as u64;
        self.repo
            .set_recheck(&record.tenant, &record.image_id, Some(later))
            .await
    }

    fn refuse(&self, tenant: &str, image_id: &str) -> IngestOutcome {
        let reason = format!(
            "a second, different upload to image {image_id} was refused; the first upload stands"
        );
        warn!(tenant, image_id, "{reason}");
        IngestOutcome::Refused {
            image_id: image_id.to_string(),
            reason,
        }
    }

    /// Record a bad image as failed (unless it already has a result or another upload).
    pub async fn reject(
        &self,
        tenant: &str,
        image_id: &str,
        source: &str,
        bytes: Option<u64>,
        original_sha256: Option<&str>,
        reason: &str,
    ) -> StoreResult<IngestOutcome> {
        warn!(tenant, image_id, source, reason, "image rejected");
        let now = rfc3339(self.clock.now_ms());
        let existing = self.repo.get_image(tenant, image_id).await?;
        let created_at = existing
            .as_ref()
            .map(|r| r.created_at.clone())
            .unwrap_or_else(|| now.clone());
        let record = ImageRecord {
            image_id: image_id.to_string(),
            tenant: tenant.to_string(),
            source: source.to_string(),
            status: ImageStatus::Failed,
            error: Some(reason.to_string()),
            permanent_failure: true,
            original: bytes.map(|b| ImageSize {
                width: 0,
                height: 0,
                bytes: b,
            }),
            resized: None,
            orientation: None,
            sha256: None,
            original_sha256: original_sha256.map(str::to_string),
            resized_key: None,
            estimate: None,
            original_estimate: None,
            result: None,
            extra_spend: None,
            detail: existing.as_ref().and_then(|r| r.detail),
            lane: existing.as_ref().and_then(|r| r.lane),
            generation: existing.as_ref().and_then(|r| r.generation.clone()),
            original_key: existing.and_then(|r| r.original_key),
            created_at,
            updated_at: now,
        };
        match self.repo.put_image(&record, None).await? {
            PutImage::Stored => Ok(IngestOutcome::Failed {
                image_id: image_id.to_string(),
                reason: reason.to_string(),
            }),
            PutImage::HasResult => Ok(IngestOutcome::Ignored(format!("{image_id} already done"))),
            PutImage::OtherUpload => Ok(self.refuse(tenant, image_id)),
        }
    }
}

/// The job of a queued record, rebuilt from what the record holds.
pub fn job_of(record: &ImageRecord) -> Option<AnalysisJob> {
    Some(AnalysisJob {
        v: AnalysisJob::VERSION,
        image_id: record.image_id.clone(),
        tenant: record.tenant.clone(),
        resized_key: record.resized_key.clone()?,
        sha256: record.sha256.clone()?,
        width: record.resized?.width,
        height: record.resized?.height,
        detail: record.detail,
        lane: record.lane.filter(|l| !l.is_realtime()),
        check: record.generation.as_ref().map(|g| g.check.clone()),
    })
}

/// A decoder that panicked on a file: that file is bad, recorded like any other bad image.
fn crashed(e: tokio::task::JoinError) -> PrepareError {
    PrepareError::Corrupt(format!("the image decoder failed on this file: {e}"))
}

fn job_body(job: &AnalysisJob) -> StoreResult<String> {
    serde_json::to_string(job).map_err(|e| StoreError::Permanent(format!("job message: {e}")))
}
