//! Use-case: generation jobs. A job's rows go on the generation queue; each message makes one
//! image (rate-limited, retried, with fallback models, paid once per idempotency key and
//! tenant), stores it where the job delivers it and as an upload, and the upload is resized
//! and analysed like any other, with a prompt that also checks it against its request. When
//! an image's analysis ends, its row moves on: done, regenerated once (a setting), mismatch
//! or failed; when every row is final the job finishes and its webhook is recorded for
//! delivery ([`crate::delivery`]).
//!
//! Money: each paid generation call is booked on the ledger once (kind `generation`, spend id
//! per call), whatever happens after; analyses book themselves as usual. A rerun of the same
//! rows finds every image by its key and pays nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sightline_core::budget::{self, Period, Periods};
use sightline_core::generate::{plan_job, GenerationRequest, Limits, RowsInput, TemplateSet};
use sightline_core::genjob::{
    CheckSpec, CheckVerdict, GenerationLink, JobStatus, RowCounts, RowStatus, EVENT_JOB_FINISHED,
    EVENT_ROW_FINISHED,
};
use sightline_core::keys::upload_key;
use sightline_core::limiter::{Denied, Grant, Limits as RateLimits};
use sightline_core::model::{ImageRecord, ImageStatus, Lane};
use sightline_core::pricing::PriceTable;
use sightline_core::retry::{classify, retry_delay, FailureKind, RetryClass};
use tracing::{debug, info, warn};

use crate::analyze::{
    budget_wait, caps_for, claim_waiting, spread_limit_wait, Limiters, BUDGET_EXCEEDED, BUDGET_WAIT,
};
use crate::ingest::Ingest;
use crate::metrics::{no_metrics, observe_spend, Recorder};
use crate::ports::{
    day_of, rfc3339, BlobStore, BudgetHold, Clock, GenClaim, GeneratedImage, GeneratedObject,
    GenerationCall, GenerationJob, GenerationRow, GenerationStore, ImageGenerator, LedgerKind,
    ProviderError, Queue, Repository, Spend, StoreError, StoreResult, WebhookDelivery,
    WebhookSecrets,
};
use crate::providers::gen_common::content_type;
use crate::providers::select::{build_generator, ProviderKeys};
use crate::settings::OverBudget;
use crate::settings::Settings;
use crate::webhook_url::{validate_webhook_url, Mode, Resolve, UrlError};

/// Blob prefix of the images a job delivers: `generated/{tenant}/{job_id}/{output key}`.
pub const GENERATED_PREFIX: &str = "generated/";
/// Blob prefix of generated images by idempotency key (what reruns reuse).
pub const GENERATION_CACHE_PREFIX: &str = "gen-cache/";
/// Rows in a webhook summary; a bigger job's receiver reads the rest from the API.
pub const MAX_SUMMARY_ROWS: usize = 1000;

/// The queue message of one row's attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationMessage {
    pub v: u32,
    pub tenant: String,
    pub job_id: String,
    pub row: u32,
    pub attempt: u32,
}

impl GenerationMessage {
    pub const VERSION: u32 = 1;
    /// What tells a generation message from an analysis job on a shared reading path.
    pub const KIND: &'static str = "generation";

    pub fn body(&self) -> StoreResult<String> {
        serde_json::to_string(self)
            .map_err(|e| StoreError::Permanent(format!("generation message: {e}")))
    }

    pub fn parse(body: &str) -> Result<GenerationMessage, String> {
        let m: GenerationMessage =
            serde_json::from_str(body).map_err(|e| format!("malformed generation message: {e}"))?;
        if m.v != Self::VERSION {
            return Err(format!("unsupported generation message version {}", m.v));
        }
        if m.job_id.is_empty() || m.tenant.is_empty() || m.row == 0 || m.attempt == 0 {
            return Err("generation message lacks a tenant, job, row or attempt".into());
        }
        Ok(m)
    }
}

/// What to do with a generation message after handling it.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateOutcome {
    /// Generated now and handed to the analysis.
    Generated { model: String, cost_usd: f64 },
    /// The same request was generated before: its image is reused at $0.
    Reused,
    /// Duplicate delivery: the row has moved on.
    AlreadyDone,
    /// The row failed for good (recorded on it).
    Failed(String),
    /// Transient: make the message visible again after `delay`.
    Retry { delay: Duration, reason: String },
}

/// Why a job is refused before anything is stored or paid.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("row {row}: image model {model:?} has no price in the price table, so it cannot be generated or costed")]
    UnknownModel { row: usize, model: String },
    #[error("webhook URL refused: {0}")]
    Webhook(#[from] UrlError),
    #[error("tenant {0} has no webhook secret (webhook_secret / tenant_webhook_secret): a webhook could not be signed")]
    NoWebhookSecret(String),
    #[error("a job needs at least one row")]
    Empty,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job to start.
#[derive(Debug, Clone)]
pub struct Submission {
    pub tenant: String,
    pub template: String,
    pub requests: Vec<GenerationRequest>,
    pub webhook_url: Option<String>,
    /// Also a webhook per row once it is final.
    pub webhook_rows: bool,
    /// None: the `regenerate_on_mismatch` setting.
    pub regenerate: Option<bool>,
    pub source: String,
    /// None: a new random id. A caller that may submit the same job twice (an S3 drop
    /// delivered again) names it, and checks first that it does not exist.
    pub job_id: Option<String>,
}

/// Image generators by model, built on first use (rows may name other models).
pub type BuildGenerator =
    dyn Fn(&str) -> Result<Arc<dyn ImageGenerator>, String> + Send + Sync + 'static;

pub struct Generators {
    build: Box<BuildGenerator>,
    built: Mutex<HashMap<String, Arc<dyn ImageGenerator>>>,
}

impl Generators {
    pub fn new(build: Box<BuildGenerator>) -> Generators {
        Generators {
            build,
            built: Mutex::new(HashMap::new()),
        }
    }

    /// The generators the settings and keys give (`build_generator` per model, on first use).
    pub fn for_settings(settings: Arc<Settings>, keys: ProviderKeys) -> Generators {
        Generators::new(Box::new(move |model: &str| {
            build_generator(&settings, &keys, PriceTable::builtin(), model)
                .map_err(|e| e.to_string())
        }))
    }

    fn get(&self, model: &str) -> Result<Arc<dyn ImageGenerator>, String> {
        let mut built = match self.built.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(g) = built.get(model) {
            return Ok(g.clone());
        }
        let g = (self.build)(model)?;
        built.insert(model.to_string(), g.clone());
        Ok(g)
    }
}

#[derive(Clone)]
pub struct Generations {
    pub store: Arc<dyn GenerationStore>,
    pub repo: Arc<dyn Repository>,
    pub blobs: Arc<dyn BlobStore>,
    /// The generation queue.
    pub queue: Arc<dyn Queue>,
    pub generators: Arc<Generators>,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    /// Where webhook URLs are checked (loopback receivers only locally).
    pub mode: Mode,
    pub resolver: Arc<dyn Resolve>,
    /// Local: ingest a stored image at once. On AWS the upload's S3 event does it.
    pub ingest: Option<Ingest>,
    /// The tenants' webhook signing secrets (the settings by default; SSM on AWS).
    pub secrets: Arc<dyn WebhookSecrets>,
    /// Where named templates are read from (`templates_file` by default; the bucket on AWS).
    pub templates: TemplatesSource,
    pub metrics: Arc<dyn Recorder>,
    /// The image models' limits (`generation_ipm`), kept like the analysis lane's: this
    /// instance's share, takes scheduled to a slot and waited for in place.
    limiters: Limiters,
    instance: String,
}

/// The image id of a row's attempt: one image per attempt, so a regeneration is analysed
/// (and checked) as a new image.
pub fn image_id_of(job_id: &str, row: u32, attempt: u32) -> String {
    format!("{job_id}-r{row}-a{attempt}")
}

fn extension_of_type(content_type: &str) -> &'static str {
    match content_type {
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        _ => "png",
    }
}

impl Generations {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn GenerationStore>,
        repo: Arc<dyn Repository>,
        blobs: Arc<dyn BlobStore>,
        queue: Arc<dyn Queue>,
        generators: Arc<Generators>,
        settings: Arc<Settings>,
        clock: Arc<dyn Clock>,
        mode: Mode,
        resolver: Arc<dyn Resolve>,
    ) -> Generations {
        Generations {
            store,
            repo,
            blobs,
            queue,
            generators,
            settings: settings.clone(),
            clock,
            mode,
            resolver,
            ingest: None,
            secrets: settings.clone(),
            templates: settings
                .templates_file
                .clone()
                .map_or(TemplatesSource::None, TemplatesSource::File),
            metrics: no_metrics(),
            limiters: Limiters::new(
                RateLimits::new(settings.generation_ipm, 0, settings.limit_burst)
                    .per_instance(settings.max_concurrency),
            ),
            instance: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// Ingest stored images in this process (local runtime).
    pub fn with_ingest(mut self, ingest: Ingest) -> Generations {
        self.ingest = Some(ingest);
        self
    }

    /// Sign webhooks with secrets from `secrets` (SSM on AWS).
    pub fn with_secrets(mut self, secrets: Arc<dyn WebhookSecrets>) -> Generations {
        self.secrets = secrets;
        self
    }

    /// Prefix every claim owner with `instance` (the local runtime names its process, so the
    /// claims of a process that died can be given back).
    pub fn with_instance(mut self, instance: &str) -> Generations {
        self.instance = instance.to_string();
        self
    }

    /// Read named templates from `templates`.
    pub fn with_templates(mut self, templates: TemplatesSource) -> Generations {
        self.templates = templates;
        self
    }

    /// The longest one message may take (see [`Settings::generation_worst_case`]).
    pub fn worst_case(&self) -> Duration {
        self.settings.generation_worst_case()
    }

    // --- submit ---------------------------------------------------------------------------

    /// Check a planned job (models priced, webhook URL safe and signable), store it with its
    /// rows, and queue one message per row. Nothing is paid for a refused job.
    pub async fn submit(&self, sub: Submission) -> Result<GenerationJob, SubmitError> {
        if sub.requests.is_empty() {
            return Err(SubmitError::Empty);
        }
        let table = PriceTable::builtin();
        for req in &sub.requests {
            if table.image_model(&req.model).is_err() {
                return Err(SubmitError::UnknownModel {
                    row: req.row,
                    model: req.model.clone(),
                });
            }
        }
        if let Some(url) = &sub.webhook_url {
            if self.secrets.secret_for(&sub.tenant).await?.is_none() {
                return Err(SubmitError::NoWebhookSecret(sub.tenant.clone()));
            }
            validate_webhook_url(url, self.mode, self.resolver.as_ref()).await?;
        }
        let now = rfc3339(self.clock.now_ms());
        let job = GenerationJob {
            job_id: sub.job_id.clone().unwrap_or_else(|| {
                format!("gj{}", &uuid::Uuid::new_v4().simple().to_string()[..20])
            }),
            tenant: sub.tenant.clone(),
            template: sub.template.clone(),
            rows: sub.requests.len() as u64,
            webhook_url: sub.webhook_url.clone(),
            webhook_rows: sub.webhook_rows && sub.webhook_url.is_some(),
            regenerate: sub
                .regenerate
                .unwrap_or(self.settings.regenerate_on_mismatch),
            status: JobStatus::Running,
            source: sub.source.clone(),
            created_at: now.clone(),
            finished_at: None,
        };
        let rows: Vec<GenerationRow> = sub
            .requests
            .iter()
            .map(|req| GenerationRow {
                job_id: job.job_id.clone(),
                tenant: job.tenant.clone(),
                row: u32::try_from(req.row).unwrap_or(u32::MAX),
                request: req.clone(),
                status: RowStatus::Queued,
                attempt: 1,
                image_id: None,
                output_key: None,
                generation_cost_usd: 0.0,
                reused: false,
                check: None,
                first_check: None,
                error: None,
                budget_wait_until_ms: None,
                updated_at: now.clone(),
            })
            .collect();
        self.store.create_job(&job, &rows).await?;
        // A crash before the send leaves queued rows that the sweep sends again.
        let bodies = rows
            .iter()
            .map(|r| self.message(r).body())
            .collect::<StoreResult<Vec<_>>>()?;
        self.queue.send(bodies).await?;
        info!(job_id = %job.job_id, tenant = %job.tenant, rows = job.rows, "generation job queued");
        Ok(job)
    }

    fn message(&self, row: &GenerationRow) -> GenerationMessage {
        GenerationMessage {
            v: GenerationMessage::VERSION,
            tenant: row.tenant.clone(),
            job_id: row.job_id.clone(),
            row: row.row,
            attempt: row.attempt,
        }
    }

    // --- one row's generation ---------------------------------------------------------------

    /// Handle one generation message. Never panics; every error becomes an outcome.
    pub async fn handle(&self, body: &str, receive_count: u32) -> GenerateOutcome {
        let started = std::time::Instant::now();
        let outcome = self.handle_message(body, receive_count).await;
        crate::metrics::observe_generate(&*self.metrics, &outcome, started.elapsed());
        outcome
    }

    async fn handle_message(&self, body: &str, receive_count: u32) -> GenerateOutcome {
        let msg = match GenerationMessage::parse(body) {
            Ok(m) => m,
            Err(reason) => {
                // Never dropped: it goes back until the queue's redrive dead-letters it.
                warn!(%reason, receive_count, "bad generation message; kept for the dead-letter queue");
                return GenerateOutcome::Retry {
                    delay: Duration::from_secs(30),
                    reason,
                };
            }
        };
        let span = tracing::info_span!("generation", job_id = %msg.job_id, row = msg.row, attempt = msg.attempt, tenant = %msg.tenant);
        let outcome = tracing::Instrument::instrument(self.handle_row(&msg, receive_count), span)
            .await
            .unwrap_or_else(|e| GenerateOutcome::Retry {
                delay: retry_delay(&FailureKind::Connection, receive_count, 0.5),
                reason: e.to_string(),
            });
        let max = self.settings.max_receives;
        match outcome {
            // Waiting for money is not failing: the row stays queued (the sweep sends it again
            // after its wait, should the queue dead-letter the message meanwhile).
            GenerateOutcome::Retry { reason, .. }
                if max > 0 && receive_count >= max && !reason.starts_with(BUDGET_WAIT) =>
            {
                let why = format!("gave up after {receive_count} deliveries: {reason}");
                match self.fail_row(&msg, &why).await {
                    Ok(()) => GenerateOutcome::Failed(why),
                    Err(e) => GenerateOutcome::Retry {
                        delay: Duration::from_secs(5),
                        reason: format!("recording the failure: {e}"),
                    },
                }
            }
            other => other,
        }
    }

    async fn handle_row(
        &self,
        msg: &GenerationMessage,
        receive_count: u32,
    ) -> StoreResult<GenerateOutcome> {
        let Some(row) = self
            .store
            .get_row(&msg.tenant, &msg.job_id, msg.row)
            .await?
        else {
            return Ok(GenerateOutcome::Failed(format!(
                "job {} has no row {}",
                msg.job_id, msg.row
            )));
        };
        if row.status != RowStatus::Queued || row.attempt != msg.attempt {
            return Ok(GenerateOutcome::AlreadyDone);
        }
        let req = row.current_request();
        let key = req.idempotency_key();
        let owner = format!("{}:{}", self.instance, uuid::Uuid::new_v4().simple());
        // A second round only after forgetting a record whose image is gone.
        let mut forgotten = false;
        let acquired = loop {
            let claim = claim_waiting(
                self.settings.max_inline_wait,
                |c| match c {
                    GenClaim::Busy { retry_in } => Some(*retry_in),
                    _ => None,
                },
                || {
                    let now = self.clock.now_ms();
                    self.store.claim_generation(
                        &row.tenant,
                        &key,
                        &owner,
                        self.settings.generation_lease(),
                        now,
                    )
                },
            )
            .await?;
            match claim {
                GenClaim::Done(object) => {
                    let Some(bytes) = self.cached_image(&object).await? else {
                        if forgotten {
                            break false;
                        }
                        // Expired by the bucket's lifecycle, or deleted: generate it again.
                        warn!(
                            key,
                            blob_key = %object.blob_key,
                            "the cached image of this request is gone; generating it again"
                        );
                        self.store.forget_generated(&object).await?;
                        forgotten = true;
                        continue;
                    };
                    self.hand_over(&row, &object, bytes, true).await?;
                    return Ok(GenerateOutcome::Reused);
                }
                GenClaim::Busy { retry_in } => {
                    // Still made by another worker after the wait in hand: back to the queue
                    // until its lease ends (one delivery spent).
                    return Ok(GenerateOutcome::Retry {
                        delay: retry_in.max(Duration::from_secs(1)),
                        reason: "the same image is being generated by another worker".into(),
                    });
                }
                GenClaim::Acquired => break true,
            }
        };
        if !acquired {
            // Its record was forgotten, yet a record with no image is back: try again later
            // rather than pay without the claim.
            return Ok(GenerateOutcome::Retry {
                delay: Duration::from_secs(1),
                reason: "the cached image of this request is gone and its record came back".into(),
            });
        }
        let outcome = self.generate(&row, &req, &key, &owner, receive_count).await;
        if !matches!(outcome, Ok(GenerateOutcome::Generated { .. })) {
            self.release(&row.tenant, &key, &owner).await;
        }
        outcome
    }

    /// Give a claim back so the next attempt can take it at once (else it expires).
    async fn release(&self, tenant: &str, key: &str, owner: &str) {
        if let Err(e) = self.store.release_generation(tenant, key, owner).await {
            debug!(error = %e, key, "could not release a claim (it expires)");
        }
    }

    async fn generate(
        &self,
        row: &GenerationRow,
        req: &GenerationRequest,
        key: &str,
        owner: &str,
        receive_count: u32,
    ) -> StoreResult<GenerateOutcome> {
        let chain = self.settings.generation_chain(&req.model);
        let mut last_retry = None;
        for (i, model) in chain.iter().enumerate() {
            let has_fallback = i + 1 < chain.len();
            let generator = match self.generators.get(model) {
                Ok(g) => g,
                Err(e) if has_fallback => {
                    warn!(model, error = %e, "image model unavailable; trying the next");
                    continue;
                }
                Err(e) => return self.fail_row_now(row, &e).await,
            };
            let grant = match self
                .limiters
                .wait_for_slot(model, 0, self.settings.max_inline_wait, &*self.clock)
                .await
            {
                Ok(grant) => grant,
                Err(Denied::Wait(d)) => {
                    if has_fallback {
                        last_retry = Some((d, format!("rate limit for {model}")));
                        continue;
                    }
                    return Ok(GenerateOutcome::Retry {
                        delay: spread_limit_wait(d),
                        reason: format!("local rate limit for {model}"),
                    });
                }
            };
            let hold = match self
                .hold_budget(row, req, model, generator.is_paid())
                .await?
            {
                Ok(hold) => hold,
                Err((period, retry_at_ms)) => {
                    return self.over_budget(row, period, retry_at_ms).await;
                }
            };
            let call = GenerationCall {
                model: model.clone(),
                ..GenerationCall::of_request(req)
            };
            let mut answer = generator.generate(&call).await;
            if let Err(e) = &answer {
                if e.kind == FailureKind::InvalidOutput {
                    // An unusable answer (a cut body, bytes that are no image) is paid; like
                    // an analysis it gets one more call in place, then it is permanent.
                    if e.billed && generator.is_paid() {
                        let cost = self.book(row, owner, model, req, true, None, Some(e)).await;
                        self.add_cost(row, cost).await?;
                    }
                    warn!(model, error = %e.message, "unusable image answer; asking once more");
                    answer = generator.generate(&call).await;
                }
            }
            self.finish(model, grant, &answer).await;
            match answer {
                Ok(image) => {
                    let cost = self
                        .book(
                            row,
                            owner,
                            model,
                            req,
                            generator.is_paid(),
                            Some(&image),
                            None,
                        )
                        .await;
                    // On its row at once: a kill between the two writes is the only way the
                    // ledger can hold a call its job does not show.
                    self.add_cost(row, cost).await?;
                    // Booked: the money now counts on the ledger, not in the hold.
                    self.settle_budget(&row.tenant, hold.as_ref()).await;
                    let object = self
                        .keep(row, key, generator.name(), model, &image, cost)
                        .await?;
                    self.hand_over(row, &object, image.bytes, false).await?;
                    return Ok(GenerateOutcome::Generated {
                        model: model.clone(),
                        cost_usd: cost,
                    });
                }
                Err(e) => {
                    if e.billed && generator.is_paid() {
                        let cost = self
                            .book(row, owner, model, req, true, None, Some(&e))
                            .await;
                        self.add_cost(row, cost).await?;
                    }
                    self.settle_budget(&row.tenant, hold.as_ref()).await;
                    match classify(&e.kind) {
                        RetryClass::Permanent => {
                            let reason = format!("{model}: {}", e.message);
                            return self.fail_row_now(row, &reason).await;
                        }
                        RetryClass::Transient => {
                            let delay = retry_delay(&e.kind, receive_count, 0.5);
                            let reason = format!("{model}: {}", e.message);
                            let long_wait = matches!(
                                e.kind,
                                FailureKind::Http { retry_after: Some(d), .. } if d >= self.settings.fallback_after
                            );
                            let throttled = matches!(e.kind, FailureKind::Http { status: 429, .. });
                            if has_fallback && (long_wait || !throttled) {
                                last_retry = Some((delay, reason));
                                continue;
                            }
                            return Ok(GenerateOutcome::Retry { delay, reason });
                        }
                    }
                }
            }
        }
        let (delay, reason) =
            last_retry.unwrap_or((Duration::from_secs(5), "no image model available".into()));
        Ok(GenerateOutcome::Retry { delay, reason })
    }

    /// Hold one image's price against the tenant's caps before a paid call: Ok(None) when
    /// nothing is to be held (a free generator, an uncapped tenant), Err when the period's cap
    /// is spent (with when it rolls over). The hold lasts as long as the generation claim.
    async fn hold_budget(
        &self,
        row: &GenerationRow,
        req: &GenerationRequest,
        model: &str,
        paid: bool,
    ) -> StoreResult<Result<Option<(Periods, String)>, (Period, u64)>> {
        if !paid {
            return Ok(Ok(None));
        }
        let caps = caps_for(self.repo.as_ref(), &self.settings, &row.tenant).await?;
        if !caps.is_capped() {
            return Ok(Ok(None));
        }
        let amount = PriceTable::builtin()
            .image_model(model)
            .and_then(|p| p.cost_usd(req.size, req.quality, None))
            .unwrap_or(0.0);
        let now = self.clock.now_ms();
        let periods = Periods::at(now);
        let expires = now + self.settings.generation_lease().as_millis() as u64;
        Ok(
            match self
                .repo
                .reserve_budget(&row.tenant, &periods, amount, &caps, now, expires)
                .await?
            {
                BudgetHold::Reserved(id) => Ok(Some((periods, id))),
                BudgetHold::Over(period) => Err((period, budget::retry_at_ms(&periods, period))),
            },
        )
    }

    /// End a hold once its money is booked; a failure leaves it to expire with the lease.
    async fn settle_budget(&self, tenant: &str, hold: Option<&(Periods, String)>) {
        let Some((periods, id)) = hold else { return };
        if let Err(e) = self.repo.settle_budget(tenant, periods, id).await {
            debug!(error = %e, "could not settle a budget hold (it expires with the lease)");
        }
    }

    /// A row refused by its tenant's budget (`over_budget`): failed for good, or back to the
    /// queue until the period rolls over, marked so that the sweep leaves it alone until then.
    async fn over_budget(
        &self,
        row: &GenerationRow,
        period: Period,
        retry_at_ms: u64,
    ) -> StoreResult<GenerateOutcome> {
        match self.settings.over_budget {
            OverBudget::Fail => {
                info!(job_id = %row.job_id, row = row.row, "budget exceeded; failing the row");
                self.fail_row_now(row, BUDGET_EXCEEDED).await
            }
            OverBudget::Wait => {
                let (delay, reason) = budget_wait(period, retry_at_ms, self.clock.now_ms());
                info!(job_id = %row.job_id, row = row.row, wait_s = delay.as_secs(), "budget exceeded; the row waits for the next period");
                if let Some(current) = self
                    .store
                    .get_row(&row.tenant, &row.job_id, row.row)
                    .await?
                {
                    if (current.status, current.attempt) == (RowStatus::Queued, row.attempt) {
                        let mut next = current;
                        next.budget_wait_until_ms = Some(retry_at_ms);
                        next.updated_at = rfc3339(self.clock.now_ms());
                        self.store
                            .update_row(&next, (RowStatus::Queued, row.attempt))
                            .await?;
                    }
                }
                Ok(GenerateOutcome::Retry { delay, reason })
            }
        }
    }

    /// Tell the limit what the call showed: its rate-limit headers, and a 429's Retry-After
    /// (nothing goes to the model before it).
    async fn finish(
        &self,
        model: &str,
        grant: Grant,
        answer: &Result<crate::ports::GeneratedImage, crate::ports::ProviderError>,
    ) {
        let now = self.clock.now_ms();
        match answer {
            // The image answer carries no rate headers the ports keep.
            Ok(_) => self
                .limiters
                .learn(model, grant, None, &Default::default(), now),
            Err(e) => {
                self.limiters.learn(model, grant, None, &e.rate, now);
                if let FailureKind::Http {
                    status: 429,
                    retry_after,
                } = &e.kind
                {
                    self.limiters.throttled(model, *retry_after, now).await;
                }
            }
        }
    }

    /// Book one paid call on the ledger (once per call: the spend id names this handling and
    /// model) and return its cost. An answer whose image was unusable is booked at the
    /// per-image price of its request.
    #[allow(clippy::too_many_arguments)]
    async fn book(
        &self,
        row: &GenerationRow,
        owner: &str,
        model: &str,
        req: &GenerationRequest,
        paid: bool,
        image: Option<&GeneratedImage>,
        failed: Option<&ProviderError>,
    ) -> f64 {
        if !paid {
            return 0.0;
        }
        let table = PriceTable::builtin();
        let usage = image.and_then(|i| i.usage).or(failed.and_then(|e| e.usage));
        let cost = table
            .image_model(model)
            .and_then(|p| p.cost_usd(req.size, req.quality, usage.as_ref()))
            .unwrap_or(0.0);
        let spend = Spend {
            day: day_of(&rfc3339(self.clock.now_ms())).to_string(),
            model: model.to_string(),
            calls: 1,
            usage: usage.unwrap_or_default(),
            cost_usd: cost,
            calls_at_estimate: u64::from(usage.is_none()),
            cost_at_estimate_usd: if usage.is_none() { cost } else { 0.0 },
            lane: Lane::Realtime,
            saved_usd: 0.0,
            kind: LedgerKind::Generation,
        };
        observe_spend(&*self.metrics, model, &spend.usage, cost);
        let image_id = image_id_of(&row.job_id, row.row, row.attempt);
        // One id per paid call: its booking retries in place never count it twice.
        let spend_id = format!("gen:{owner}:{model}:{}", uuid::Uuid::new_v4().simple());
        if let Err(e) = crate::analyze::book_spend_retrying(
            self.repo.as_ref(),
            &row.tenant,
            &image_id,
            &spend_id,
            &spend,
        )
        .await
        {
            warn!(error = %e, cost_usd = cost, "could not book a generated image's cost");
        }
        cost
    }

    /// Put the money of a booked call on its row (right after the booking, whether the call
    /// gave an image or not), so the row's cost, and the job's, equals what the ledger booked.
    async fn add_cost(&self, row: &GenerationRow, cost_usd: f64) -> StoreResult<()> {
        if cost_usd == 0.0 {
            return Ok(());
        }
        for _ in 0..3 {
            let Some(current) = self
                .store
                .get_row(&row.tenant, &row.job_id, row.row)
                .await?
            else {
                return Ok(());
            };
            let mut next = current.clone();
            next.generation_cost_usd += cost_usd;
            if self
                .store
                .update_row(&next, (current.status, current.attempt))
                .await?
            {
                return Ok(());
            }
        }
        warn!(job_id = %row.job_id, row = row.row, cost_usd, "could not add a billed call's cost to its row");
        Ok(())
    }

    /// Store a new image under its key, so any later request of the same key reuses it.
    async fn keep(
        &self,
        row: &GenerationRow,
        key: &str,
        provider: &str,
        model: &str,
        image: &GeneratedImage,
        cost_usd: f64,
    ) -> StoreResult<GeneratedObject> {
        let blob_key = format!(
            "{GENERATION_CACHE_PREFIX}{}/{key}.{}",
            row.tenant,
            extension_of_type(&image.content_type)
        );
        self.blobs
            .put(&blob_key, image.bytes.clone(), &image.content_type)
            .await?;
        let object = GeneratedObject {
            tenant: row.tenant.clone(),
            key: key.to_string(),
            blob_key,
            content_type: image.content_type.clone(),
            width: image.width,
            height: image.height,
            provider: provider.to_string(),
            // Providers that do not name the model that answered leave it empty.
            model: if image.model.is_empty() {
                model.to_string()
            } else {
                image.model.clone()
            },
            usage: image.usage,
            cost_usd,
            created_at: rfc3339(self.clock.now_ms()),
        };
        self.store.put_generated(&object).await?;
        Ok(object)
    }

    /// The stored image of a cache record, or `None` when it is gone.
    async fn cached_image(&self, object: &GeneratedObject) -> StoreResult<Option<Vec<u8>>> {
        match self
            .blobs
            .get(&object.blob_key, self.settings.prepare.max_input_bytes)
            .await
        {
            Ok(bytes) => Ok(Some(bytes)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deliver a row's image (`bytes`, the image of `object`) and start its check: the job's
    /// output key, an image record that names the row, and the upload that the analysis picks
    /// up.
    async fn hand_over(
        &self,
        row: &GenerationRow,
        object: &GeneratedObject,
        bytes: Vec<u8>,
        reused: bool,
    ) -> StoreResult<()> {
        let ext = extension_of_type(&object.content_type);
        let req = row.current_request();
        let output_key = format!(
            "{GENERATED_PREFIX}{}/{}/{}",
            row.tenant,
            row.job_id,
            req.output_key.clone().unwrap_or_else(|| format!(
                "row-{}.{}",
                row.row,
                extension_of_type(content_type(req.output_format))
            ))
        );
        self.blobs
            .put(&output_key, bytes.clone(), &object.content_type)
            .await?;
        let image_id = image_id_of(&row.job_id, row.row, row.attempt);
        let key = upload_key(&row.tenant, &image_id, ext);
        let now_ms = self.clock.now_ms();
        let now = rfc3339(now_ms);
        let record = ImageRecord {
            lane: Some(Lane::Realtime),
            generation: Some(GenerationLink {
                job_id: row.job_id.clone(),
                row: row.row,
                attempt: row.attempt,
                check: CheckSpec::of_request(&req),
            }),
            ..ImageRecord::pending(
                &row.tenant,
                &image_id,
                output_key.clone(),
                key.clone(),
                &now,
            )
        };
        // A lost upload event leaves a pending record the reconciler looks at.
        let recheck = now_ms + self.settings.stuck_after.as_millis() as u64;
        self.repo.put_image(&record, Some(recheck)).await?;
        self.blobs.put(&key, bytes, &object.content_type).await?;
        // The stored row, not the one read at the start: a billed failure before this image
        // added its cost to it meanwhile.
        let Some(current) = self
            .store
            .get_row(&row.tenant, &row.job_id, row.row)
            .await?
        else {
            return Ok(());
        };
        if current.status != RowStatus::Queued || current.attempt != row.attempt {
            debug!("row moved on meanwhile; nothing to hand over");
            return Ok(());
        }
        let mut next = current;
        next.status = RowStatus::Checking;
        next.image_id = Some(image_id.clone());
        next.output_key = Some(output_key);
        next.reused = reused;
        next.updated_at = now;
        if !self
            .store
            .update_row(&next, (RowStatus::Queued, row.attempt))
            .await?
        {
            debug!("row moved on meanwhile; nothing to hand over");
            return Ok(());
        }
        if let Some(ingest) = &self.ingest {
            ingest.ingest_key(&key).await?;
        }
        // On AWS the upload above starts the resize and the analysis at once: an analysis that
        // ended before the row moved found no row in `checking` to settle. Either this read
        // sees its end, or its own settle saw the row move; both settles are conditional on
        // the row's state, so one of them settles it, once.
        let analysed = self
            .repo
            .get_image(&row.tenant, &image_id)
            .await?
            .is_some_and(|r| matches!(r.status, ImageStatus::Done | ImageStatus::Failed));
        if analysed {
            debug!(
                image_id,
                "the analysis ended before the row moved; settling it now"
            );
            self.settle_image(&row.tenant, &image_id).await?;
        }
        Ok(())
    }

    async fn fail_row(&self, msg: &GenerationMessage, reason: &str) -> StoreResult<()> {
        let expected = (RowStatus::Queued, msg.attempt);
        self.fail_row_at(&msg.tenant, &msg.job_id, msg.row, expected, reason)
            .await
            .map(|_| ())
    }

    async fn fail_row_now(
        &self,
        row: &GenerationRow,
        reason: &str,
    ) -> StoreResult<GenerateOutcome> {
        let expected = (row.status, row.attempt);
        Ok(
            match self
                .fail_row_at(&row.tenant, &row.job_id, row.row, expected, reason)
                .await?
            {
                Some(false) => GenerateOutcome::AlreadyDone,
                _ => GenerateOutcome::Failed(reason.to_string()),
            },
        )
    }

    /// Fail a row that is still at `expected` (status, attempt), reading the stored row so
    /// costs booked on it since the caller read it stay on it. None: no such row; Some(false):
    /// it had moved on.
    async fn fail_row_at(
        &self,
        tenant: &str,
        job_id: &str,
        row: u32,
        expected: (RowStatus, u32),
        reason: &str,
    ) -> StoreResult<Option<bool>> {
        let Some(current) = self.store.get_row(tenant, job_id, row).await? else {
            return Ok(None);
        };
        if (current.status, current.attempt) != expected {
            return Ok(Some(false));
        }
        let mut next = current;
        next.status = RowStatus::Failed;
        next.error = Some(reason.to_string());
        next.updated_at = rfc3339(self.clock.now_ms());
        warn!(job_id, row, reason, "generation row failed");
        if self.store.update_row(&next, expected).await? {
            self.row_finished(&next).await?;
            self.maybe_finish(tenant, job_id).await?;
        }
        Ok(Some(true))
    }

    // --- after the analysis ---------------------------------------------------------------

    /// Move a generated image's row on once its analysis has ended (called by the analyzer
    /// and by the sweep; a no-op for other images and for rows already moved on).
    pub async fn settle_image(&self, tenant: &str, image_id: &str) -> StoreResult<()> {
        let Some(record) = self.repo.get_image(tenant, image_id).await? else {
            return Ok(());
        };
        let Some(link) = &record.generation else {
            return Ok(());
        };
        let Some(row) = self.store.get_row(tenant, &link.job_id, link.row).await? else {
            return Ok(());
        };
        if row.status != RowStatus::Checking || row.attempt != link.attempt {
            return Ok(());
        }
        let job = self.store.get_job(tenant, &link.job_id).await?;
        let mut next = row.clone();
        next.updated_at = rfc3339(self.clock.now_ms());
        let mut regenerate = false;
        match (&record.status, &record.result) {
            (ImageStatus::Done, Some(result)) => {
                let verdict = CheckVerdict::of_analysis(&result.analysis);
                let may_regenerate = job.as_ref().is_some_and(|j| j.regenerate) && row.attempt == 1;
                if verdict.passed() {
                    next.status = RowStatus::Done;
                    next.check = Some(verdict);
                } else if may_regenerate {
                    info!(job_id = %row.job_id, row = row.row, issues = ?verdict.issues, "check failed; generating the row again");
                    next.first_check = Some(verdict);
                    next.attempt = 2;
                    next.status = RowStatus::Queued;
                    regenerate = true;
                } else {
                    next.status = RowStatus::Mismatch;
                    next.check = Some(verdict);
                }
            }
            (ImageStatus::Failed, _) => {
                next.status = RowStatus::Failed;
                next.error = Some(format!(
                    "analysis failed: {}",
                    record.error.as_deref().unwrap_or("unknown")
                ));
            }
            _ => return Ok(()),
        }
        if !self
            .store
            .update_row(&next, (RowStatus::Checking, row.attempt))
            .await?
        {
            return Ok(());
        }
        if regenerate {
            self.queue.send(vec![self.message(&next).body()?]).await?;
        } else {
            if let Some(job) = &job {
                self.record_row_delivery(job, &next).await?;
            }
            self.maybe_finish(tenant, &row.job_id).await?;
        }
        Ok(())
    }

    /// The id of a row's `generation.row.finished` delivery: one per row, whoever records it.
    pub fn row_delivery_id(job_id: &str, row: u32) -> String {
        format!("msg_{job_id}_r{row}")
    }

    /// Record a final row's webhook when its job asks for one per row (once: an existing
    /// delivery is left as it is).
    async fn row_finished(&self, row: &GenerationRow) -> StoreResult<()> {
        let Some(job) = self.store.get_job(&row.tenant, &row.job_id).await? else {
            return Ok(());
        };
        self.record_row_delivery(&job, row).await
    }

    async fn record_row_delivery(
        &self,
        job: &GenerationJob,
        row: &GenerationRow,
    ) -> StoreResult<()> {
        let Some(url) = job.webhook_url.as_ref().filter(|_| job.webhook_rows) else {
            return Ok(());
        };
        let delivery_id = Self::row_delivery_id(&row.job_id, row.row);
        if self
            .store
            .get_delivery(&row.tenant, &delivery_id)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let mut data = row_summary(row);
        if let Some(o) = data.as_object_mut() {
            o.insert("job_id".into(), serde_json::json!(row.job_id));
            o.insert("tenant".into(), serde_json::json!(row.tenant));
        }
        self.store
            .put_delivery(&WebhookDelivery::new_event(
                delivery_id,
                &row.tenant,
                &row.job_id,
                url,
                EVENT_ROW_FINISHED,
                data,
                self.clock.now_ms(),
            ))
            .await
    }

    /// [`Generations::settle_image`], logging instead of failing (the sweep retries).
    pub async fn settle_or_log(&self, tenant: &str, image_id: &str) {
        if let Err(e) = self.settle_image(tenant, image_id).await {
            warn!(error = %e, image_id, "could not move a generation row on; the sweep will");
        }
    }

    /// Finish the job if every row is final: record its summary webhook in the same write.
    pub async fn maybe_finish(&self, tenant: &str, job_id: &str) -> StoreResult<bool> {
        let Some(job) = self.store.get_job(tenant, job_id).await? else {
            return Ok(false);
        };
        if job.status != JobStatus::Running {
            return Ok(false);
        }
        let rows = self.store.rows(tenant, job_id).await?;
        let mut counts = RowCounts::default();
        for r in &rows {
            counts.add(r.status, r.first_check.is_some(), r.reused);
        }
        if !counts.all_final() || counts.total < job.rows {
            return Ok(false);
        }
        if job.webhook_rows {
            // A row webhook lost between the row's write and its own (a crash) is recorded
            // now, before the job's.
            for r in &rows {
                self.record_row_delivery(&job, r).await?;
            }
        }
        let now_ms = self.clock.now_ms();
        let now = rfc3339(now_ms);
        let delivery = match &job.webhook_url {
            Some(url) => {
                let report = self.report(&job, &rows).await?;
                Some(WebhookDelivery::new_event(
                    format!("msg_{}", uuid::Uuid::new_v4().simple()),
                    tenant,
                    job_id,
                    url,
                    EVENT_JOB_FINISHED,
                    report.summary(MAX_SUMMARY_ROWS),
                    now_ms,
                ))
            }
            None => None,
        };
        let finished = self
            .store
            .finish_job(tenant, job_id, &now, delivery.as_ref())
            .await?;
        if finished {
            info!(
                job_id,
                done = counts.done,
                mismatch = counts.mismatch,
                failed = counts.failed,
                regenerated = counts.regenerated,
                "generation job finished"
            );
        }
        Ok(finished)
    }

    /// A job with its rows, counts and money: generation calls booked on the rows plus the
    /// analyses of every image the job made (both attempts of a regenerated row).
    pub async fn report(
        &self,
        job: &GenerationJob,
        rows: &[GenerationRow],
    ) -> StoreResult<JobReport> {
        let mut counts = RowCounts::default();
        let mut generation_cost = 0.0;
        let mut analysis_cost = 0.0;
        for r in rows {
            counts.add(r.status, r.first_check.is_some(), r.reused);
            generation_cost += r.generation_cost_usd;
            if r.status == RowStatus::Queued && r.attempt == 1 {
                continue;
            }
            for attempt in 1..=r.attempt {
                let id = image_id_of(&r.job_id, r.row, attempt);
                if let Some(rec) = self.repo.get_image(&r.tenant, &id).await? {
                    analysis_cost += rec.result.as_ref().map_or(0.0, |x| x.cost_usd)
                        + rec.extra_spend.as_ref().map_or(0.0, |x| x.cost_usd);
                }
            }
        }
        Ok(JobReport {
            job: job.clone(),
            counts,
            generation_cost_usd: generation_cost,
            analysis_cost_usd: analysis_cost,
            rows: rows.to_vec(),
        })
    }

    /// A tenant's job with its report, or None.
    pub async fn job_report(&self, tenant: &str, job_id: &str) -> StoreResult<Option<JobReport>> {
        let Some(job) = self.store.get_job(tenant, job_id).await? else {
            return Ok(None);
        };
        let rows = self.store.rows(tenant, job_id).await?;
        Ok(Some(self.report(&job, &rows).await?))
    }

    // --- the sweep ------------------------------------------------------------------------

    /// Move running jobs on whatever was lost: rows whose analysis ended without telling
    /// them, queued rows whose message is gone (sent again after `stuck_after`; duplicates
    /// are harmless), and jobs whose last row ended without finishing them.
    pub async fn sweep(&self) -> StoreResult<SweepReport> {
        let mut report = SweepReport::default();
        let stuck = self.settings.stuck_after.as_millis() as u64;
        let now = self.clock.now_ms();
        for job in self.store.running_jobs(500).await? {
            for row in self.store.rows(&job.tenant, &job.job_id).await? {
                match row.status {
                    RowStatus::Checking => {
                        if let Some(id) = &row.image_id {
                            self.settle_image(&job.tenant, id).await?;
                        }
                    }
                    RowStatus::Queued => {
                        let age = crate::ports::parse_rfc3339_ms(&row.updated_at)
                            .map(|t| now.saturating_sub(t))
                            .unwrap_or(u64::MAX);
                        let waiting = row.budget_wait_until_ms.is_some_and(|t| t > now);
                        if age >= stuck && !waiting {
                            self.queue.send(vec![self.message(&row).body()?]).await?;
                            report.resent += 1;
                        }
                    }
                    _ => {}
                }
            }
            // Finished here, or by the last row settled above.
            let finished = self.maybe_finish(&job.tenant, &job.job_id).await?
                || self
                    .store
                    .get_job(&job.tenant, &job.job_id)
                    .await?
                    .is_some_and(|j| j.status != JobStatus::Running);
            if finished {
                report.finished += 1;
            }
        }
        Ok(report)
    }
}

// --- named templates ------------------------------------------------------------------------

/// The largest templates file read.
const MAX_TEMPLATES_BYTES: u64 = 1 << 20;

/// Where a deployment's named templates live.
#[derive(Clone, Default)]
pub enum TemplatesSource {
    /// None: jobs carry their template inline.
    #[default]
    None,
    /// A file (`templates_file`; the local runtime).
    File(std::path::PathBuf),
    /// An object of the blob store (on AWS the bucket's [`TEMPLATES_KEY`]).
    Blob {
        blobs: Arc<dyn BlobStore>,
        key: String,
    },
}

/// The templates object in the bucket on AWS (outside the CSV drop's `.csv` suffix).
pub const TEMPLATES_KEY: &str = "generations/templates.toml";

/// Why named templates could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TemplatesError {
    #[error("this deployment has no templates file: send the template inline")]
    NoTemplates,
    #[error("the templates file {0} cannot be read: {1}")]
    Unreadable(String, String),
    #[error("the templates file {0} is invalid: {1}")]
    Invalid(String, String),
}

impl TemplatesSource {
    /// Read and parse the templates (read at each use: an edited file applies at once).
    pub async fn load(&self) -> Result<TemplateSet, TemplatesError> {
        let (name, text) = match self {
            TemplatesSource::None => return Err(TemplatesError::NoTemplates),
            TemplatesSource::File(path) => {
                let name = path.display().to_string();
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| TemplatesError::Unreadable(name.clone(), e.to_string()))?;
                (name, text)
            }
            TemplatesSource::Blob { blobs, key } => {
                let bytes = match blobs.get(key, MAX_TEMPLATES_BYTES).await {
                    Ok(b) => b,
                    Err(StoreError::NotFound(_)) => return Err(TemplatesError::NoTemplates),
                    Err(e) => return Err(TemplatesError::Unreadable(key.clone(), e.to_string())),
                };
                let text = String::from_utf8(bytes)
                    .map_err(|_| TemplatesError::Invalid(key.clone(), "not UTF-8".into()))?;
                (key.clone(), text)
            }
        };
        TemplateSet::from_toml(&text).map_err(|e| TemplatesError::Invalid(name, e.to_string()))
    }
}

// --- the CSV drop ---------------------------------------------------------------------------

/// Where CSV files start jobs on AWS: `generations/{tenant}/{template}/{name}.csv`.
pub const DROP_PREFIX: &str = "generations/";
/// The largest CSV a drop reads.
const MAX_DROP_BYTES: u64 = 16 << 20;

/// A dropped CSV's tenant and template, from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropKey {
    pub tenant: String,
    pub template: String,
}

impl DropKey {
    /// `generations/{tenant}/{template}/{name}.csv` (the name may hold more `/`).
    pub fn parse(key: &str) -> Result<DropKey, String> {
        let rest = key
            .strip_prefix(DROP_PREFIX)
            .ok_or_else(|| format!("{key}: not under {DROP_PREFIX}"))?;
        let mut parts = rest.splitn(3, '/');
        let (Some(tenant), Some(template), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "{key}: expected {DROP_PREFIX}{{tenant}}/{{template}}/{{name}}.csv"
            ));
        };
        if !name.to_ascii_lowercase().ends_with(".csv") || name.len() <= 4 {
            return Err(format!("{key}: only .csv files start jobs"));
        }
        if tenant.is_empty() || sightline_core::keys::sanitize_id(tenant) != tenant {
            return Err(format!(
                "{key}: a tenant is letters, digits, `.`, `_` and `-`"
            ));
        }
        if template.is_empty() {
            return Err(format!("{key}: no template named"));
        }
        Ok(DropKey {
            tenant: tenant.to_string(),
            template: template.to_string(),
        })
    }
}

/// The S3 user metadata a dropped CSV may carry (`aws s3 cp --metadata webhook-url=…`): the
/// job's webhook URL, and whether each row is posted too.
pub const DROP_WEBHOOK_URL_META: &str = "webhook-url";
pub const DROP_WEBHOOK_ROWS_META: &str = "webhook-rows";

/// A drop's job options, from its object's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropOptions {
    pub webhook_url: Option<String>,
    pub webhook_rows: bool,
}

impl DropOptions {
    /// Unknown metadata is left alone; a value of ours that means nothing is refused.
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Result<DropOptions, String> {
        let webhook_url = meta
            .get(DROP_WEBHOOK_URL_META)
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty());
        let webhook_rows = match meta.get(DROP_WEBHOOK_ROWS_META).map(|v| v.trim()) {
            None | Some("") => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                return Err(format!(
                    "metadata {DROP_WEBHOOK_ROWS_META} must be true or false, not {v:?}"
                ))
            }
        };
        if webhook_rows && webhook_url.is_none() {
            return Err(format!(
                "metadata {DROP_WEBHOOK_ROWS_META} needs {DROP_WEBHOOK_URL_META}"
            ));
        }
        Ok(DropOptions {
            webhook_url,
            webhook_rows,
        })
    }
}

/// The job id of a dropped object: the same object (key and version) is the same job.
pub fn drop_job_id(key: &str, version: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{key}\n{version}").as_bytes());
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("gj{hex}")
}

/// The receipt written next to a dropped CSV: `{key}.result.json`.
pub fn drop_receipt_key(key: &str) -> String {
    format!("{key}.result.json")
}

/// What a dropped CSV became.
#[derive(Debug, Clone, PartialEq)]
pub enum DropOutcome {
    /// A new job with its rows queued.
    Started { job_id: String, rows: u64 },
    /// The same object started its job before (an event delivered again).
    AlreadyStarted { job_id: String },
    /// Refused before anything was stored or paid; the receipt says why.
    Refused(String),
}

impl Generations {
    /// Start the job of a CSV dropped at `key` (`version`: its ETag or version id, so a
    /// changed file dropped again is a new job). Refusals are written to the receipt
    /// [`drop_receipt_key`]; only storage errors are errors (the event is retried).
    pub async fn submit_drop(&self, key: &str, version: &str) -> StoreResult<DropOutcome> {
        let job_id = drop_job_id(key, version);
        let outcome = match self.start_drop(key, &job_id).await? {
            Ok(outcome) => outcome,
            Err(reason) => {
                warn!(key, %reason, "dropped CSV refused; nothing was paid");
                DropOutcome::Refused(reason)
            }
        };
        let receipt = match &outcome {
            DropOutcome::Started { job_id, rows } => {
                serde_json::json!({ "job_id": job_id, "rows": rows, "status": "started" })
            }
            DropOutcome::AlreadyStarted { job_id } => {
                serde_json::json!({ "job_id": job_id, "status": "started" })
            }
            DropOutcome::Refused(reason) => {
                serde_json::json!({ "job_id": null, "status": "refused", "error": reason })
            }
        };
        self.blobs
            .put(
                &drop_receipt_key(key),
                receipt.to_string().into_bytes(),
                "application/json",
            )
            .await?;
        Ok(outcome)
    }

    async fn start_drop(
        &self,
        key: &str,
        job_id: &str,
    ) -> StoreResult<Result<DropOutcome, String>> {
        let drop = match DropKey::parse(key) {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        if self.store.get_job(&drop.tenant, job_id).await?.is_some() {
            return Ok(Ok(DropOutcome::AlreadyStarted {
                job_id: job_id.to_string(),
            }));
        }
        // Two deliveries of one event at once: one creates the job, the other retries later
        // and finds it.
        let owner = format!("{}:{}", self.instance, uuid::Uuid::new_v4().simple());
        let claim_key = format!("drop:{job_id}");
        match self
            .store
            .claim_generation(
                &drop.tenant,
                &claim_key,
                &owner,
                Duration::from_secs(120),
                self.clock.now_ms(),
            )
            .await?
        {
            GenClaim::Acquired => {}
            GenClaim::Busy { .. } | GenClaim::Done(_) => {
                return Err(StoreError::Transient(format!(
                    "job {job_id} of {key} is being started by another delivery"
                )))
            }
        }
        let started = self.plan_and_submit_drop(key, &drop, job_id).await;
        self.release(&drop.tenant, &claim_key, &owner).await;
        started
    }

    async fn plan_and_submit_drop(
        &self,
        key: &str,
        drop: &DropKey,
        job_id: &str,
    ) -> StoreResult<Result<DropOutcome, String>> {
        let bytes = match self.blobs.get(key, MAX_DROP_BYTES).await {
            Ok(b) => b,
            Err(StoreError::TooLarge { .. }) => {
                return Ok(Err(format!("the CSV is over {} MiB", MAX_DROP_BYTES >> 20)))
            }
            Err(e) => return Err(e),
        };
        let meta = self.blobs.metadata(key).await?.unwrap_or_default();
        let options = match DropOptions::from_metadata(&meta) {
            Ok(o) => o,
            Err(e) => return Ok(Err(format!("nothing was paid: {e}"))),
        };
        let set = match self.templates.load().await {
            Ok(set) => set,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let requests = match plan_job(
            &set,
            Some(&drop.template),
            RowsInput::Csv(&bytes),
            &Limits::default(),
        ) {
            Ok(r) => r,
            Err(e) => return Ok(Err(format!("nothing was paid: {e}"))),
        };
        match self
            .submit(Submission {
                tenant: drop.tenant.clone(),
                template: drop.template.clone(),
                requests,
                webhook_url: options.webhook_url,
                webhook_rows: options.webhook_rows,
                regenerate: None,
                source: format!("s3:{key}"),
                job_id: Some(job_id.to_string()),
            })
            .await
        {
            Ok(job) => {
                info!(
                    job_id,
                    key,
                    rows = job.rows,
                    "job started from a dropped CSV"
                );
                Ok(Ok(DropOutcome::Started {
                    job_id: job.job_id,
                    rows: job.rows,
                }))
            }
            Err(SubmitError::Store(e)) => Err(e),
            Err(e) => Ok(Err(e.to_string())),
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub resent: u64,
    pub finished: u64,
}

/// A row as webhooks carry it.
pub fn row_summary(r: &GenerationRow) -> serde_json::Value {
    serde_json::json!({
        "row": r.row,
        "status": r.status,
        "image_id": r.image_id,
        "output_key": r.output_key,
        "regenerated": r.first_check.is_some(),
        "reused": r.reused,
        "check": r.check,
        "error": r.error,
        "generation_cost_usd": r.generation_cost_usd,
    })
}

/// A job, its rows by status, and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    pub job: GenerationJob,
    pub counts: RowCounts,
    pub generation_cost_usd: f64,
    pub analysis_cost_usd: f64,
    pub rows: Vec<GenerationRow>,
}

impl JobReport {
    /// The summary a webhook carries (rows capped at `max_rows`).
    pub fn summary(&self, max_rows: usize) -> serde_json::Value {
        let rows: Vec<serde_json::Value> =
            self.rows.iter().take(max_rows).map(row_summary).collect();
        serde_json::json!({
            "job_id": self.job.job_id,
            "tenant": self.job.tenant,
            "template": self.job.template,
            "status": self.job.status,
            "created_at": self.job.created_at,
            "counts": self.counts,
            "cost_usd": {
                "generation": self.generation_cost_usd,
                "analysis": self.analysis_cost_usd,
                "total": self.generation_cost_usd + self.analysis_cost_usd,
            },
            "rows": rows,
            "rows_truncated": self.rows.len() > max_rows,
        })
    }
}
