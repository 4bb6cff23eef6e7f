//! Use-case: one queued job → cached result, or a rate-limited provider call with fallback,
//! written exactly once. The caller maps the outcome to delete / retry-later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sightline_core::budget::{self, BudgetCaps, Period, Periods};
use sightline_core::limiter::{
    Denied, Grant, Learnt, LimitOp, LimitOutcome, LimitState, Limits, ProviderView,
};
use sightline_core::model::{
    idempotency_key, AnalysisJob, AnalysisResult, Detail, Estimate, ImageRecord, ImageStatus, Lane,
};
use sightline_core::pricing::PriceTable;
use sightline_core::pricing::Usage;
use sightline_core::retry::{classify, retry_delay, FailureKind, RetryClass};
use tracing::{debug, info, warn};

use crate::ports::{
    day_of, rfc3339, BatchStore, BatchWaiter, BlobStore, BudgetHold, Claim, Clock, Completion,
    Enqueued, Failure, LedgerKind, ProviderError, RateLimitStore, Repository, Spend, StoreError,
    VisionProvider, VisionRequest,
};
use crate::settings::{AnalysisPrompt, OverBudget, Settings};

/// What to do with the message after handling it.
#[derive(Debug, Clone, PartialEq)]
pub enum AnalyzeOutcome {
    /// Analysed now; the result and ledger were written.
    Done { model: String, cost_usd: f64 },
    /// Same bytes, model and prompt were analysed before: stored at $0.
    Cached,
    /// A near-duplicate of an image analysed before (near-duplicate skip): its analysis was
    /// reused at $0.
    Reused { from: String },
    /// A batch-lane job, recorded for the next provider batch (or joined to the batch request
    /// of the same key): the batch lane answers it; delete the message.
    Batched,
    /// Duplicate delivery: the image already has its result.
    AlreadyDone,
    /// The job names content its image no longer has (the record holds another sha256):
    /// nothing to do for it; the image's own job carries on. Deleted, with a warning.
    Stale(String),
    /// Permanent failure, recorded on the image (when known); delete the message.
    Failed(String),
    /// Transient: make the message visible again after `delay`.
    Retry { delay: Duration, reason: String },
}

impl AnalyzeOutcome {
    pub fn is_retry(&self) -> bool {
        matches!(self, AnalyzeOutcome::Retry { .. })
    }

    /// A job waiting for its tenant's budget period to roll over: not a failure, so its
    /// deliveries never mark the image failed.
    pub fn is_budget_wait(&self) -> bool {
        matches!(self, AnalyzeOutcome::Retry { reason, .. } if reason.starts_with(BUDGET_WAIT))
    }
}

/// How every budget wait's reason starts (see [`AnalyzeOutcome::is_budget_wait`]).
pub const BUDGET_WAIT: &str = "over budget, waiting";
/// The failure reason of an image refused with `over_budget = fail`.
pub const BUDGET_EXCEEDED: &str = "budget exceeded";

/// What a budget reservation left to do.
enum Budgeted {
    /// Go ahead; settle this hold (if any) once the call's money is booked.
    Go(Option<(Periods, String)>),
    /// The period's cap is spent: wait until it rolls over at `retry_at_ms`, or fail.
    Over { period: Period, retry_at_ms: u64 },
}

/// Longest budget wait in one delivery: SQS keeps a message invisible at most 12 h from its
/// receipt, so a longer wait would be refused. A daily wait then takes at most three deliveries.
const MAX_BUDGET_WAIT: Duration = Duration::from_secs(11 * 3600);

/// The caps that apply to a tenant: its own budget item, else the settings' (analyses and
/// generated images alike).
pub(crate) async fn caps_for(
    repo: &dyn Repository,
    settings: &Settings,
    tenant: &str,
) -> Result<BudgetCaps, StoreError> {
    Ok(repo.tenant_budget(tenant).await?.unwrap_or(settings.budget))
}

/// The visibility delay and reason of a message waiting for `period` to roll over at
/// `retry_at_ms` (capped at what one SQS delivery allows; it then simply checks again).
pub(crate) fn budget_wait(period: Period, retry_at_ms: u64, now_ms: u64) -> (Duration, String) {
    let which = match period {
        Period::Day => "daily",
        Period::Month => "monthly",
    };
    let delay =
        Duration::from_millis(retry_at_ms.saturating_sub(now_ms).max(1000)).min(MAX_BUDGET_WAIT);
    (
        delay,
        format!(
            "{BUDGET_WAIT} for the {which} budget to roll over at {}",
            rfc3339(retry_at_ms)
        ),
    )
}

/// How long a provider may take to finish a batch.
const BATCH_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// In-place retries of the final write after a paid answer.
const STORE_RETRIES: u32 = 3;

/// Money paid for the calls of one model of the chain, reported or estimated.
#[derive(Debug, Clone, Default)]
struct Paid {
    calls: u64,
    usage: Usage,
    cost_usd: f64,
    calls_at_estimate: u64,
    cost_at_estimate_usd: f64,
}

impl Paid {
    fn add_reported(&mut self, usage: &Usage, cost_usd: f64) {
        self.calls += 1;
        self.usage.input_tokens += usage.input_tokens;
        self.usage.output_tokens += usage.output_tokens;
        self.usage.cached_tokens += usage.cached_tokens;
        self.cost_usd += cost_usd;
    }

    /// A billed call whose usage could not be read: booked at its pre-call estimate.
    fn add_estimated(&mut self, estimate: &Estimate) {
        self.calls += 1;
        self.calls_at_estimate += 1;
        self.usage.input_tokens += estimate.input_tokens;
        self.usage.output_tokens += estimate.output_tokens;
        self.cost_usd += estimate.cost_usd;
        self.cost_at_estimate_usd += estimate.cost_usd;
    }

    fn spend(&self, day: &str, model: &str) -> Spend {
        Spend {
            day: day.to_string(),
            model: model.to_string(),
            calls: self.calls,
            usage: self.usage,
            cost_usd: self.cost_usd,
            calls_at_estimate: self.calls_at_estimate,
            cost_at_estimate_usd: self.cost_at_estimate_usd,
            lane: Lane::Realtime,
            saved_usd: 0.0,
            kind: LedgerKind::Analysis,
        }
    }
}

/// How one model of the chain ended.
enum Step {
    /// The provider answered: store this (boxed: a result is far larger than the others).
    Answered(Box<AnalysisResult>),
    /// Try the next model; if none is left, retry the message after `delay`.
    Fallback { delay: Duration, reason: String },
    /// Retry the message after `delay`.
    Retry { delay: Duration, reason: String },
    /// Permanent: record the image failed.
    Fail(String),
}

/// The provider's limits, per model (providers limit per model): kept in this process for all
/// its workers, or shared through the store with every process and instance
/// ([`Limiters::shared`]).
#[derive(Clone)]
pub struct Limiters {
    limits: Limits,
    keep: Keep,
}

#[derive(Clone)]
enum Keep {
    Local(Arc<Mutex<HashMap<String, LimitState>>>),
    /// In the store under `{scope}:{model}`; what the calls of this process learnt (headers,
    /// corrections) waits here and goes with its next take, in the same write.
    Shared {
        store: Arc<dyn RateLimitStore>,
        scope: String,
        learnt: Arc<Mutex<HashMap<String, Learnt>>>,
        clock: Arc<dyn Clock>,
    },
}

/// The wait after a shared limit could not be reached: the message comes back a little later.
const LIMIT_STORE_RETRY: Duration = Duration::from_secs(2);

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Limiters {
    /// Limits kept in this process.
    pub fn new(limits: Limits) -> Limiters {
        Limiters {
            limits,
            keep: Keep::Local(Arc::new(Mutex::new(HashMap::new()))),
        }
    }

    /// One limit per model in `store`, shared with everyone using it; `scope` (the provider)
    /// keeps providers apart.
    pub fn shared(
        limits: Limits,
        store: Arc<dyn RateLimitStore>,
        scope: &str,
        clock: Arc<dyn Clock>,
    ) -> Limiters {
        Limiters {
            limits,
            keep: Keep::Shared {
                store,
                scope: scope.to_string(),
                learnt: Arc::new(Mutex::new(HashMap::new())),
                clock,
            },
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.keep, Keep::Shared { .. })
    }

    async fn apply(&self, model: &str, op: LimitOp, now_ms: u64) -> LimitOutcome {
        match &self.keep {
            Keep::Local(states) => locked(states).entry(model.to_string()).or_default().apply(
                &self.limits,
                &op,
                now_ms,
            ),
            Keep::Shared {
                store,
                scope,
                clock,
                ..
            } => {
                let key = format!("{scope}:{model}");
                match store
                    .apply_limit(&key, &self.limits, &op, clock.clone())
                    .await
                {
                    Ok(outcome) => outcome,
                    // Denied like a full limit (a take's caller keeps what it learnt).
                    Err(e) => {
                        warn!(error = %e, key, "the shared rate limit could not be reached");
                        LimitOutcome::Denied(Denied::Wait(LIMIT_STORE_RETRY))
                    }
                }
            }
        }
    }

    fn keep_learnt(learnt: &Mutex<HashMap<String, Learnt>>, model: &str, more: Learnt) {
        if !more.is_empty() {
            locked(learnt)
                .entry(model.to_string())
                .or_default()
                .merge(more);
        }
    }

    /// Schedule one call of `tokens` no further than `max_wait` away.
    async fn take(
        &self,
        model: &str,
        tokens: u64,
        now_ms: u64,
        max_wait: Duration,
    ) -> Result<Grant, Denied> {
        if self.limits.is_unlimited() {
            return Ok(Grant {
                at_ms: now_ms,
                tokens,
            });
        }
        let learnt = match &self.keep {
            Keep::Local(_) => Learnt::default(),
            Keep::Shared { learnt, .. } => locked(learnt).remove(model).unwrap_or_default(),
        };
        let op = LimitOp::Take {
            tokens,
            max_wait,
            learnt,
        };
        match self.apply(model, op, now_ms).await {
            LimitOutcome::Granted(grant) => Ok(grant),
            LimitOutcome::Denied(denied) => {
                if let Keep::Shared { learnt: kept, .. } = &self.keep {
                    Self::keep_learnt(kept, model, learnt);
                }
                Err(denied)
            }
            // A take never blocks.
            LimitOutcome::Blocked => Err(Denied::Wait(LIMIT_STORE_RETRY)),
        }
    }

    /// What a finished call told us: the tokens the provider counted for it (None: unknown,
    /// the reservation stands) and its rate-limit headers.
    pub(crate) fn learn(
        &self,
        model: &str,
        grant: Grant,
        counted: Option<u64>,
        view: &ProviderView,
        now_ms: u64,
    ) {
        if self.limits.is_unlimited() {
            return;
        }
        let seen = (*view != ProviderView::default()).then_some((*view, now_ms));
        match &self.keep {
            Keep::Local(states) => {
                let mut states = locked(states);
                let state = states.entry(model.to_string()).or_default();
                if let Some(counted) = counted {
                    state.correct(&self.limits, grant, counted);
                }
                if let Some((view, at)) = seen {
                    state.observe(&self.limits, &view, at);
                }
            }
            Keep::Shared { learnt, .. } => {
                let more = Learnt {
                    tokens_delta: counted.map_or(0, |c| c as i64 - grant.tokens as i64),
                    view: seen,
                };
                Self::keep_learnt(learnt, model, more);
            }
        }
    }

    /// The provider said wait: nothing goes to `model` before `until_ms` (for every process
    /// when shared: written at once).
    async fn block(&self, model: &str, until_ms: u64, now_ms: u64) {
        if !self.limits.is_unlimited() {
            self.apply(model, LimitOp::Block { until_ms }, now_ms).await;
        }
    }

    /// Take a slot of `model`'s limit for `tokens` and wait for it, when it is at most
    /// `max_wait` away: a job waits in hand instead of going back to the queue, where each
    /// denial would spend one of its deliveries.
    pub(crate) async fn wait_for_slot(
        &self,
        model: &str,
        tokens: u64,
        max_wait: Duration,
        clock: &dyn Clock,
    ) -> Result<Grant, Denied> {
        let grant = self.take(model, tokens, clock.now_ms(), max_wait).await?;
        let wait = grant.wait(clock.now_ms());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(grant)
    }

    /// A 429: nothing goes to `model` before its Retry-After (1 s when it named none).
    pub(crate) async fn throttled(&self, model: &str, retry_after: Option<Duration>, now_ms: u64) {
        let wait = retry_after.unwrap_or(Duration::from_secs(1));
        let until = now_ms.saturating_add(wait.as_millis() as u64);
        self.block(model, until, now_ms).await;
    }
}

/// The wait before a job the limit denied comes back, spread so that the instances all denied
/// by one full limit do not come back at once.
pub(crate) fn spread_limit_wait(wait: Duration) -> Duration {
    wait.mul_f64(1.0 + 0.2 * jitter())
}

/// How often a handling that found its key claimed by another worker looks again.
const CLAIM_POLL: Duration = Duration::from_millis(250);

/// Take a claim with `take`, and while another worker holds it (`busy` gives the rest of its
/// lease) look again every [`CLAIM_POLL`] for up to `max_wait`: the holder is usually seconds
/// from done (the same image uploaded twice, two jobs asking for one picture) while its lease
/// runs for minutes. What is still busy after that goes back to the queue.
pub(crate) async fn claim_waiting<T, E, F, Fut>(
    max_wait: Duration,
    busy: impl Fn(&T) -> Option<Duration>,
    mut take: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut waited = Duration::ZERO;
    loop {
        let claim = take().await?;
        match busy(&claim) {
            Some(retry_in) if waited < max_wait => {
                let step = CLAIM_POLL.min(retry_in).max(Duration::from_millis(1));
                tokio::time::sleep(step).await;
                waited += step;
            }
            _ => return Ok(claim),
        }
    }
}

/// What one provider call asks for besides the image.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    model: &'a str,
    detail: Detail,
    prompt: &'a AnalysisPrompt,
}

/// Book a spend, retrying transient store errors in place a few times (the spend id makes a
/// retried booking count once).
pub(crate) async fn book_spend_retrying(
    repo: &dyn Repository,
    tenant: &str,
    image_id: &str,
    spend_id: &str,
    spend: &Spend,
) -> Result<(), StoreError> {
    let mut attempt = 0u32;
    loop {
        match repo.book_spend(tenant, image_id, spend_id, spend).await {
            Err(e) if e.is_transient() && attempt < STORE_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
            }
            other => return other,
        }
    }
}

#[derive(Clone)]
pub struct Analyzer {
    pub blobs: Arc<dyn BlobStore>,
    pub repo: Arc<dyn Repository>,
    pub provider: Arc<dyn VisionProvider>,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub limiters: Limiters,
    /// Prefix of every claim owner this analyzer writes (`{instance}:{handling}`): the local
    /// runtime names its process here, so claims of a process that died can be given back.
    pub instance: String,
    /// Where metric events go (nowhere unless the runtime wires a recorder).
    pub metrics: Arc<dyn crate::metrics::Recorder>,
    /// Where batch-lane jobs are recorded; None: every job is analysed in real time.
    pub batches: Option<Arc<dyn BatchStore>>,
    /// Vectors for done images and near-duplicate skip; None: neither.
    pub search: Option<Arc<crate::search::Search>>,
    /// Generation jobs, told when a generated image's analysis ends; None: not here (the
    /// sweep moves their rows on).
    pub generations: Option<Arc<crate::generation::Generations>>,
}

impl Analyzer {
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        repo: Arc<dyn Repository>,
        provider: Arc<dyn VisionProvider>,
        settings: Arc<Settings>,
        clock: Arc<dyn Clock>,
    ) -> Analyzer {
        // Without a shared limit each instance keeps its share of the global one.
        let limits = Limits::new(settings.rpm, settings.tpm, settings.limit_burst)
            .per_instance(settings.max_concurrency);
        Analyzer {
            blobs,
            repo,
            provider,
            settings,
            clock,
            limiters: Limiters::new(limits),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            metrics: crate::metrics::no_metrics(),
            batches: None,
            search: None,
            generations: None,
        }
    }

    /// Draw from one limit kept in `store` (the settings' global `rpm`/`tpm`), shared with every
    /// process and instance using the same store, instead of this instance's share.
    pub fn with_shared_limit(mut self, store: Arc<dyn RateLimitStore>) -> Analyzer {
        let limits = Limits::new(
            self.settings.rpm,
            self.settings.tpm,
            self.settings.limit_burst,
        );
        self.limiters = Limiters::shared(limits, store, self.provider.name(), self.clock.clone());
        self
    }

    /// Give done images their vectors, and let near-duplicates reuse analyses when the
    /// settings ask for it.
    pub fn with_search(mut self, search: Arc<crate::search::Search>) -> Analyzer {
        self.search = Some(search);
        self
    }

    /// Tell generation jobs when their images' analyses end.
    pub fn with_generations(
        mut self,
        generations: Arc<crate::generation::Generations>,
    ) -> Analyzer {
        self.generations = Some(generations);
        self
    }

    /// Record batch-lane jobs in `store` for the batch lane to submit.
    pub fn with_batches(mut self, store: Arc<dyn BatchStore>) -> Analyzer {
        self.batches = Some(store);
        self
    }

    /// Models tried in order; the offline analyzer has one.
    fn chain(&self) -> Vec<String> {
        if self.provider.is_paid() {
            self.settings.model_chain()
        } else {
            vec![crate::providers::local::LOCAL_MODEL.to_string()]
        }
    }

    /// Handle one message body. Never panics; every error becomes an outcome. The outcome and
    /// the time it took go to the metrics.
    pub async fn handle(&self, body: &str, receive_count: u32) -> AnalyzeOutcome {
        let started = std::time::Instant::now();
        let outcome = self.handle_message(body, receive_count).await;
        crate::metrics::observe_analyze(&*self.metrics, &outcome, started.elapsed());
        outcome
    }

    async fn handle_message(&self, body: &str, receive_count: u32) -> AnalyzeOutcome {
        let job = match AnalysisJob::parse(body) {
            Ok(j) => j,
            Err(e) => {
                // Never dropped: it goes back until the queue's redrive moves it to the DLQ.
                warn!(error = %e, receive_count, "malformed job message; kept for the dead-letter queue");
                return retry_later(receive_count, e.to_string());
            }
        };
        let outcome = match self.handle_job(&job, receive_count).await {
            Ok(o) => o,
            Err(StoreError::NotFound(what)) => {
                let reason = format!("{what} not found");
                self.fail(&job, &reason).await
            }
            Err(e @ StoreError::TooLarge { .. }) => self.fail(&job, &e.to_string()).await,
            // Other storage trouble may be configuration (permissions, a missing table) that
            // an operator fixes: retry, and the DLQ keeps what never heals.
            Err(e) => retry_later(receive_count, e.to_string()),
        };
        let outcome = self.give_up_if_last(&job, receive_count, outcome).await;
        self.keep_off_the_reconciler(&job, receive_count, &outcome)
            .await;
        if matches!(
            outcome,
            AnalyzeOutcome::Done { .. } | AnalyzeOutcome::Cached | AnalyzeOutcome::Reused { .. }
        ) {
            self.index(&job).await;
        }
        if let (Some(generations), Some(_)) = (&self.generations, &job.check) {
            // Its row moves on if the analysis ended (done, or failed: also a last retry);
            // otherwise this is a no-op and the row stays checking.
            generations.settle_or_log(&job.tenant, &job.image_id).await;
        }
        outcome
    }

    /// Give a done image its vectors. Never fails the analysis: an error is logged, and
    /// `sightline reindex` embeds what is missing.
    async fn index(&self, job: &AnalysisJob) {
        if let Some(search) = &self.search {
            search.index_or_log(&job.tenant, &job.image_id).await;
        }
    }

    /// With near-duplicate skip on for the tenant: store the analysis of an image this one is
    /// a near-copy of, at $0. None when there is none (or the skip is off).
    async fn reuse_near_duplicate(
        &self,
        job: &AnalysisJob,
        record: &ImageRecord,
        fetched: &mut Option<Arc<Vec<u8>>>,
    ) -> Result<Option<AnalyzeOutcome>, StoreError> {
        let Some(search) = &self.search else {
            return Ok(None);
        };
        if self.settings.dedupe_for(&job.tenant) != crate::settings::Dedupe::Near {
            return Ok(None);
        }
        if job.check.is_some() {
            // A generated image is checked against its own prompt: another image's analysis
            // cannot answer that.
            return Ok(None);
        }
        let Some(model) = self.chain().into_iter().next() else {
            return Ok(None);
        };
        let jpeg = match self.fetch_verified(job).await {
            Ok(j) => fetched.insert(Arc::new(j)).clone(),
            Err(Fetched::Store(e)) => return Err(e),
            // The analysis path reports the mismatch.
            Err(Fetched::Mismatch(_)) => return Ok(None),
        };
        let near = match search
            .near_duplicate(&job.tenant, &job.image_id, &jpeg, &model)
            .await
        {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(None),
            Err(e) => {
                warn!(error = %e, image_id = %job.image_id, "near-duplicate lookup failed; analysing");
                return Ok(None);
            }
        };
        let detail = job
            .detail
            .unwrap_or_else(|| self.settings.detail_for(&job.tenant, record.detail));
        let answer = self.settings.answer_params_for(&model, detail);
        let key = idempotency_key(
            self.settings.cache_scope(&job.tenant),
            &job.sha256,
            &model,
            &answer,
        );
        let spared = if self.provider.is_paid() {
            record.estimate.as_ref().map(|e| e.cost_usd).unwrap_or(0.0)
        } else {
            0.0
        };
        let result = AnalysisResult {
            usage: Default::default(),
            cost_usd: 0.0,
            cached: false,
            calls: 0,
            usage_estimated: false,
            cost_at_estimate_usd: 0.0,
            lane: Lane::Realtime,
            batch_id: None,
            saved_usd: spared,
            reused_from: Some(near.image_id.clone()),
            idempotency_key: key,
            completed_at: rfc3339(self.clock.now_ms()),
            ..near.result
        };
        info!(image_id = %job.image_id, reused_from = %near.image_id, distance = near.distance, "near-duplicate: analysis reused");
        Ok(Some(
            match self
                .repo
                .complete(&job.tenant, &job.image_id, &result, 0.0)
                .await?
            {
                Completion::Stored => AnalyzeOutcome::Reused {
                    from: near.image_id,
                },
                Completion::AlreadyDone => AnalyzeOutcome::AlreadyDone,
            },
        ))
    }

    /// A job that goes back to the queue is alive: move its image's recheck past the retry, so
    /// the reconciler does not send a second copy of a job that is only waiting.
    async fn keep_off_the_reconciler(
        &self,
        job: &AnalysisJob,
        receive_count: u32,
        outcome: &AnalyzeOutcome,
    ) {
        let AnalyzeOutcome::Retry { delay, .. } = outcome else {
            return;
        };
        let max = self.settings.max_receives;
        if max > 0 && receive_count >= max && !outcome.is_budget_wait() {
            return; // marked failed: no recheck any more
        }
        let at = self.clock.now_ms() + (*delay + self.settings.stuck_after).as_millis() as u64;
        if let Err(e) = self
            .repo
            .set_recheck(&job.tenant, &job.image_id, Some(at))
            .await
        {
            debug!(error = %e, image_id = %job.image_id, "could not move the recheck on");
        }
    }

    /// On the last delivery before the dead-letter queue, a retry also marks the image failed,
    /// so nobody waits on an image stuck as `queued`. The message still goes to the DLQ, and a
    /// redrive from there can still complete the image.
    async fn give_up_if_last(
        &self,
        job: &AnalysisJob,
        receive_count: u32,
        outcome: AnalyzeOutcome,
    ) -> AnalyzeOutcome {
        let max = self.settings.max_receives;
        if outcome.is_budget_wait() {
            // Waiting for money is not failing: the image stays queued. If the queue
            // dead-letters the job meanwhile, the reconciler sends it again at its recheck.
            return outcome;
        }
        if let AnalyzeOutcome::Retry { reason, .. } = &outcome {
            if max > 0 && receive_count >= max {
                let why = format!("gave up after {receive_count} deliveries: {reason}");
                let now = rfc3339(self.clock.now_ms());
                if let Err(e) = self
                    .repo
                    .mark_failed(&job.tenant, &job.image_id, &why, Failure::GaveUp, &now)
                    .await
                {
                    warn!(error = %e, image_id = %job.image_id, "could not record giving up");
                }
            }
        }
        outcome
    }

    async fn fail(&self, job: &AnalysisJob, reason: &str) -> AnalyzeOutcome {
        let now = rfc3339(self.clock.now_ms());
        if let Err(e) = self
            .repo
            .mark_failed(&job.tenant, &job.image_id, reason, Failure::Permanent, &now)
            .await
        {
            warn!(error = %e, image_id = %job.image_id, "could not record failure");
            return AnalyzeOutcome::Retry {
                delay: Duration::from_secs(5),
                reason: format!("recording failure: {e}"),
            };
        }
        AnalyzeOutcome::Failed(reason.to_string())
    }

    async fn handle_job(
        &self,
        job: &AnalysisJob,
        receive_count: u32,
    ) -> Result<AnalyzeOutcome, StoreError> {
        let Some(record) = self.repo.get_image(&job.tenant, &job.image_id).await? else {
            // A job for an image nobody recorded is a producer bug: keep it for the DLQ.
            let reason = format!("image {}/{} has no record", job.tenant, job.image_id);
            return Ok(retry_later(receive_count, reason));
        };
        if record.result.is_some() {
            return Ok(AnalyzeOutcome::AlreadyDone);
        }
        if record.status == ImageStatus::Failed && record.permanent_failure {
            // A duplicate of a job that failed for good: calling again would pay again.
            let reason = record.error.unwrap_or_default();
            return Ok(AnalyzeOutcome::Failed(reason));
        }
        if record.sha256.as_deref().is_some_and(|s| s != job.sha256) {
            let reason = format!(
                "job for {}/{} names content the image no longer has",
                job.tenant, job.image_id
            );
            warn!(image_id = %job.image_id, "{reason}; deleting the job");
            return Ok(AnalyzeOutcome::Stale(reason));
        }
        // The resized JPEG, read once: near-duplicate skip reads it first when it runs, and
        // the analysis below uses the same bytes.
        let mut jpeg: Option<Arc<Vec<u8>>> = None;
        if let Some(outcome) = self.reuse_near_duplicate(job, &record, &mut jpeg).await? {
            return Ok(outcome);
        }
        if job.lane == Some(Lane::Batch) && job.check.is_none() {
            match &self.batches {
                // The offline analyzer costs nothing: no batch to wait for.
                Some(store) if self.provider.is_paid() => {
                    return self.record_for_batch(job, &record, store.as_ref()).await
                }
                _ => debug!(image_id = %job.image_id, "no batch lane here; analysed in real time"),
            }
        }
        let estimated_cost = if self.provider.is_paid() {
            record.estimate.as_ref().map(|e| e.cost_usd).unwrap_or(0.0)
        } else {
            0.0
        };
        // One owner per handling: two copies of one job (or two images with the same bytes)
        // must never both hold the claim on a key.
        let owner = format!("{}:{}", self.instance, uuid::Uuid::new_v4().simple());
        // The detail decided when the job was recorded (what its estimate assumed).
        let detail = job
            .detail
            .unwrap_or_else(|| self.settings.detail_for(&job.tenant, record.detail));
        let chain = self.chain();
        let scope = self.settings.cache_scope(&job.tenant);
        let prompt = self.settings.analysis_prompt(job.check.as_ref());
        let mut last_retry: Option<(Duration, String)> = None;
        for (i, model) in chain.iter().enumerate() {
            // The key names the model that answers, so a fallback's answer is never served
            // later as the primary model's.
            let answer = self
                .settings
                .answer_params_with(model, detail, &prompt.version);
            let key = idempotency_key(scope, &job.sha256, model, &answer);
            let claim = claim_waiting(
                self.settings.max_inline_wait,
                |c| match c {
                    Claim::Busy { retry_in } => Some(*retry_in),
                    _ => None,
                },
                || {
                    let now = self.clock.now_ms();
                    self.repo
                        .claim(&key, &owner, self.settings.claim_lease, now)
                },
            )
            .await?;
            match claim {
                Claim::Cached(prev) => return self.store_cached(job, *prev).await,
                Claim::Busy { retry_in } => {
                    return Ok(AnalyzeOutcome::Retry {
                        delay: retry_in.max(Duration::from_secs(1)),
                        reason: "the same image is being analysed by another worker".into(),
                    })
                }
                Claim::Acquired => {}
            }
            let image = match &jpeg {
                Some(j) => j.clone(),
                None => match self.fetch_verified(job).await {
                    Ok(bytes) => jpeg.insert(Arc::new(bytes)).clone(),
                    Err(e) => {
                        self.release(&key, &owner).await;
                        return match e {
                            Fetched::Store(e) => Err(e),
                            Fetched::Mismatch(reason) => {
                                warn!(image_id = %job.image_id, "{reason}");
                                Ok(retry_later(receive_count, reason))
                            }
                        };
                    }
                },
            };
            let hold = match self
                .reserve_budget(
                    job,
                    Target {
                        model,
                        detail,
                        prompt: &prompt,
                    },
                    estimated_cost,
                )
                .await
            {
                Ok(Budgeted::Go(hold)) => hold,
                Ok(Budgeted::Over {
                    period,
                    retry_at_ms,
                }) => {
                    self.release(&key, &owner).await;
                    return Ok(self.over_budget(job, period, retry_at_ms).await);
                }
                Err(e) => {
                    self.release(&key, &owner).await;
                    return Err(e);
                }
            };
            let (step, wasted) = self
                .try_model(
                    job,
                    Target {
                        model,
                        detail,
                        prompt: &prompt,
                    },
                    &key,
                    image,
                    i + 1 < chain.len(),
                    receive_count,
                )
                .await;
            // Every call made with this model, answer or not, for the token and cost metrics.
            let spent = match &step {
                Step::Answered(r) => Some((r.usage, r.cost_usd)),
                _ => (wasted.calls > 0).then_some((wasted.usage, wasted.cost_usd)),
            };
            if let Some((usage, cost)) = spent {
                crate::metrics::observe_spend(&*self.metrics, model, &usage, cost);
            }
            if !matches!(step, Step::Answered(_)) && wasted.calls > 0 {
                // Invalid answers that ended in no result were still paid for.
                self.book(
                    job,
                    &format!("{owner}:{model}"),
                    &wasted.spend(day_of(&rfc3339(self.clock.now_ms())), model),
                )
                .await;
            }
            if !matches!(step, Step::Answered(_)) {
                self.settle_budget(job, hold.as_ref()).await;
            }
            match step {
                // The provider answered and was paid: the claim stays ours until the result
                // is stored, so no retry can call it again while the lease lasts.
                Step::Answered(result) => {
                    let stored = self
                        .store_result(job, &result, estimated_cost, &owner)
                        .await;
                    // Settled after the booking: until then the hold still counts. An answer
                    // that could not be booked keeps its hold until the lease ends.
                    if stored.is_ok() {
                        self.settle_budget(job, hold.as_ref()).await;
                    }
                    return stored;
                }
                Step::Fallback { delay, reason } => {
                    self.release(&key, &owner).await;
                    let switch = crate::metrics::Metric::FallbackSwitches;
                    self.metrics.record(switch, Some(model), 1.0);
                    last_retry = Some((delay, reason));
                }
                Step::Fail(reason) => {
                    self.release(&key, &owner).await;
                    return Ok(self.fail(job, &reason).await);
                }
                Step::Retry { delay, reason } => {
                    self.release(&key, &owner).await;
                    return Ok(AnalyzeOutcome::Retry { delay, reason });
                }
            }
        }
        let (delay, reason) =
            last_retry.unwrap_or((Duration::from_secs(5), "no model available".into()));
        Ok(AnalyzeOutcome::Retry { delay, reason })
    }

    /// A batch-lane job: its image waits for the batch request of its key (the primary model's
    /// cache key), unless that key is answered already. Its recheck moves past the batch
    /// window, so the reconciler only re-sends the job of an image nothing answered.
    async fn record_for_batch(
        &self,
        job: &AnalysisJob,
        record: &sightline_core::model::ImageRecord,
        store: &dyn BatchStore,
    ) -> Result<AnalyzeOutcome, StoreError> {
        let detail = job
            .detail
            .unwrap_or_else(|| self.settings.detail_for(&job.tenant, record.detail));
        let now = self.clock.now_ms();
        let bytes = record.resized.map_or(0, |r| r.bytes);
        let item = crate::batch::item_for(
            &self.settings,
            self.provider.name(),
            job,
            detail,
            bytes,
            now,
        );
        let waiter = BatchWaiter {
            tenant: job.tenant.clone(),
            image_id: job.image_id.clone(),
        };
        match store.enqueue_batch(&item, &waiter).await? {
            Enqueued::Cached(prev) => self.store_cached(job, *prev).await,
            Enqueued::Created | Enqueued::Joined | Enqueued::AlreadyWaiting => {
                let at = now + (BATCH_WINDOW + self.settings.stuck_after).as_millis() as u64;
                self.repo
                    .set_recheck(&job.tenant, &job.image_id, Some(at))
                    .await?;
                debug!(image_id = %job.image_id, custom_id = %item.custom_id, "recorded for the batch lane");
                Ok(AnalyzeOutcome::Batched)
            }
        }
    }

    /// The resized JPEG of a job, checked against the job's sha256: what is analysed (and
    /// cached under that hash) is exactly the content the job was made for.
    async fn fetch_verified(&self, job: &AnalysisJob) -> Result<Vec<u8>, Fetched> {
        let bytes = self
            .blobs
            .get(&job.resized_key, self.settings.prepare.max_input_bytes)
            .await
            .map_err(Fetched::Store)?;
        let got = hex::encode(Sha256::digest(&bytes));
        if got != job.sha256 {
            return Err(Fetched::Mismatch(format!(
                "{} holds content with sha256 {got}, not the job's {}",
                job.resized_key, job.sha256
            )));
        }
        Ok(bytes)
    }

    /// Book money that left no result; a failure to book is logged, never fatal to the job.
    async fn book(&self, job: &AnalysisJob, spend_id: &str, spend: &Spend) {
        if let Err(e) = book_spend_retrying(
            self.repo.as_ref(),
            &job.tenant,
            &job.image_id,
            spend_id,
            spend,
        )
        .await
        {
            warn!(error = %e, image_id = %job.image_id, cost_usd = spend.cost_usd, "could not book a paid call that left no result");
        }
    }

    async fn caps_for(&self, tenant: &str) -> Result<BudgetCaps, StoreError> {
        caps_for(self.repo.as_ref(), &self.settings, tenant).await
    }

    /// Hold one call's estimate of `model` against the tenant's caps. Only paid providers
    /// hold anything, and only for a capped tenant. The hold lasts as long as the claim's
    /// lease: a process that dies mid-call frees it when the lease would end anyway.
    async fn reserve_budget(
        &self,
        job: &AnalysisJob,
        target: Target<'_>,
        record_estimate: f64,
    ) -> Result<Budgeted, StoreError> {
        let Target {
            model,
            detail,
            prompt,
        } = target;
        if !self.provider.is_paid() {
            return Ok(Budgeted::Go(None));
        }
        let caps = self.caps_for(&job.tenant).await?;
        if !caps.is_capped() {
            return Ok(Budgeted::Go(None));
        }
        let amount = PriceTable::builtin()
            .estimate(
                model,
                job.width,
                job.height,
                &self.settings.estimate_params_with(detail, prompt),
            )
            .map(|e| e.cost_usd)
            .unwrap_or(record_estimate);
        let now = self.clock.now_ms();
        let periods = Periods::at(now);
        let expires = now + self.settings.claim_lease.as_millis() as u64;
        match self
            .repo
            .reserve_budget(&job.tenant, &periods, amount, &caps, now, expires)
            .await?
        {
            BudgetHold::Reserved(id) => Ok(Budgeted::Go(Some((periods, id)))),
            BudgetHold::Over(period) => Ok(Budgeted::Over {
                period,
                retry_at_ms: budget::retry_at_ms(&periods, period),
            }),
        }
    }

    /// End a hold once its money is booked; a failure leaves it to expire with the lease.
    async fn settle_budget(&self, job: &AnalysisJob, hold: Option<&(Periods, String)>) {
        let Some((periods, id)) = hold else { return };
        if let Err(e) = self.repo.settle_budget(&job.tenant, periods, id).await {
            debug!(error = %e, "could not settle a budget hold (it expires with the lease)");
        }
    }

    /// A job refused by its tenant's budget: back to the queue until the period rolls over
    /// (the queue caps the delay; it then simply checks again), or failed for good.
    async fn over_budget(
        &self,
        job: &AnalysisJob,
        period: Period,
        retry_at_ms: u64,
    ) -> AnalyzeOutcome {
        let which = match period {
            Period::Day => "daily",
            Period::Month => "monthly",
        };
        match self.settings.over_budget {
            OverBudget::Fail => {
                info!(tenant = %job.tenant, image_id = %job.image_id, "{which} budget exceeded; failing the image");
                self.fail(job, BUDGET_EXCEEDED).await
            }
            OverBudget::Wait => {
                let (delay, reason) = budget_wait(period, retry_at_ms, self.clock.now_ms());
                info!(tenant = %job.tenant, image_id = %job.image_id, wait_s = delay.as_secs(), "{which} budget exceeded; waiting for the next period");
                AnalyzeOutcome::Retry { delay, reason }
            }
        }
    }

    /// Give a claim back so the next attempt can take it at once (the lease covers failures).
    async fn release(&self, key: &str, owner: &str) {
        if let Err(e) = self.repo.release_claim(key, owner).await {
            debug!(error = %e, "could not release claim (lease will expire)");
        }
    }

    async fn store_cached(
        &self,
        job: &AnalysisJob,
        prev: AnalysisResult,
    ) -> Result<AnalyzeOutcome, StoreError> {
        let result = AnalysisResult {
            usage: Default::default(),
            cost_usd: 0.0,
            cached: true,
            calls: 0,
            usage_estimated: false,
            cost_at_estimate_usd: 0.0,
            lane: job.lane.unwrap_or_default(),
            batch_id: None,
            saved_usd: 0.0,
            reused_from: None,
            completed_at: rfc3339(self.clock.now_ms()),
            ..prev
        };
        Ok(
            match self
                .repo
                .complete(&job.tenant, &job.image_id, &result, 0.0)
                .await?
            {
                Completion::Stored => AnalyzeOutcome::Cached,
                Completion::AlreadyDone => AnalyzeOutcome::AlreadyDone,
            },
        )
    }

    /// Write a paid answer. Transient write errors are retried here, in place: handing the
    /// message back would mean paying the provider again once the claim's lease ends. When
    /// the image got its result from another handling meanwhile, this answer's money is still
    /// booked (it was paid) and the claim is given back.
    async fn store_result(
        &self,
        job: &AnalysisJob,
        result: &AnalysisResult,
        estimated_cost: f64,
        owner: &str,
    ) -> Result<AnalyzeOutcome, StoreError> {
        let mut attempt = 0u32;
        loop {
            match self
                .repo
                .complete(&job.tenant, &job.image_id, result, estimated_cost)
                .await
            {
                Ok(Completion::Stored) => {
                    return Ok(AnalyzeOutcome::Done {
                        model: result.model.clone(),
                        cost_usd: result.cost_usd,
                    })
                }
                Ok(Completion::AlreadyDone) => {
                    let spend = Spend::of_result(result);
                    warn!(image_id = %job.image_id, cost_usd = result.cost_usd, "answer arrived for an image that already has a result; booked and cached, not stored on the image");
                    self.book(job, &format!("{owner}:{}:late", result.model), &spend)
                        .await;
                    // The answer is good for its key: cache it (which ends our claim), so the
                    // same bytes are never paid for again; else at least free the claim.
                    if let Err(e) = self.repo.cache_result(result).await {
                        debug!(error = %e, "could not cache a late answer");
                        self.release(&result.idempotency_key, owner).await;
                    }
                    return Ok(AnalyzeOutcome::AlreadyDone);
                }
                Err(e) if e.is_transient() && attempt < STORE_RETRIES => {
                    attempt += 1;
                    let wait = Duration::from_millis(200 * 2u64.pow(attempt));
                    warn!(error = %e, attempt, "storing the result failed; retrying in place");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One model of the chain: reserve, call (retrying invalid output once), classify. Also
    /// returns what was paid for calls that did not become the answer (invalid answers).
    async fn try_model(
        &self,
        job: &AnalysisJob,
        target: Target<'_>,
        key: &str,
        jpeg: Arc<Vec<u8>>,
        has_fallback: bool,
        receive_count: u32,
    ) -> (Step, Paid) {
        let Target {
            model,
            detail,
            prompt,
        } = target;
        let table = PriceTable::builtin();
        let params = self.settings.estimate_params_with(detail, prompt);
        let paid_provider = self.provider.is_paid();
        let request = VisionRequest {
            model: model.to_string(),
            jpeg,
            width: job.width,
            height: job.height,
            prompt: prompt.text.clone(),
            max_output_tokens: self.settings.max_output_tokens,
            detail,
            check: job.check.clone(),
        };
        // What one call is expected to cost: booked when a paid answer's usage is unreadable.
        let estimate = table.estimate(model, job.width, job.height, &params).ok();
        // Reserve image + prompt + max output tokens and one request.
        let reserve_tokens = if paid_provider {
            table
                .model(model)
                .map(|m| m.image_tokens(job.width, job.height, params.detail))
                .unwrap_or(0)
                + params.prompt_tokens
                + u64::from(self.settings.max_output_tokens)
        } else {
            0
        };
        let mut wasted = Paid::default();
        let reservation = match self.reserve(model, reserve_tokens).await {
            Ok(r) => r,
            Err(Denied::Wait(d)) if has_fallback => {
                info!(
                    model,
                    wait_ms = d.as_millis() as u64,
                    "limiter full; trying fallback model"
                );
                let step = Step::Fallback {
                    delay: d,
                    reason: format!("rate limit for {model}"),
                };
                return (step, wasted);
            }
            Err(Denied::Wait(d)) => {
                let spread = spread_limit_wait(d);
                let which = if self.limiters.is_shared() {
                    "shared"
                } else {
                    "local"
                };
                let step = Step::Retry {
                    delay: spread,
                    reason: format!("{which} rate limit for {model}"),
                };
                return (step, wasted);
            }
        };
        // The price of a reported usage: the model that answered (providers report dated
        // variants), else the model asked for; never $0 for a paid answer.
        let price = |answered: &str, usage: &Usage| {
            if !paid_provider {
                return 0.0;
            }
            table
                .model(answered)
                .or_else(|_| table.model(model))
                .map(|p| p.cost_usd(usage))
                .unwrap_or(0.0)
        };
        let mut attempt = self.provider.analyze(&request).await;
        self.finish(model, reservation, &attempt).await;
        if let Err(e) = &attempt {
            if e.kind == FailureKind::InvalidOutput {
                // Tokens billed for an invalid answer are real cost.
                self.count_failed_call(&mut wasted, e, model, estimate.as_ref(), &price);
                // One in-place retry for invalid output, then it is permanent.
                let Ok(r2) = self.reserve(model, reserve_tokens).await else {
                    let step = Step::Retry {
                        delay: Duration::from_secs(2),
                        reason: "invalid output; limiter full for the retry".into(),
                    };
                    return (step, wasted);
                };
                attempt = self.provider.analyze(&request).await;
                self.finish(model, r2, &attempt).await;
                if let Err(e2) = &attempt {
                    self.count_failed_call(&mut wasted, e2, model, estimate.as_ref(), &price);
                }
            }
        }
        match attempt {
            Ok(resp) => {
                let mut paid = std::mem::take(&mut wasted);
                match (&resp.usage, &estimate) {
                    (Some(u), _) => paid.add_reported(u, price(&resp.model, u)),
                    (None, Some(est)) if paid_provider => paid.add_estimated(est),
                    (None, _) => paid.add_reported(&Usage::default(), 0.0),
                }
                let result = AnalysisResult {
                    provider: self.provider.name().to_string(),
                    model: model.to_string(),
                    analysis: resp.analysis,
                    usage: paid.usage,
                    cost_usd: paid.cost_usd,
                    cached: false,
                    calls: u32::try_from(paid.calls).unwrap_or(u32::MAX),
                    usage_estimated: paid.calls_at_estimate > 0,
                    cost_at_estimate_usd: paid.cost_at_estimate_usd,
                    lane: Lane::Realtime,
                    batch_id: None,
                    saved_usd: 0.0,
                    reused_from: None,
                    idempotency_key: key.to_string(),
                    prompt_version: prompt.version.clone(),
                    price_version: table.version().to_string(),
                    completed_at: rfc3339(self.clock.now_ms()),
                };
                (Step::Answered(Box::new(result)), Paid::default())
            }
            Err(e) => {
                let step = match classify(&e.kind) {
                    RetryClass::Permanent => Step::Fail(format!("{model}: {}", e.message)),
                    RetryClass::Transient => {
                        let delay = retry_delay(&e.kind, receive_count, jitter());
                        let long_wait = matches!(
                            e.kind,
                            FailureKind::Http { retry_after: Some(d), .. } if d >= self.settings.fallback_after
                        );
                        if has_fallback
                            && (long_wait
                                || !matches!(e.kind, FailureKind::Http { status: 429, .. }))
                        {
                            info!(model, error = %e.message, "switching to fallback model");
                            Step::Fallback {
                                delay,
                                reason: e.message,
                            }
                        } else {
                            Step::Retry {
                                delay,
                                reason: format!("{model}: {}", e.message),
                            }
                        }
                    }
                };
                (step, wasted)
            }
        }
    }

    /// Add a failed call's cost when the provider billed it: its reported usage, else (an
    /// answer cut off or unreadable) its estimate.
    fn count_failed_call(
        &self,
        paid: &mut Paid,
        e: &ProviderError,
        model: &str,
        estimate: Option<&Estimate>,
        price: &dyn Fn(&str, &Usage) -> f64,
    ) {
        if !self.provider.is_paid() {
            return;
        }
        match (&e.usage, estimate) {
            (Some(u), _) => paid.add_reported(u, price(model, u)),
            (None, Some(est)) if e.billed => paid.add_estimated(est),
            _ => {}
        }
    }

    /// Take a slot of the model's limit and wait for it, when it is at most `max_inline_wait`
    /// away. The offline analyzer calls nobody: no limit (None).
    async fn reserve(&self, model: &str, tokens: u64) -> Result<Option<Grant>, Denied> {
        if !self.provider.is_paid() {
            return Ok(None);
        }
        let grant = self
            .limiters
            .wait_for_slot(model, tokens, self.settings.max_inline_wait, &*self.clock)
            .await?;
        Ok(Some(grant))
    }

    /// Tell the limit what the call showed: the tokens the provider counted, its headers, and
    /// a 429's Retry-After (which holds the model's limit for everyone sharing it).
    async fn finish(
        &self,
        model: &str,
        grant: Option<Grant>,
        attempt: &Result<crate::ports::VisionResponse, ProviderError>,
    ) {
        let Some(grant) = grant else {
            return;
        };
        let now = self.clock.now_ms();
        // A token limit counts the input and the whole `max_tokens` asked for (OpenAI: "usage
        // needs are estimated from" it), not the output produced. Unknown usage: the
        // reservation stands (a failed request counts too).
        let max_output = u64::from(self.settings.max_output_tokens);
        let counted = |u: &Usage| u.input_tokens + u.output_tokens.max(max_output);
        match attempt {
            Ok(resp) => {
                let used = resp.usage.as_ref().map(counted);
                self.limiters.learn(model, grant, used, &resp.rate, now);
            }
            Err(e) => {
                let used = e.usage.as_ref().map(counted);
                self.limiters.learn(model, grant, used, &e.rate, now);
                if let FailureKind::Http {
                    status: 429,
                    retry_after,
                } = &e.kind
                {
                    let throttled = crate::metrics::Metric::ProviderThrottles;
                    self.metrics.record(throttled, Some(model), 1.0);
                    self.limiters.throttled(model, *retry_after, now).await;
                }
            }
        }
    }
}

/// Why a job's resized JPEG could not be used.
enum Fetched {
    Store(StoreError),
    /// The object is not the content the job names.
    Mismatch(String),
}

/// Back to the queue after exponential backoff with jitter (no provider delay to follow).
fn retry_later(receive_count: u32, reason: String) -> AnalyzeOutcome {
    AnalyzeOutcome::Retry {
        delay: retry_delay(&FailureKind::Connection, receive_count, jitter()),
        reason,
    }
}

/// Uniform [0, 1) for backoff jitter.
fn jitter() -> f64 {
    rand::random::<f64>()
}
