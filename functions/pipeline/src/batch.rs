//! Use-case: the batch lane. The analyzer records batch-lane jobs as items (one per
//! idempotency key); [`BatchLane::tick`] submits pending items as provider batches and polls
//! open batches, then reconciles every line of an ended batch by `custom_id` through the same
//! exactly-once writes as the real-time lane (`complete`, `book_spend`, the cache).
//!
//! What makes a line booked once, however often a batch is polled or by how many pollers:
//! - an answer is stored with `complete`, which writes the image's result and the ledger in one
//!   transaction only if the image has no result; a repeat finds the result carrying this
//!   batch's id and books nothing;
//! - money of a line that left no result (an invalid answer, an image answered another way) is
//!   booked with `book_spend` under the line's own id (`batch:{batch}:{custom_id}`), once;
//! - item moves are conditional on the batch that holds the item, and the batch's totals are
//!   recorded once, by the first poller that closes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sightline_core::batch::{BatchPhase, Pack, Packer};
use sightline_core::budget::{self, Periods};
use sightline_core::model::{idempotency_key, AnalysisJob, AnalysisResult, Lane};
use sightline_core::pricing::{PriceTable, Usage};
use sightline_core::retry::{classify, FailureKind, RetryClass};
use tracing::{debug, info, warn};

use crate::analyze::BUDGET_EXCEEDED;
use crate::ports::{
    day_of, rfc3339, BatchHold, BatchItem, BatchLine, BatchProvider, BatchRecord, BatchRequest,
    BatchState, BatchStore, BatchWaiter, BlobStore, BudgetHold, Clock, Completion, Failure,
    ItemEnd, LedgerKind, LineCounts, LineOutcome, ProviderError, Queue, Repository, Spend,
    StoreError, VisionRequest, VisionResponse,
};
use crate::settings::{OverBudget, Settings};

/// A batch recorded as submitting this long ago without the provider's id is looked up at the
/// provider (a crash or a lost answer between its accept and our record).
const SUBMIT_GRACE: Duration = Duration::from_secs(15 * 60);
/// Budget holds of a batch outlive its 24-hour window with a margin.
const BATCH_HOLD: Duration = Duration::from_secs(26 * 3600);
/// Pending items looked at per tick.
const PENDING_PAGE: usize = 20_000;
/// Open batches polled per tick.
const OPEN_PAGE: usize = 1_000;

/// What one tick did (logged, shown by `run --lane batch --wait`, asserted by tests; the
/// batch Lambda's response).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TickReport {
    pub batches_submitted: u64,
    pub requests_submitted: u64,
    /// Batches whose provider refused them (validation, the enqueued-token limit).
    pub batches_failed: u64,
    pub batches_ended: u64,
    pub lines_answered: u64,
    pub lines_failed: u64,
    /// Lines back to pending (transient errors, expiry, cancellation, missing lines).
    pub lines_retried: u64,
    /// Items whose images went to the real-time lane after `batch_attempts`.
    pub items_to_realtime: u64,
    /// Items answered from the cache before submission.
    pub items_cached: u64,
    /// Batches still open after the tick.
    pub open_batches: u64,
    /// Items still pending after the tick (waiting for a batch to fill, a timer or a budget).
    pub pending_items: u64,
    /// Of those, the ones held back until later (a budget period, a backoff).
    pub deferred_items: u64,
    /// When the first held-back item is due (ms since the epoch).
    pub next_due_ms: Option<u64>,
}

impl TickReport {
    /// Nothing open and nothing pending: every batch-lane image has ended.
    pub fn is_idle(&self) -> bool {
        self.open_batches == 0 && self.pending_items == 0
    }
}

/// The money of one paid line (see [`BatchLane::line_money`]).
struct LineMoney {
    usage: Usage,
    /// `usage` is the item's estimate (the answer's usage could not be read).
    estimated: bool,
    cost_usd: f64,
    saved_usd: f64,
}

impl LineMoney {
    fn cost_at_estimate_usd(&self) -> f64 {
        if self.estimated {
            self.cost_usd
        } else {
            0.0
        }
    }
}

/// Why a tick stopped early (the next tick carries on where it left off).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct BatchLane {
    pub blobs: Arc<dyn BlobStore>,
    pub repo: Arc<dyn Repository>,
    pub store: Arc<dyn BatchStore>,
    pub provider: Arc<dyn BatchProvider>,
    /// Where jobs go back to the real-time lane.
    pub queue: Arc<dyn Queue>,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<dyn crate::metrics::Recorder>,
    /// Vectors for the images a batch answers (None: `sightline reindex` gives them).
    pub search: Option<Arc<crate::search::Search>>,
}

/// Why an item could not be put in a batch now.
enum NotEncoded {
    /// Its images fail with this reason (the content is gone or not what it should be).
    Fail(String),
    /// Try again at a later tick (storage trouble).
    Later(String),
}

impl BatchLane {
    /// Poll open batches (reconciling the ended ones), then submit what is due: a group that
    /// is full or whose oldest item waited `batch_max_wait`, or everything when `flush`.
    pub async fn tick(&self, flush: bool) -> Result<TickReport, BatchError> {
        let mut report = TickReport::default();
        self.poll(&mut report).await?;
        self.submit(flush, &mut report).await?;
        report.open_batches = self.store.list_batches(None, true, OPEN_PAGE).await?.len() as u64;
        let now = self.clock.now_ms();
        let pending = self
            .store
            .pending_batch_items(u64::MAX, PENDING_PAGE)
            .await?;
        report.pending_items = pending.len() as u64;
        let deferred = pending.iter().filter(|i| i.not_before_ms > now);
        report.deferred_items = deferred.clone().count() as u64;
        report.next_due_ms = deferred.map(|i| i.not_before_ms).min();
        Ok(report)
    }

    /// Look at every open batch once.
    pub async fn poll(&self, report: &mut TickReport) -> Result<(), BatchError> {
        for batch in self.store.list_batches(None, true, OPEN_PAGE).await? {
            match batch.state {
                BatchState::Submitting => self.recover(batch, report).await?,
                BatchState::Running => self.follow(batch, report).await?,
                BatchState::Ended | BatchState::Failed => {}
            }
        }
        Ok(())
    }

    /// A batch left `submitting`: adopt the provider's batch if it has one under our id, else
    /// give its items back (it was never accepted, as far as the provider can tell).
    async fn recover(
        &self,
        mut batch: BatchRecord,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        let now = self.clock.now_ms();
        if batch.created_ms + SUBMIT_GRACE.as_millis() as u64 > now {
            return Ok(()); // maybe still uploading
        }
        let since = batch.created_ms.saturating_sub(60_000);
        match self.provider.find(&batch.batch_id, since).await {
            Ok(Some(provider_id)) => {
                info!(batch_id = %batch.batch_id, %provider_id, "adopted a batch whose submission was not recorded");
                batch.provider_batch_id = Some(provider_id);
                batch.state = BatchState::Running;
                batch.submitted_at.get_or_insert_with(|| rfc3339(now));
                self.store.put_batch(&batch).await?;
            }
            Ok(None) => {
                warn!(batch_id = %batch.batch_id, "a batch was never accepted by the provider; its requests go back to pending");
                batch.error = Some("never accepted by the provider".into());
                self.fail_batch(batch, now, false, report).await?;
            }
            Err(e) => {
                debug!(batch_id = %batch.batch_id, error = %e, "could not look the batch up; next tick")
            }
        }
        Ok(())
    }

    /// Ask the provider about a running batch; reconcile it once it ended.
    async fn follow(
        &self,
        mut batch: BatchRecord,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        let Some(provider_id) = batch.provider_batch_id.clone() else {
            return Ok(());
        };
        let status = match self.provider.status(&provider_id).await {
            Ok(s) => s,
            Err(e) => {
                debug!(batch_id = %batch.batch_id, error = %e, "batch status unavailable; next tick");
                return Ok(());
            }
        };
        let changed = batch.provider_status.as_deref() != Some(status.status.as_str());
        batch.provider_status = Some(status.status.clone());
        match status.phase {
            BatchPhase::Running => {
                if changed {
                    self.store.put_batch(&batch).await?;
                }
            }
            BatchPhase::Failed => {
                batch.error = Some(
                    status
                        .error
                        .unwrap_or_else(|| format!("the provider ended it as {}", status.status)),
                );
                warn!(batch_id = %batch.batch_id, error = ?batch.error, "the provider refused a batch; its requests go back to pending");
                self.fail_batch(batch, self.clock.now_ms(), true, report)
                    .await?;
            }
            BatchPhase::Ended => self.reconcile(batch, report).await?,
        }
        Ok(())
    }

    /// A batch with no lines to read: every item back to pending after a backoff (so the
    /// submitter does not hit the same refusal at once), the hold settled, the error kept. A
    /// refusal that counts as an attempt (validation: it may never pass) sends items whose
    /// attempts are used up to the real-time lane; the enqueued-token limit only makes them
    /// wait for running batches to finish.
    async fn fail_batch(
        &self,
        mut batch: BatchRecord,
        now: u64,
        count_attempt: bool,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        for item in self.store.batch_items(&batch.batch_id).await? {
            if count_attempt && item.attempts + 1 >= self.settings.batch_attempts {
                self.to_realtime(&batch, &item, now, report).await?;
                continue;
            }
            let not_before = now + self.backoff(item.attempts).as_millis() as u64;
            self.store
                .release_batch_item(&item.custom_id, &batch.batch_id, count_attempt, not_before)
                .await?;
        }
        batch.state = BatchState::Failed;
        batch.ended_at = Some(rfc3339(now));
        if self.store.close_batch(&batch).await? {
            report.batches_failed += 1;
            self.settle(&batch).await;
        }
        Ok(())
    }

    /// Read an ended batch's lines and settle every item of it by `custom_id`. Safe to repeat
    /// and to run twice at once (see the module docs).
    pub async fn reconcile(
        &self,
        mut batch: BatchRecord,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        let Some(provider_id) = batch.provider_batch_id.clone() else {
            return Ok(());
        };
        let lines = match self.provider.results(&provider_id).await {
            Ok(l) => l,
            Err(e) => {
                debug!(batch_id = %batch.batch_id, error = %e, "batch results unavailable; next tick");
                return Ok(());
            }
        };
        let mut by_id: HashMap<String, LineOutcome> = HashMap::with_capacity(lines.len());
        for BatchLine { custom_id, outcome } in lines {
            if by_id.contains_key(&custom_id) {
                warn!(batch_id = %batch.batch_id, %custom_id, "a custom_id came back twice; the first line counts");
                continue;
            }
            by_id.insert(custom_id, outcome);
        }
        let now = self.clock.now_ms();
        for item in self.store.batch_items(&batch.batch_id).await? {
            if item.ended.is_some() {
                continue;
            }
            let outcome = by_id.remove(&item.custom_id);
            self.settle_line(&batch, &item, outcome, now, report)
                .await?;
        }
        for custom_id in by_id.keys() {
            debug!(batch_id = %batch.batch_id, %custom_id, "a line for no item of this batch (settled already)");
        }
        // Totals from the items' final states: the same whoever settled which line.
        let items = self.store.batch_items(&batch.batch_id).await?;
        let mut counts = LineCounts::default();
        let (mut cost, mut saved) = (0.0, 0.0);
        for end in items.iter().filter_map(|i| i.ended.as_ref()) {
            if end.answered {
                counts.succeeded += 1;
            } else {
                counts.failed += 1;
            }
            cost += end.cost_usd;
            saved += end.saved_usd;
        }
        counts.retried = batch
            .requests
            .saturating_sub(counts.succeeded + counts.failed);
        batch.counts = counts;
        batch.cost_usd = cost;
        batch.saved_usd = saved;
        batch.state = BatchState::Ended;
        batch.ended_at = Some(rfc3339(now));
        if self.store.close_batch(&batch).await? {
            report.batches_ended += 1;
            info!(batch_id = %batch.batch_id, provider_status = ?batch.provider_status, succeeded = counts.succeeded, failed = counts.failed, retried = counts.retried, cost_usd = cost, "batch reconciled");
            self.settle(&batch).await;
        }
        self.store.purge_batch(&batch.batch_id).await?;
        Ok(())
    }

    /// One item's line: book what it cost, then end the item or send it back.
    async fn settle_line(
        &self,
        batch: &BatchRecord,
        item: &BatchItem,
        outcome: Option<LineOutcome>,
        now: u64,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        let line_id = format!("batch:{}:{}", batch.batch_id, item.custom_id);
        match outcome {
            Some(LineOutcome::Answered(resp)) => {
                let result = self.answer(batch, item, resp, now);
                self.store_answer(batch, item, &result, &line_id).await?;
                let end = ItemEnd {
                    answered: true,
                    cost_usd: result.cost_usd,
                    saved_usd: result.saved_usd,
                };
                self.store
                    .end_batch_item(&item.custom_id, &batch.batch_id, &end)
                    .await?;
                report.lines_answered += 1;
            }
            Some(LineOutcome::Failed(e)) => {
                let paid = self.book_failed_line(item, &e, &line_id, now).await?;
                let permanent = classify(&e.kind) == RetryClass::Permanent
                    && !(e.kind == FailureKind::InvalidOutput
                        && item.attempts + 1 < self.settings.batch_attempts);
                if permanent {
                    let reason = format!("{} (batch): {}", item.model, e.message);
                    self.fail_waiters(item, &reason, Failure::Permanent).await?;
                    let end = ItemEnd {
                        answered: false,
                        cost_usd: paid.0,
                        saved_usd: paid.1,
                    };
                    self.store
                        .end_batch_item(&item.custom_id, &batch.batch_id, &end)
                        .await?;
                    report.lines_failed += 1;
                } else {
                    debug!(custom_id = %item.custom_id, error = %e.message, "batch line failed; retried");
                    self.retry_item(batch, item, now, report).await?;
                }
            }
            Some(LineOutcome::Unprocessed(why)) => {
                debug!(custom_id = %item.custom_id, %why, "batch line not processed; retried");
                self.retry_item(batch, item, now, report).await?;
            }
            None => {
                warn!(batch_id = %batch.batch_id, custom_id = %item.custom_id, "no line came back for a request; retried");
                self.retry_item(batch, item, now, report).await?;
            }
        }
        Ok(())
    }

    /// The answer as the first waiter's result, priced at the batch prices of the model that
    /// answered (a dated name not in the table: the model asked for). Never $0 when paid: an
    /// unreadable usage is booked at the item's estimate.
    fn answer(
        &self,
        batch: &BatchRecord,
        item: &BatchItem,
        resp: VisionResponse,
        now: u64,
    ) -> AnalysisResult {
        let money = self.line_money(item, &resp.model, resp.usage);
        AnalysisResult {
            provider: self.provider.name().to_string(),
            model: item.model.clone(),
            analysis: resp.analysis,
            usage: money.usage,
            cost_usd: money.cost_usd,
            cached: false,
            calls: 1,
            usage_estimated: money.estimated,
            cost_at_estimate_usd: money.cost_at_estimate_usd(),
            lane: Lane::Batch,
            batch_id: Some(batch.batch_id.clone()),
            saved_usd: money.saved_usd,
            reused_from: None,
            idempotency_key: item.key.clone(),
            prompt_version: self.settings.prompt_version.clone(),
            price_version: PriceTable::builtin().version().to_string(),
            completed_at: rfc3339(now),
        }
    }

    /// What one paid line cost: its reported usage (else the item's estimate, flagged) at the
    /// batch prices of the model that answered (a dated name not in the table: the model
    /// asked for), and what real time would have cost more. Counted in the spend metrics.
    fn line_money(&self, item: &BatchItem, answered: &str, usage: Option<Usage>) -> LineMoney {
        let table = PriceTable::builtin();
        let (usage, estimated) = match usage {
            Some(u) => (u, false),
            None => (
                Usage {
                    input_tokens: item.estimate_input_tokens,
                    output_tokens: item.estimate_output_tokens,
                    cached_tokens: 0,
                },
                true,
            ),
        };
        let (cost, realtime) = match table.model(answered).or_else(|_| table.model(&item.model)) {
            Ok(p) => (p.batch_cost_usd(&usage), p.cost_usd(&usage)),
            Err(_) => (item.estimate_usd, item.estimate_usd * 2.0),
        };
        crate::metrics::observe_spend(&*self.metrics, &item.model, &usage, cost);
        LineMoney {
            usage,
            estimated,
            cost_usd: cost,
            saved_usd: (realtime - cost).max(0.0),
        }
    }

    /// Store an answer on the first waiter (paying), then on the others at $0.
    async fn store_answer(
        &self,
        batch: &BatchRecord,
        item: &BatchItem,
        result: &AnalysisResult,
        line_id: &str,
    ) -> Result<(), BatchError> {
        let mut waiters = item.waiters.iter();
        let Some(payer) = waiters.next() else {
            // No image waits (cannot happen: an item is made for one); the money is booked.
            self.book_spend_of(&item.tenant, "", line_id, result)
                .await?;
            self.repo.cache_result(result).await?;
            return Ok(());
        };
        let estimate = item.estimate_usd;
        match self
            .repo
            .complete(&payer.tenant, &payer.image_id, result, estimate)
            .await
        {
            Ok(Completion::Stored) => {}
            Ok(Completion::AlreadyDone) => {
                let stored = self.repo.get_image(&payer.tenant, &payer.image_id).await?;
                let ours = stored.and_then(|r| r.result).is_some_and(|r| {
                    r.batch_id.as_deref() == Some(batch.batch_id.as_str())
                        && r.idempotency_key == item.key
                        && !r.cached
                });
                if !ours {
                    // Answered another way meanwhile: this line was still paid.
                    self.book_spend_of(&payer.tenant, &payer.image_id, line_id, result)
                        .await?;
                    self.repo.cache_result(result).await?;
                }
            }
            Err(StoreError::NotFound(_)) => {
                self.book_spend_of(&payer.tenant, &payer.image_id, line_id, result)
                    .await?;
                self.repo.cache_result(result).await?;
            }
            Err(e) => return Err(e.into()),
        }
        for w in waiters {
            self.give_cached(w, result).await?;
        }
        if let Some(search) = &self.search {
            for w in &item.waiters {
                search.index_or_log(&w.tenant, &w.image_id).await;
            }
        }
        Ok(())
    }

    /// A waiter that shares the answer: its own result at $0.
    async fn give_cached(
        &self,
        w: &BatchWaiter,
        answer: &AnalysisResult,
    ) -> Result<(), BatchError> {
        let result = AnalysisResult {
            usage: Usage::default(),
            cost_usd: 0.0,
            cached: true,
            calls: 0,
            usage_estimated: false,
            cost_at_estimate_usd: 0.0,
            saved_usd: 0.0,
            ..answer.clone()
        };
        match self
            .repo
            .complete(&w.tenant, &w.image_id, &result, 0.0)
            .await
        {
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn book_spend_of(
        &self,
        tenant: &str,
        image_id: &str,
        spend_id: &str,
        result: &AnalysisResult,
    ) -> Result<(), BatchError> {
        let spend = Spend::of_result(result);
        self.repo
            .book_spend(tenant, image_id, spend_id, &spend)
            .await?;
        Ok(())
    }

    /// Book a failed line that was paid (an invalid answer); returns (cost, saved).
    async fn book_failed_line(
        &self,
        item: &BatchItem,
        e: &ProviderError,
        line_id: &str,
        now: u64,
    ) -> Result<(f64, f64), BatchError> {
        if e.usage.is_none() && !e.billed {
            return Ok((0.0, 0.0));
        }
        let money = self.line_money(item, &item.model, e.usage);
        let spend = Spend {
            day: day_of(&rfc3339(now)).to_string(),
            model: item.model.clone(),
            calls: 1,
            usage: money.usage,
            cost_usd: money.cost_usd,
            calls_at_estimate: u64::from(money.estimated),
            cost_at_estimate_usd: money.cost_at_estimate_usd(),
            lane: Lane::Batch,
            saved_usd: money.saved_usd,
            kind: LedgerKind::Analysis,
        };
        let (tenant, image) = item
            .waiters
            .first()
            .map(|w| (w.tenant.as_str(), w.image_id.as_str()))
            .unwrap_or((item.tenant.as_str(), ""));
        self.repo.book_spend(tenant, image, line_id, &spend).await?;
        Ok((spend.cost_usd, spend.saved_usd))
    }

    /// A line that may still be answered: back to pending, or after `batch_attempts` batches
    /// to the real-time lane.
    async fn retry_item(
        &self,
        batch: &BatchRecord,
        item: &BatchItem,
        now: u64,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        if item.attempts + 1 >= self.settings.batch_attempts {
            self.to_realtime(batch, item, now, report).await?;
        } else {
            // Lines come back for retry in the next batch at once (not after the timer).
            if self
                .store
                .release_batch_item(&item.custom_id, &batch.batch_id, true, now)
                .await?
            {
                report.lines_retried += 1;
            }
        }
        Ok(())
    }

    /// An item whose batch attempts are used up: its images go to the real-time lane.
    async fn to_realtime(
        &self,
        batch: &BatchRecord,
        item: &BatchItem,
        now: u64,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        // Real-time jobs first: if the item's removal then fails, a retry sends them again
        // (duplicates are harmless), never none.
        self.send_realtime(item).await?;
        // Out of the batch without counting as failed: release, then drop it.
        if self
            .store
            .release_batch_item(&item.custom_id, &batch.batch_id, true, now)
            .await?
        {
            self.store.drop_pending_item(&item.custom_id).await?;
        }
        report.items_to_realtime += 1;
        info!(custom_id = %item.custom_id, attempts = item.attempts + 1, "batch attempts used up; the images go to the real-time lane");
        Ok(())
    }

    /// Each waiter's job, on the real-time lane.
    async fn send_realtime(&self, item: &BatchItem) -> Result<(), BatchError> {
        let mut bodies = Vec::with_capacity(item.waiters.len());
        for w in &item.waiters {
            let job = AnalysisJob {
                v: AnalysisJob::VERSION,
                image_id: w.image_id.clone(),
                tenant: w.tenant.clone(),
                resized_key: item.resized_key.clone(),
                sha256: item.sha256.clone(),
                width: item.width,
                height: item.height,
                detail: Some(item.detail),
                lane: Some(Lane::Realtime),
                check: None,
            };
            bodies.push(
                serde_json::to_string(&job)
                    .map_err(|e| StoreError::Permanent(format!("job message: {e}")))?,
            );
        }
        self.queue.send(bodies).await?;
        Ok(())
    }

    async fn fail_waiters(
        &self,
        item: &BatchItem,
        reason: &str,
        failure: Failure,
    ) -> Result<(), BatchError> {
        let now = rfc3339(self.clock.now_ms());
        for w in &item.waiters {
            self.repo
                .mark_failed(&w.tenant, &w.image_id, reason, failure, &now)
                .await?;
        }
        Ok(())
    }

    /// End a hold once the batch's money is booked (or none was spent).
    async fn settle(&self, batch: &BatchRecord) {
        let Some(hold) = &batch.hold else { return };
        let periods = Periods::at(hold.at_ms);
        if let Err(e) = self
            .repo
            .settle_budget(&batch.tenant, &periods, &hold.id)
            .await
        {
            debug!(error = %e, "could not settle a batch's budget hold (it expires)");
        }
    }

    /// Submit what is due, grouped by tenant and model. One submission at a time per process:
    /// two ticks of one process would only race for the same items (other processes' races are
    /// settled by the store's conditional assignment).
    pub async fn submit(&self, flush: bool, report: &mut TickReport) -> Result<(), BatchError> {
        static SUBMITTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = SUBMITTING.lock().await;
        let now = self.clock.now_ms();
        let pending = self.store.pending_batch_items(now, PENDING_PAGE).await?;
        let mut groups: BTreeMap<(String, String), Vec<BatchItem>> = BTreeMap::new();
        for item in pending {
            if item.provider != self.provider.name() {
                debug!(custom_id = %item.custom_id, provider = %item.provider, "an item for another provider waits");
                continue;
            }
            groups
                .entry((item.tenant.clone(), item.model.clone()))
                .or_default()
                .push(item);
        }
        let limits = self.provider.limits().min(
            self.settings.batch_max_requests,
            self.settings.batch_max_bytes,
        );
        for ((tenant, model), items) in groups {
            let oldest = items.iter().map(|i| i.created_ms).min().unwrap_or(now);
            // base64 makes a JPEG 4/3 larger; the request around it adds about 1 KB.
            let bytes: u64 = items.iter().map(|i| i.bytes * 4 / 3 + 1024).sum();
            let due = flush
                || oldest + self.settings.batch_max_wait.as_millis() as u64 <= now
                || items.len() >= limits.max_requests
                || bytes >= limits.max_bytes as u64;
            if !due {
                continue;
            }
            self.submit_group(&tenant, &model, items, limits, report)
                .await?;
        }
        Ok(())
    }

    /// Encode a group's items one by one into batches that fit the limits, sending each batch
    /// as it fills: only one batch's input is held in memory.
    async fn submit_group(
        &self,
        tenant: &str,
        model: &str,
        items: Vec<BatchItem>,
        limits: sightline_core::batch::BatchLimits,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        let mut packer = Packer::new(limits);
        let mut chunk: Vec<(BatchItem, Vec<u8>)> = Vec::new();
        for item in items {
            if let Some(done) = self.store.cached_answer(&item.key).await? {
                // Answered since it was recorded (the same bytes in the real-time lane).
                for w in &item.waiters {
                    self.give_cached(w, &done).await?;
                }
                self.store.drop_pending_item(&item.custom_id).await?;
                report.items_cached += 1;
                continue;
            }
            let encoded = match self.encode(&item).await {
                Ok(e) => e,
                Err(NotEncoded::Fail(reason)) => {
                    self.fail_waiters(&item, &reason, Failure::Permanent)
                        .await?;
                    self.store.drop_pending_item(&item.custom_id).await?;
                    continue;
                }
                Err(NotEncoded::Later(reason)) => {
                    debug!(custom_id = %item.custom_id, %reason, "request not encoded; next tick");
                    continue;
                }
            };
            match packer.offer(encoded.len()) {
                Pack::Fits => chunk.push((item, encoded)),
                Pack::Full => {
                    let full = std::mem::take(&mut chunk);
                    self.send_batch(tenant, model, full, report).await?;
                    chunk.push((item, encoded));
                }
                Pack::Oversize => {
                    let reason = format!(
                        "the request is {} bytes, over the provider's batch limit of {} bytes",
                        encoded.len(),
                        limits.max_bytes
                    );
                    self.fail_waiters(&item, &reason, Failure::Permanent)
                        .await?;
                    self.store.drop_pending_item(&item.custom_id).await?;
                }
            }
        }
        if !chunk.is_empty() {
            self.send_batch(tenant, model, chunk, report).await?;
        }
        Ok(())
    }

    /// How long the submitter waits after a refused batch: one poll period, doubling per
    /// attempt, at most an hour.
    fn backoff(&self, attempts: u32) -> Duration {
        (self.settings.batch_poll_every * (1u32 << attempts.min(6))).min(Duration::from_secs(3600))
    }

    /// The provider's encoding of an item's request, its JPEG checked against its sha256.
    async fn encode(&self, item: &BatchItem) -> Result<Vec<u8>, NotEncoded> {
        let jpeg = match self
            .blobs
            .get(&item.resized_key, self.settings.prepare.max_input_bytes)
            .await
        {
            Ok(b) => b,
            Err(e @ (StoreError::NotFound(_) | StoreError::TooLarge { .. })) => {
                return Err(NotEncoded::Fail(e.to_string()))
            }
            Err(e) => return Err(NotEncoded::Later(e.to_string())),
        };
        let got = hex::encode(Sha256::digest(&jpeg));
        if got != item.sha256 {
            return Err(NotEncoded::Fail(format!(
                "{} holds content with sha256 {got}, not the request's {}",
                item.resized_key, item.sha256
            )));
        }
        let request = BatchRequest {
            custom_id: item.custom_id.clone(),
            request: VisionRequest {
                model: item.model.clone(),
                jpeg: Arc::new(jpeg),
                width: item.width,
                height: item.height,
                prompt: self.settings.prompt.clone(),
                max_output_tokens: self.settings.max_output_tokens,
                detail: item.detail,
                check: None,
            },
        };
        self.provider
            .encode(&request)
            .map_err(|e| NotEncoded::Fail(e.message))
    }

    /// Hold the budget, record the batch, take its items, submit it, record the provider's id.
    async fn send_batch(
        &self,
        tenant: &str,
        model: &str,
        mut chunk: Vec<(BatchItem, Vec<u8>)>,
        report: &mut TickReport,
    ) -> Result<(), BatchError> {
        let now = self.clock.now_ms();
        let Some(hold) = self.hold_budget(tenant, &mut chunk, now).await? else {
            return Ok(());
        };
        if chunk.is_empty() {
            return Ok(());
        }
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        let mut batch = BatchRecord {
            batch_id: batch_id.clone(),
            tenant: tenant.to_string(),
            provider: self.provider.name().to_string(),
            model: model.to_string(),
            state: BatchState::Submitting,
            provider_batch_id: None,
            provider_status: None,
            error: None,
            requests: 0,
            counts: LineCounts::default(),
            cost_usd: 0.0,
            saved_usd: 0.0,
            hold,
            created_at: rfc3339(now),
            created_ms: now,
            submitted_at: None,
            ended_at: None,
        };
        self.store.put_batch(&batch).await?;
        let ids: Vec<String> = chunk.iter().map(|(i, _)| i.custom_id.clone()).collect();
        let taken = self.store.assign_batch_items(&batch_id, &ids).await?;
        let encoded: Vec<Vec<u8>> = chunk
            .into_iter()
            .filter(|(i, _)| taken.contains(&i.custom_id))
            .map(|(_, e)| e)
            .collect();
        batch.requests = encoded.len() as u64;
        if encoded.is_empty() {
            batch.state = BatchState::Failed;
            batch.error = Some("its requests were taken by another submitter".into());
            self.store.close_batch(&batch).await?;
            self.settle(&batch).await;
            return Ok(());
        }
        match self.provider.submit(&batch_id, encoded).await {
            Ok(provider_id) => {
                info!(%batch_id, %provider_id, requests = batch.requests, model, "batch submitted");
                batch.provider_batch_id = Some(provider_id);
                batch.state = BatchState::Running;
                batch.submitted_at = Some(rfc3339(self.clock.now_ms()));
                self.store.put_batch(&batch).await?;
                report.batches_submitted += 1;
                report.requests_submitted += batch.requests;
            }
            // No answer: the provider may have accepted it. Left `submitting` with its items
            // for `recover` to look up, so nothing is submitted (and paid) twice.
            Err(e) if matches!(e.kind, FailureKind::Timeout | FailureKind::Connection) => {
                warn!(%batch_id, error = %e.message, "batch submission unanswered; looked up later");
                self.store.put_batch(&batch).await?;
            }
            Err(e) => {
                warn!(%batch_id, error = %e.message, "the provider refused a batch");
                batch.error = Some(e.message.clone());
                self.store.put_batch(&batch).await?;
                let permanent = classify(&e.kind) == RetryClass::Permanent;
                self.fail_batch(batch, now, permanent, report).await?;
            }
        }
        Ok(())
    }

    /// Hold the chunk's estimate against the tenant's caps: as many requests as fit in what is
    /// left of the tightest capped period, the last of them allowed to cross the cap (the same
    /// bound as the real-time lane: at most one request's estimate over). What does not fit
    /// waits for the period (or fails, per `over_budget`). Ok(None): nothing may go now.
    async fn hold_budget(
        &self,
        tenant: &str,
        chunk: &mut Vec<(BatchItem, Vec<u8>)>,
        now: u64,
    ) -> Result<Option<Option<BatchHold>>, BatchError> {
        let caps = self
            .repo
            .tenant_budget(tenant)
            .await?
            .unwrap_or(self.settings.budget);
        if !caps.is_capped() {
            return Ok(Some(None));
        }
        let periods = Periods::at(now);
        let counts = self.repo.budget_counts(tenant, &periods, now).await?;
        let left = |cap: Option<f64>, c: budget::Counted| {
            cap.map(|cap| cap - c.spent_usd - c.reserved_usd)
        };
        let (headroom, period) = match (
            left(caps.daily(), counts.day),
            left(caps.monthly(), counts.month),
        ) {
            (Some(d), Some(m)) if m < d => (m, budget::Period::Month),
            (Some(d), _) => (d, budget::Period::Day),
            (None, Some(m)) => (m, budget::Period::Month),
            (None, None) => return Ok(Some(None)),
        };
        let mut n = 0;
        let mut amount = 0.0;
        for (item, _) in chunk.iter() {
            if amount >= headroom {
                break;
            }
            amount += item.estimate_usd;
            n += 1;
        }
        let expires = now + BATCH_HOLD.as_millis() as u64;
        let held = if n == 0 {
            None
        } else {
            match self
                .repo
                .reserve_budget(tenant, &periods, amount, &caps, now, expires)
                .await?
            {
                BudgetHold::Reserved(id) => Some(id),
                BudgetHold::Over(_) => None,
            }
        };
        match held {
            Some(id) => {
                let rest = chunk.split_off(n);
                if !rest.is_empty() {
                    self.over_budget(&rest, period, &periods).await?;
                }
                Ok(Some(Some(BatchHold { id, at_ms: now })))
            }
            None => {
                let all = std::mem::take(chunk);
                self.over_budget(&all, period, &periods).await?;
                Ok(None)
            }
        }
    }

    /// Items the budget refused: wait for the period to roll over, or fail.
    async fn over_budget(
        &self,
        items: &[(BatchItem, Vec<u8>)],
        period: budget::Period,
        periods: &Periods,
    ) -> Result<(), BatchError> {
        for (item, _) in items {
            match self.settings.over_budget {
                OverBudget::Wait => {
                    let at = budget::retry_at_ms(periods, period);
                    self.store.defer_batch_item(&item.custom_id, at).await?;
                }
                OverBudget::Fail => {
                    self.fail_waiters(item, BUDGET_EXCEEDED, Failure::Permanent)
                        .await?;
                    self.store.drop_pending_item(&item.custom_id).await?;
                }
            }
        }
        info!(
            items = items.len(),
            "over budget: batch requests wait or fail"
        );
        Ok(())
    }
}

/// The item of a batch-lane job, keyed like the real-time lane's cache for the primary model.
pub fn item_for(
    settings: &Settings,
    provider: &str,
    job: &AnalysisJob,
    detail: sightline_core::model::Detail,
    bytes: u64,
    now_ms: u64,
) -> BatchItem {
    let model = settings.model.clone();
    let answer = settings.answer_params_for(&model, detail);
    let key = idempotency_key(
        settings.cache_scope(&job.tenant),
        &job.sha256,
        &model,
        &answer,
    );
    let table = PriceTable::builtin();
    let estimate = table
        .estimate(
            &model,
            job.width,
            job.height,
            &settings.estimate_params(detail),
        )
        .ok();
    let estimate_usd = estimate
        .as_ref()
        .and_then(|e| table.batch_cost_usd(e).ok())
        .unwrap_or(0.0);
    BatchItem {
        custom_id: sightline_core::batch::custom_id(&key),
        key,
        tenant: job.tenant.clone(),
        provider: provider.to_string(),
        model,
        sha256: job.sha256.clone(),
        resized_key: job.resized_key.clone(),
        width: job.width,
        height: job.height,
        bytes,
        detail,
        estimate_usd,
        estimate_input_tokens: estimate.as_ref().map_or(0, |e| e.input_tokens),
        estimate_output_tokens: estimate.as_ref().map_or(0, |e| e.output_tokens),
        waiters: Vec::new(),
        batch_id: None,
        attempts: 0,
        created_ms: now_ms,
        not_before_ms: 0,
        ended: None,
    }
}
