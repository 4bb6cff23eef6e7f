//! Use-case: the reconciler. A periodic sweep that finishes what a crash left between two
//! writes, from each image's recheck time (set by every write that expects a next step):
//!
//! - `pending` with its original stored: the upload arrived but its resize never ran (the
//!   process died after acknowledging it, or the resize function failed all its retries) →
//!   resize it now.
//! - `pending` without an original: an upload URL nobody used → deleted once it is older
//!   than the pending TTL (DynamoDB's TTL does the same on AWS; the sweep does it everywhere).
//! - `queued`: recorded but its job never sent, or sent and not finished for a long time →
//!   send the job again. Duplicates are harmless: the claim and the ledger are exactly-once.
//! - `done` / `failed`: nothing left to do; the recheck is cleared.
//!
//! Runs at start and periodically in `sightline serve`, and as a scheduled Lambda on AWS.

use serde::Serialize;
use sightline_core::model::{ImageRecord, ImageStatus};
use tracing::{info, warn};

use crate::ingest::{job_of, Ingest, IngestOutcome};
use crate::ports::{rfc3339, Failure, StoreError, StoreResult};

/// Records looked at per page of a sweep.
const PAGE: usize = 100;

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Uploads whose resize was run again and queued their job.
    pub resized: u64,
    /// Uploads whose resize ran again and found a bad image (recorded `failed`) or a second
    /// upload to the same image (refused).
    pub rejected: u64,
    /// Jobs sent again.
    pub requeued: u64,
    /// Pending records deleted (upload URL never used).
    pub expired: u64,
    /// Rechecks cleared or pushed back without other work.
    pub settled: u64,
    /// Images that could not be handled this time (looked at again after `reconcile_after`).
    pub errors: u64,
}

impl SweepReport {
    pub fn is_empty(&self) -> bool {
        *self == SweepReport::default()
    }
}

#[derive(Clone)]
pub struct Reconciler {
    pub ingest: Ingest,
}

impl Reconciler {
    pub fn new(ingest: Ingest) -> Reconciler {
        Reconciler { ingest }
    }

    /// Handle every image due now, at most `max` of them (a Lambda bounds its run time).
    pub async fn sweep(&self, max: usize) -> StoreResult<SweepReport> {
        let mut report = SweepReport::default();
        let now = self.ingest.clock.now_ms();
        let mut seen = std::collections::HashSet::new();
        let mut handled = 0usize;
        while handled < max {
            let due = self
                .ingest
                .repo
                .due_rechecks(now, PAGE.min(max - handled))
                .await?;
            // Everything handled moves its recheck on; a record that stays due (an error)
            // is not looked at twice in one sweep.
            let fresh: Vec<ImageRecord> = due
                .into_iter()
                .filter(|r| seen.insert((r.tenant.clone(), r.image_id.clone())))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for record in fresh {
                handled += 1;
                if let Err(e) = self.one(&record, now, &mut report).await {
                    report.errors += 1;
                    warn!(tenant = %record.tenant, image_id = %record.image_id, error = %e, "reconciling an image failed; looked at again later");
                    self.after_error(&record, now, &e).await;
                }
            }
        }
        if !report.is_empty() {
            info!(?report, "reconciler sweep");
        }
        Ok(report)
    }

    async fn one(
        &self,
        record: &ImageRecord,
        now: u64,
        report: &mut SweepReport,
    ) -> StoreResult<()> {
        let repo = &self.ingest.repo;
        let (tenant, id) = (record.tenant.as_str(), record.image_id.as_str());
        match record.status {
            ImageStatus::Pending => {
                let stored = match &record.original_key {
                    Some(key) => self.ingest.blobs.size(key).await?.map(|_| key.clone()),
                    None => None,
                };
                if let Some(key) = stored {
                    info!(
                        tenant,
                        image_id = id,
                        key,
                        "upload was never resized; resizing it now"
                    );
                    match self.ingest.ingest_key(&key).await? {
                        // Still pending means nothing was recorded (a key outside the prefix):
                        // stop looking at it rather than retry forever.
                        IngestOutcome::Ignored(why) => {
                            warn!(tenant, image_id = id, why, "upload could not be resized");
                            repo.set_recheck(tenant, id, None).await?;
                        }
                        _ => report.resized += 1,
                    }
                    return Ok(());
                }
                let ttl = self.ingest.settings.pending_ttl.as_millis() as u64;
                let expires = created_ms(record).saturating_add(ttl);
                if expires <= now {
                    if repo.expire_pending(tenant, id).await? {
                        report.expired += 1;
                    }
                } else {
                    repo.set_recheck(tenant, id, Some(expires)).await?;
                    report.settled += 1;
                }
            }
            ImageStatus::Queued => {
                let Some(job) = job_of(record) else {
                    // Nothing to analyse, ever: say so on the image instead of retrying.
                    let reason = "recorded as queued without a resized image; upload it again";
                    repo.mark_failed(tenant, id, reason, Failure::Permanent, &rfc3339(now))
                        .await?;
                    report.rejected += 1;
                    return Ok(());
                };
                info!(
                    tenant,
                    image_id = id,
                    "job not finished in time; sending it again"
                );
                self.ingest.resend(record, &job).await?;
                report.requeued += 1;
            }
            ImageStatus::Done | ImageStatus::Failed => {
                repo.set_recheck(tenant, id, None).await?;
                report.settled += 1;
            }
        }
        Ok(())
    }
}

impl Reconciler {
    /// An image that failed to reconcile is looked at again after `reconcile_after`, so images
    /// that keep failing never hold the head of the schedule against everything behind them.
    async fn after_error(&self, record: &ImageRecord, now: u64, e: &StoreError) {
        let later = now + self.ingest.settings.reconcile_after.as_millis().max(1_000) as u64;
        if let Err(e2) = self
            .ingest
            .repo
            .set_recheck(&record.tenant, &record.image_id, Some(later))
            .await
        {
            warn!(error = %e2, first_error = %e, "could not reschedule the image either");
        }
    }
}

/// Milliseconds since the epoch of a record's creation (0 when unreadable: expire early
/// rather than never).
fn created_ms(record: &ImageRecord) -> u64 {
    time::OffsetDateTime::parse(
        &record.created_at,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()
    .and_then(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
    .unwrap_or(0)
}
