//! Pipeline settings shared by the Lambdas and the local runtime.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sightline_core::model::Detail;
use sightline_core::pricing::{text_tokens, EstimateParams, PriceTable};
use sightline_core::PrepareOptions;

/// The prompt asking for the analysis object; its version is part of the idempotency key.
pub const DEFAULT_PROMPT: &str = "Analyse this image. Answer with one JSON object and nothing else, with keys: \
\"description\" (one or two sentences), \"category\" (one word), \"tags\" (up to 10 lowercase strings), \
\"objects\" (visible objects, strings), \"text\" (visible text, empty string if none), \
\"quality_issues\" (strings such as \"blurry\", \"dark\", \"overexposed\"; empty if none).";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub prepare: PrepareOptions,
    /// Model whose price is estimated and, with a paid provider, called.
    pub model: String,
    /// Tried in order when the primary model is throttled for long or unavailable.
    pub fallback_models: Vec<String>,
    pub prompt: String,
    pub prompt_version: String,
    pub max_output_tokens: u32,
    pub detail: Detail,
    /// Global provider limits (0 = unlimited).
    pub rpm: u64,
    pub tpm: u64,
    /// Instances sharing the global limits (SQS MaximumConcurrency on AWS; 1 locally).
    pub max_concurrency: u64,
    /// Longest wait for our own limiter done in place; longer waits go back to the queue.
    pub max_inline_wait: Duration,
    /// A Retry-After at least this long switches to the fallback model at once.
    pub fallback_after: Duration,
    /// In-flight claim lease on an idempotency key; longer than one model's worst case
    /// (two provider calls plus limiter waits), see [`Settings::fit_lease_to`].
    pub claim_lease: Duration,
    /// Deliveries before the queue moves a message to its DLQ (SQS maxReceiveCount); the
    /// last one marks the image failed if it still cannot be analysed. 0 = unknown.
    pub max_receives: u32,
    /// Upload URL lifetime.
    pub upload_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            prepare: PrepareOptions::default(),
            model: "gpt-4.1-mini".into(),
            fallback_models: Vec::new(),
            prompt: DEFAULT_PROMPT.into(),
            prompt_version: "v1".into(),
            max_output_tokens: 400,
            detail: Detail::High,
            rpm: 500,
            tpm: 200_000,
            max_concurrency: 1,
            max_inline_wait: Duration::from_secs(2),
            fallback_after: Duration::from_secs(10),
            claim_lease: Duration::from_secs(120),
            max_receives: 5,
            upload_ttl: Duration::from_secs(900),
        }
    }
}

impl Settings {
    /// Check names against the price table so a typo fails at start, not per image.
    pub fn validate(&self) -> Result<(), String> {
        let table = PriceTable::builtin();
        for m in std::iter::once(&self.model).chain(self.fallback_models.iter()) {
            table.model(m).map_err(|e| e.to_string())?;
        }
        if self.prompt_version.is_empty() || self.prompt_version.contains(':') {
            return Err("prompt version must be non-empty and contain no ':'".into());
        }
        if self.max_output_tokens == 0 {
            return Err("max_output_tokens must be > 0".into());
        }
        Ok(())
    }

    /// What an estimate assumes besides the image.
    pub fn estimate_params(&self) -> EstimateParams {
        EstimateParams {
            detail: self.detail,
            prompt_tokens: text_tokens(&self.prompt) + 10,
            expected_output_tokens: EstimateParams::default()
                .expected_output_tokens
                .min(u64::from(self.max_output_tokens)),
        }
    }

    /// Make the claim lease outlast one model's worst case with this provider timeout: an
    /// invalid-output retry (two calls), two in-place limiter waits and a margin. A lease that
    /// ends while the call is still running would let a redelivery pay for the same image.
    pub fn fit_lease_to(&mut self, provider_timeout: Duration) {
        let worst = provider_timeout * 2 + self.max_inline_wait * 2 + Duration::from_secs(30);
        self.claim_lease = self.claim_lease.max(worst);
    }

    /// Models in the order they are tried.
    pub fn model_chain(&self) -> Vec<String> {
        let mut chain = vec![self.model.clone()];
        for m in &self.fallback_models {
            if !chain.contains(m) {
                chain.push(m.clone());
            }
        }
        chain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_typos_are_caught() {
        Settings::default().validate().unwrap();
        let s = Settings {
            fallback_models: vec!["gpt-4o".into(), "gpt-4o".into(), "nope".into()],
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("nope"));
        let s = Settings {
            fallback_models: vec!["gpt-4o".into(), "gpt-4o".into()],
            ..Default::default()
        };
        assert_eq!(s.model_chain(), vec!["gpt-4.1-mini", "gpt-4o"]);
    }
}
