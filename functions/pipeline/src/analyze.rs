//! Use-case: one queued job → cached result, or a rate-limited provider call with fallback,
//! written exactly once. The caller maps the outcome to delete / retry-later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sightline_core::limiter::{Denied, RateLimiter, Reservation};
use sightline_core::model::{idempotency_key, AnalysisJob, AnalysisResult};
use sightline_core::pricing::PriceTable;
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
    /// Identifies this worker in idempotency claims.
    pub owner: String,
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
            owner: uuid::Uuid::new_v4().to_string(),
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
                warn!(error = %e, "dropping malformed job message");
                return AnalyzeOutcome::Failed(e);
            }
        };
        match self.handle_job(&job, receive_count).await {
            Ok(o) => o,
            Err(e) if e.is_transient() => AnalyzeOutcome::Retry {
                delay: retry_delay(&FailureKind::Connection, receive_count, jitter()),
                reason: e.to_string(),
            },
            Err(StoreError::NotFound(what)) => {
                let reason = format!("{what} not found");
                self.fail(&job, &reason).await
            }
            Err(e) => AnalyzeOutcome::Retry {
                // Unknown storage trouble: retry; the DLQ catches what never heals.
                delay: retry_delay(&FailureKind::Connection, receive_count, jitter()),
                reason: e.to_string(),
            },
        }
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
            return Ok(AnalyzeOutcome::Failed(format!(
                "image {}/{} has no record",
                job.tenant, job.image_id
            )));
        };
        if record.result.is_some() {
            return Ok(AnalyzeOutcome::AlreadyDone);
        }
        let estimated_cost = record.estimate.as_ref().map(|e| e.cost_usd).unwrap_or(0.0);
        let chain = self.chain();
        let primary = chain[0].clone();
        let key = idempotency_key(&job.sha256, &primary, &self.settings.prompt_version);
        match self
            .repo
            .claim(
                &key,
                &self.owner,
                self.settings.claim_lease,
                self.clock.now_ms(),
            )
            .await?
        {
            Claim::Cached(prev) => {
                let result = AnalysisResult {
                    usage: Default::default(),
                    cost_usd: 0.0,
                    cached: true,
                    completed_at: rfc3339(self.clock.now_ms()),
                    ..*prev
                };
                return Ok(
                    match self
                        .repo
                        .complete(&job.tenant, &job.image_id, &result, 0.0)
                        .await?
                    {
                        Completion::Stored => AnalyzeOutcome::Cached,
                        Completion::AlreadyDone => AnalyzeOutcome::AlreadyDone,
                    },
                );
            }
            Claim::Busy { retry_in } => {
                return Ok(AnalyzeOutcome::Retry {
                    delay: retry_in.max(Duration::from_secs(1)),
                    reason: "the same image is being analysed by another worker".into(),
                })
            }
            Claim::Acquired => {}
        }
        let outcome = self
            .call_chain(job, &chain, &key, receive_count, estimated_cost)
            .await;
        match &outcome {
            Ok(AnalyzeOutcome::Done { .. })
            | Ok(AnalyzeOutcome::AlreadyDone)
            | Ok(AnalyzeOutcome::Cached) => {}
            _ => {
                // Let the next attempt claim at once.
                if let Err(e) = self.repo.release_claim(&key, &self.owner).await {
                    debug!(error = %e, "could not release claim (lease will expire)");
                }
            }
        }
        outcome
    }

    async fn call_chain(
        &self,
        job: &AnalysisJob,
        chain: &[String],
        key: &str,
        receive_count: u32,
        estimated_cost: f64,
    ) -> Result<AnalyzeOutcome, StoreError> {
        let jpeg = Arc::new(
            self.blobs
                .get(&job.resized_key, self.settings.prepare.max_input_bytes)
                .await?,
        );
        let table = PriceTable::builtin();
        let params = self.settings.estimate_params();
        let mut last_retry: Option<(Duration, String)> = None;
        for (i, model) in chain.iter().enumerate() {
            let has_fallback = i + 1 < chain.len();
            let request = VisionRequest {
                model: model.clone(),
                jpeg: jpeg.clone(),
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
                Err(Denied::TooLarge { tokens, tpm }) => {
                    let reason = format!(
                        "request needs {tokens} tokens, over the per-instance TPM limit {tpm}"
                    );
                    return Ok(self.fail(job, &reason).await);
                }
                Err(Denied::Wait(d)) => {
                    if has_fallback {
                        info!(
                            model,
                            wait_ms = d.as_millis() as u64,
                            "limiter full; trying fallback model"
                        );
                        last_retry = Some((d, format!("rate limit for {model}")));
                        continue;
                    }
                    return Ok(AnalyzeOutcome::Retry {
                        delay: d,
                        reason: format!("local rate limit for {model}"),
                    });
                }
            };
            let mut attempt = self.provider.analyze(&request).await;
            if let Err(e) = &attempt {
                if e.kind == FailureKind::InvalidOutput {
                    // One in-place retry for invalid output, then it is permanent.
                    self.settle(
                        model,
                        reservation,
                        e.usage.map(|u| u.input_tokens + u.output_tokens),
                        &e.rate,
                    );
                    let again = self.reserve(model, reserve_tokens).await;
                    let Ok(r2) = again else {
                        return Ok(AnalyzeOutcome::Retry {
                            delay: Duration::from_secs(2),
                            reason: "invalid output; limiter full for the retry".into(),
                        });
                    };
                    attempt = self.provider.analyze(&request).await;
                    self.finish(model, r2, &attempt);
                } else {
                    self.finish(model, reservation, &attempt);
                }
            } else {
                self.finish(model, reservation, &attempt);
            }
            match attempt {
                Ok(resp) => {
                    let price = table.model(&resp.model).or_else(|_| table.model(model));
                    let cost = if self.provider.is_paid() {
                        price.map(|p| p.cost_usd(&resp.usage)).unwrap_or(0.0)
                    } else {
                        0.0
                    };
                    let result = AnalysisResult {
                        provider: self.provider.name().to_string(),
                        model: model.clone(),
                        analysis: resp.analysis,
                        usage: resp.usage,
                        cost_usd: cost,
                        cached: false,
                        idempotency_key: key.to_string(),
                        prompt_version: self.settings.prompt_version.clone(),
                        price_version: table.version().to_string(),
                        completed_at: rfc3339(self.clock.now_ms()),
                    };
                    let est = if self.provider.is_paid() {
                        estimated_cost
                    } else {
                        0.0
                    };
                    return Ok(
                        match self
                            .repo
                            .complete(&job.tenant, &job.image_id, &result, est)
                            .await?
                        {
                            Completion::Stored => AnalyzeOutcome::Done {
                                model: model.clone(),
                                cost_usd: cost,
                            },
                            Completion::AlreadyDone => AnalyzeOutcome::AlreadyDone,
                        },
                    );
                }
                Err(e) => match classify(&e.kind) {
                    RetryClass::Permanent => {
                        let reason = format!("{model}: {}", e.message);
                        return Ok(self.fail(job, &reason).await);
                    }
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
                            last_retry = Some((delay, e.message.clone()));
                            continue;
                        }
                        return Ok(AnalyzeOutcome::Retry {
                            delay,
                            reason: format!("{model}: {}", e.message),
                        });
                    }
                },
            }
        }
        let (delay, reason) =
            last_retry.unwrap_or((Duration::from_secs(5), "no model available".into()));
        Ok(AnalyzeOutcome::Retry { delay, reason })
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
            l.observe(rate.remaining_requests, rate.remaining_tokens, now);
        });
    }
}

/// Uniform [0, 1) for backoff jitter.
fn jitter() -> f64 {
    rand::random::<f64>()
}
