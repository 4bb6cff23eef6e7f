//! Use-case: one queued job → cached result, or a rate-limited provider call with fallback,
//! written exactly once. The caller maps the outcome to delete / retry-later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sightline_core::limiter::{Denied, RateLimiter, Reservation};
use sightline_core::model::{idempotency_key, AnalysisJob, AnalysisResult};
use sightline_core::pricing::PriceTable;
use sightline_core::pricing::Usage;
use sightline_core::retry::{classify, retry_delay, FailureKind, RetryClass};
use tracing::{debug, info, warn};

use crate::ports::{
    rfc3339, BlobStore, Claim, Clock, Completion, ProviderError, Repository, StoreError,
    VisionProvider, VisionRequest,
};
use crate::settings::Settings;

/// What to do with the message after handling it.
#[derive(Debug, Clone, PartialEq)]
pub enum AnalyzeOutcome {
    /// Analysed now; the result and ledger were written.
    Done { model: String, cost_usd: f64 },
    /// Same bytes, model and prompt were analysed before: stored at $0.
    Cached,
    /// Duplicate delivery: the image already has its result.
    AlreadyDone,
    /// Permanent failure, recorded on the image (when known); delete the message.
    Failed(String),
    /// Transient: make the message visible again after `delay`.
    Retry { delay: Duration, reason: String },
}

impl AnalyzeOutcome {
    pub fn is_retry(&self) -> bool {
        matches!(self, AnalyzeOutcome::Retry { .. })
    }
}

/// In-place retries of the final write after a paid answer.
const STORE_RETRIES: u32 = 3;

/// How one model of the chain ended.
enum Step {
    /// The provider answered: store this.
    Answered(AnalysisResult),
    /// Try the next model; if none is left, retry the message after `delay`.
    Fallback { delay: Duration, reason: String },
    /// Retry the message after `delay`.
    Retry { delay: Duration, reason: String },
    /// Permanent: record the image failed.
    Fail(String),
}

/// Limiters per model (providers limit per model), shared by all workers of an instance.
#[derive(Clone)]
pub struct Limiters {
    rpm: u64,
    tpm: u64,
    inner: Arc<Mutex<HashMap<String, RateLimiter>>>,
}

impl Limiters {
    pub fn new(rpm: u64, tpm: u64) -> Limiters {
        Limiters {
            rpm,
            tpm,
            inner: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn with<T>(&self, model: &str, now_ms: u64, f: impl FnOnce(&mut RateLimiter) -> T) -> T {
        let mut map = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let l = map
            .entry(model.to_string())
            .or_insert_with(|| RateLimiter::new(self.rpm, self.tpm, now_ms));
        f(l)
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
}

impl Analyzer {
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        repo: Arc<dyn Repository>,
        provider: Arc<dyn VisionProvider>,
        settings: Arc<Settings>,
        clock: Arc<dyn Clock>,
    ) -> Analyzer {
        let rpm = RateLimiter::per_instance(settings.rpm, settings.max_concurrency);
        let tpm = RateLimiter::per_instance(settings.tpm, settings.max_concurrency);
        Analyzer {
            blobs,
            repo,
            provider,
            settings,
            clock,
            limiters: Limiters::new(rpm, tpm),
        }
    }

    /// Models tried in order; the offline analyzer has one.
    fn chain(&self) -> Vec<String> {
        if self.provider.is_paid() {
            self.settings.model_chain()
        } else {
            vec![crate::providers::local::LOCAL_MODEL.to_string()]
        }
    }

    /// Handle one message body. Never panics; every error becomes an outcome.
    pub async fn handle(&self, body: &str, receive_count: u32) -> AnalyzeOutcome {
        let job = match AnalysisJob::parse(body) {
            Ok(j) => j,
            Err(e) => {
                // Never dropped: it goes back until the queue's redrive moves it to the DLQ.
                warn!(error = %e, receive_count, "malformed job message; kept for the dead-letter queue");
                return retry_later(receive_count, format!("malformed job message: {e}"));
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
        self.give_up_if_last(&job, receive_count, outcome).await
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
        if let AnalyzeOutcome::Retry { reason, .. } = &outcome {
            if max > 0 && receive_count >= max {
                let why = format!("gave up after {receive_count} deliveries: {reason}");
                let now = rfc3339(self.clock.now_ms());
                if let Err(e) = self
                    .repo
                    .mark_failed(&job.tenant, &job.image_id, &why, &now)
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
            .mark_failed(&job.tenant, &job.image_id, reason, &now)
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
        let estimated_cost = if self.provider.is_paid() {
            record.estimate.as_ref().map(|e| e.cost_usd).unwrap_or(0.0)
        } else {
            0.0
        };
        // One owner per handling: two copies of one job (or two images with the same bytes)
        // must never both hold the claim on a key.
        let owner = uuid::Uuid::new_v4().to_string();
        let chain = self.chain();
        let mut jpeg: Option<Arc<Vec<u8>>> = None;
        let mut last_retry: Option<(Duration, String)> = None;
        for (i, model) in chain.iter().enumerate() {
            // The key names the model that answers, so a fallback's answer is never served
            // later as the primary model's.
            let key = idempotency_key(&job.sha256, model, &self.settings.prompt_version);
            let now = self.clock.now_ms();
            match self
                .repo
                .claim(&key, &owner, self.settings.claim_lease, now)
                .await?
            {
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
                None => match self
                    .blobs
                    .get(&job.resized_key, self.settings.prepare.max_input_bytes)
                    .await
                {
                    Ok(bytes) => jpeg.insert(Arc::new(bytes)).clone(),
                    Err(e) => {
                        self.release(&key, &owner).await;
                        return Err(e);
                    }
                },
            };
            let step = self
                .try_model(job, model, &key, image, i + 1 < chain.len(), receive_count)
                .await;
            match step {
                // The provider answered and was paid: the claim stays ours whatever happens
                // next, so no retry can call it again while the lease lasts.
                Step::Answered(result) => {
                    return self.store_result(job, &result, estimated_cost).await
                }
                Step::Fallback { delay, reason } => {
                    self.release(&key, &owner).await;
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
    /// message back would mean paying the provider again once the claim's lease ends.
    async fn store_result(
        &self,
        job: &AnalysisJob,
        result: &AnalysisResult,
        estimated_cost: f64,
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
                Ok(Completion::AlreadyDone) => return Ok(AnalyzeOutcome::AlreadyDone),
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

    /// One model of the chain: reserve, call (retrying invalid output once), classify.
    async fn try_model(
        &self,
        job: &AnalysisJob,
        model: &str,
        key: &str,
        jpeg: Arc<Vec<u8>>,
        has_fallback: bool,
        receive_count: u32,
    ) -> Step {
        let table = PriceTable::builtin();
        let params = self.settings.estimate_params();
        let request = VisionRequest {
            model: model.to_string(),
            jpeg,
            width: job.width,
            height: job.height,
            prompt: self.settings.prompt.clone(),
            max_output_tokens: self.settings.max_output_tokens,
            detail: self.settings.detail,
        };
        // Reserve image + prompt + max output tokens and one request.
        let reserve_tokens = if self.provider.is_paid() {
            table
                .model(model)
                .map(|m| m.image_tokens(job.width, job.height, params.detail))
                .unwrap_or(0)
                + params.prompt_tokens
                + u64::from(self.settings.max_output_tokens)
        } else {
            0
        };
        let reservation = match self.reserve(model, reserve_tokens).await {
            Ok(r) => r,
            Err(Denied::Wait(d)) if has_fallback => {
                info!(
                    model,
                    wait_ms = d.as_millis() as u64,
                    "limiter full; trying fallback model"
                );
                return Step::Fallback {
                    delay: d,
                    reason: format!("rate limit for {model}"),
                };
            }
            Err(Denied::Wait(d)) => {
                // Spread instances that all hit the same limit.
                let spread = d.mul_f64(1.0 + 0.2 * jitter());
                return Step::Retry {
                    delay: spread,
                    reason: format!("local rate limit for {model}"),
                };
            }
        };
        let mut attempt = self.provider.analyze(&request).await;
        self.finish(model, reservation, &attempt);
        // Tokens billed for an invalid answer are real cost: carried into the result.
        let mut wasted = Usage::default();
        if let Err(e) = &attempt {
            if e.kind == FailureKind::InvalidOutput {
                // One in-place retry for invalid output, then it is permanent.
                wasted = e.usage.unwrap_or_default();
                let Ok(r2) = self.reserve(model, reserve_tokens).await else {
                    return Step::Retry {
                        delay: Duration::from_secs(2),
                        reason: "invalid output; limiter full for the retry".into(),
                    };
                };
                attempt = self.provider.analyze(&request).await;
                self.finish(model, r2, &attempt);
            }
        }
        match attempt {
            Ok(resp) => {
                let usage = Usage {
                    input_tokens: resp.usage.input_tokens + wasted.input_tokens,
                    output_tokens: resp.usage.output_tokens + wasted.output_tokens,
                    cached_tokens: resp.usage.cached_tokens + wasted.cached_tokens,
                };
                let cost = if self.provider.is_paid() {
                    table
                        .model(&resp.model)
                        .or_else(|_| table.model(model))
                        .map(|p| p.cost_usd(&usage))
                        .unwrap_or(0.0)
                } else {
                    0.0
                };
                Step::Answered(AnalysisResult {
                    provider: self.provider.name().to_string(),
                    model: model.to_string(),
                    analysis: resp.analysis,
                    usage,
                    cost_usd: cost,
                    cached: false,
                    idempotency_key: key.to_string(),
                    prompt_version: self.settings.prompt_version.clone(),
                    price_version: table.version().to_string(),
                    completed_at: rfc3339(self.clock.now_ms()),
                })
            }
            Err(e) => match classify(&e.kind) {
                RetryClass::Permanent => Step::Fail(format!("{model}: {}", e.message)),
                RetryClass::Transient => {
                    let delay = retry_delay(&e.kind, receive_count, jitter());
                    let long_wait = matches!(
                        e.kind,
                        FailureKind::Http { retry_after: Some(d), .. } if d >= self.settings.fallback_after
                    );
                    if has_fallback
                        && (long_wait || !matches!(e.kind, FailureKind::Http { status: 429, .. }))
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
            },
        }
    }

    /// Reserve against the model's limiter, waiting in place only for short waits.
    async fn reserve(&self, model: &str, tokens: u64) -> Result<Reservation, Denied> {
        let deadline = self.clock.now_ms() + self.settings.max_inline_wait.as_millis() as u64;
        loop {
            let now = self.clock.now_ms();
            match self
                .limiters
                .with(model, now, |l| l.try_reserve(tokens, now))
            {
                Ok(r) => return Ok(r),
                Err(Denied::Wait(d)) if now + (d.as_millis() as u64) <= deadline => {
                    tokio::time::sleep(d.max(Duration::from_millis(5))).await;
                }
                Err(other) => return Err(other),
            }
        }
    }

    fn finish(
        &self,
        model: &str,
        reservation: Reservation,
        attempt: &Result<crate::ports::VisionResponse, ProviderError>,
    ) {
        match attempt {
            Ok(resp) => self.settle(
                model,
                reservation,
                Some(resp.usage.input_tokens + resp.usage.output_tokens),
                &resp.rate,
            ),
            Err(e) => {
                self.settle(
                    model,
                    reservation,
                    e.usage.map(|u| u.input_tokens + u.output_tokens),
                    &e.rate,
                );
                if let FailureKind::Http {
                    status: 429,
                    retry_after,
                } = &e.kind
                {
                    let wait = retry_after.unwrap_or(Duration::from_secs(1));
                    let now = self.clock.now_ms();
                    self.limiters.with(model, now, |l| l.block_for(wait, now));
                }
            }
        }
    }

    /// Correct the reservation with what was used and follow the provider's headers.
    fn settle(
        &self,
        model: &str,
        reservation: Reservation,
        used: Option<u64>,
        rate: &crate::ports::RateInfo,
    ) {
        let now = self.clock.now_ms();
        self.limiters.with(model, now, |l| {
            match used {
                Some(tokens) => l.correct(reservation, tokens, now),
                // Unknown usage (errors before the model ran): keep the request, refund tokens.
                None => l.correct(reservation, 0, now),
            }
            l.observe(rate, now);
        });
    }
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
