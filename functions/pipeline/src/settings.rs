//! Pipeline settings shared by the Lambdas and the local runtime.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sightline_core::model::{CacheScope, Detail};
use sightline_core::pricing::{EstimateParams, PriceTable};
use sightline_core::PrepareOptions;

/// The prompt asking for the analysis object (its version is part of the idempotency key).
/// It lives in the core, so the browser's estimate counts the same prompt as the server's.
pub use sightline_core::pricing::DEFAULT_PROMPT;

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
    /// Reuse answers across tenants for identical image bytes (off: each tenant has its own
    /// cache, so one tenant's answer is never served to another).
    pub share_cache_across_tenants: bool,
    /// How long an uploaded original may wait for its resize, or a recorded job for its queue
    /// message, before the reconciler does the step again.
    pub reconcile_after: Duration,
    /// A queued image untouched this long gets its job sent again (duplicates are harmless:
    /// the claim and the ledger are exactly-once). Each retry of its job moves this on, and
    /// the local queue drops a re-send while the image's job is still queued; on SQS a job
    /// that only waits in a long backlog is sent once more per period.
    pub stuck_after: Duration,
    /// Period of the reconciler's sweep in `sightline serve` (on AWS: the schedule).
    pub reconcile_every: Duration,
    /// A `pending` record (upload URL handed out, nothing uploaded) is deleted after this.
    pub pending_ttl: Duration,
    /// Memory that concurrent resizes may budget together (each weighs what its header says
    /// it needs); uploads past it wait for room.
    pub resize_memory_budget: u64,
    /// Resizes admitted at once (each holds its input bytes while it waits for memory).
    pub max_concurrent_resizes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            prepare: PrepareOptions::default(),
            model: "gpt-4.1-mini".into(),
            fallback_models: Vec::new(),
            prompt: DEFAULT_PROMPT.into(),
            prompt_version: "v1".into(),
            max_output_tokens: sightline_core::pricing::DEFAULT_MAX_OUTPUT_TOKENS,
            detail: Detail::High,
            rpm: 500,
            tpm: 200_000,
            max_concurrency: 1,
            max_inline_wait: Duration::from_secs(2),
            fallback_after: Duration::from_secs(10),
            claim_lease: Duration::from_secs(120),
            max_receives: 5,
            upload_ttl: Duration::from_secs(900),
            share_cache_across_tenants: false,
            reconcile_after: Duration::from_secs(60),
            stuck_after: Duration::from_secs(6 * 3600),
            reconcile_every: Duration::from_secs(30),
            pending_ttl: Duration::from_secs(7 * 86_400),
            resize_memory_budget: 1 << 30,
            max_concurrent_resizes: 8,
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
        if self.resize_memory_budget < 64 << 20 {
            return Err("the resize memory budget must be at least 64 MB".into());
        }
        Ok(())
    }

    /// Whose answers the idempotency cache may reuse for an image of `tenant`.
    pub fn cache_scope<'a>(&self, tenant: &'a str) -> CacheScope<'a> {
        if self.share_cache_across_tenants {
            CacheScope::Shared
        } else {
            CacheScope::Tenant(tenant)
        }
    }

    /// Apply the `SIGHTLINE_*` pipeline settings found by `get` (environment lookups; empty
    /// values count as unset). Shared by the Lambdas and the CLI, so a variable means the same
    /// everywhere.
    pub fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
        let var = |name: &str| {
            get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        fn num<T: std::str::FromStr>(name: &str, v: Option<String>) -> Result<Option<T>, String> {
            v.map(|v| {
                v.parse()
                    .map_err(|_| format!("{name}={v:?} is not a valid number"))
            })
            .transpose()
        }
        fn flag(name: &str, v: Option<String>) -> Result<Option<bool>, String> {
            v.map(|v| match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(format!("{name}={v:?} is not true or false")),
            })
            .transpose()
        }
        let secs = |name: &str| num::<u64>(name, var(name)).map(|v| v.map(Duration::from_secs));
        if let Some(m) = var("SIGHTLINE_MODEL") {
            self.model = m;
        }
        if let Some(f) = var("SIGHTLINE_FALLBACK_MODELS") {
            self.fallback_models = f
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(v) = var("SIGHTLINE_PROMPT_VERSION") {
            self.prompt_version = v;
        }
        if let Some(v) = num("SIGHTLINE_RPM", var("SIGHTLINE_RPM"))? {
            self.rpm = v;
        }
        if let Some(v) = num("SIGHTLINE_TPM", var("SIGHTLINE_TPM"))? {
            self.tpm = v;
        }
        if let Some(v) = num::<u64>(
            "SIGHTLINE_MAX_CONCURRENCY",
            var("SIGHTLINE_MAX_CONCURRENCY"),
        )? {
            self.max_concurrency = v.max(1);
        }
        if let Some(v) = num("SIGHTLINE_MAX_EDGE", var("SIGHTLINE_MAX_EDGE"))? {
            self.prepare.max_edge = v;
        }
        if let Some(v) = num(
            "SIGHTLINE_MAX_INPUT_BYTES",
            var("SIGHTLINE_MAX_INPUT_BYTES"),
        )? {
            self.prepare.max_input_bytes = v;
        }
        if let Some(v) = num("SIGHTLINE_MAX_PIXELS", var("SIGHTLINE_MAX_PIXELS"))? {
            self.prepare.max_pixels = v;
        }
        if let Some(v) = num::<u64>(
            "SIGHTLINE_MAX_INLINE_WAIT_MS",
            var("SIGHTLINE_MAX_INLINE_WAIT_MS"),
        )? {
            self.max_inline_wait = Duration::from_millis(v);
        }
        // The analyze queue's maxReceiveCount: the last delivery marks the image failed.
        if let Some(v) = num("SIGHTLINE_MAX_RECEIVES", var("SIGHTLINE_MAX_RECEIVES"))? {
            self.max_receives = v;
        }
        if let Some(v) = flag("SIGHTLINE_SHARE_CACHE", var("SIGHTLINE_SHARE_CACHE"))? {
            self.share_cache_across_tenants = v;
        }
        if let Some(v) = secs("SIGHTLINE_RECONCILE_AFTER_SECS")? {
            self.reconcile_after = v;
        }
        if let Some(v) = secs("SIGHTLINE_STUCK_AFTER_SECS")? {
            self.stuck_after = v;
        }
        if let Some(v) = secs("SIGHTLINE_RECONCILE_EVERY_SECS")? {
            self.reconcile_every = v.max(Duration::from_secs(1));
        }
        if let Some(v) = secs("SIGHTLINE_PENDING_TTL_SECS")? {
            self.pending_ttl = v;
        }
        if let Some(v) = num::<u64>(
            "SIGHTLINE_RESIZE_MEMORY_MB",
            var("SIGHTLINE_RESIZE_MEMORY_MB"),
        )? {
            self.resize_memory_budget = v.saturating_mul(1 << 20);
        }
        if let Some(v) = num::<usize>(
            "SIGHTLINE_MAX_CONCURRENT_RESIZES",
            var("SIGHTLINE_MAX_CONCURRENT_RESIZES"),
        )? {
            self.max_concurrent_resizes = v.max(1);
        }
        Ok(())
    }

    /// What an estimate assumes besides the image: the core's one rule for the prompt and
    /// output tokens, so the widget, `estimate` and the recorded estimate agree.
    pub fn estimate_params(&self) -> EstimateParams {
        EstimateParams::for_prompt(&self.prompt, self.max_output_tokens, self.detail)
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

    #[test]
    fn the_default_settings_estimate_like_the_browser_does() {
        // The WASM client prices with EstimateParams::default(): the same numbers as the server.
        assert_eq!(
            Settings::default().estimate_params(),
            EstimateParams::default()
        );
    }

    #[test]
    fn environment_settings_parse_and_bad_values_are_named() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let mut s = Settings::default();
        s.apply_env(&env(&[
            ("SIGHTLINE_SHARE_CACHE", "true"),
            ("SIGHTLINE_RECONCILE_AFTER_SECS", "5"),
            ("SIGHTLINE_RESIZE_MEMORY_MB", "512"),
            ("SIGHTLINE_RPM", " "),
        ]))
        .unwrap();
        assert!(s.share_cache_across_tenants);
        assert_eq!(s.reconcile_after, Duration::from_secs(5));
        assert_eq!(s.resize_memory_budget, 512 << 20);
        assert_eq!(s.rpm, Settings::default().rpm, "empty means unset");
        assert_eq!(s.cache_scope("t"), CacheScope::Shared);
        let err = Settings::default()
            .apply_env(&env(&[("SIGHTLINE_SHARE_CACHE", "maybe")]))
            .unwrap_err();
        assert!(err.contains("SIGHTLINE_SHARE_CACHE"), "{err}");
        let err = Settings::default()
            .apply_env(&env(&[("SIGHTLINE_TPM", "lots")]))
            .unwrap_err();
        assert!(err.contains("SIGHTLINE_TPM"), "{err}");
        assert_eq!(
            Settings::default().cache_scope("t"),
            CacheScope::Tenant("t")
        );
    }
}
