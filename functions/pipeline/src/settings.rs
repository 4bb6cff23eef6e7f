//! Pipeline settings shared by the Lambdas and the local runtime: one list of settings
//! ([`SETTINGS`]), one way to apply a value (from `sightline.toml`, a `SIGHTLINE_*` variable
//! or a command-line flag), one validation, one worst-case timing formula.
//!
//! Locally the order is defaults < file < environment < flags; on Lambda only the environment
//! (set by the SAM template) applies. The README's settings table is generated from
//! [`SETTINGS`] and checked by a test.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sightline_core::budget::BudgetCaps;
use sightline_core::model::{AnswerParams, CacheScope, Detail, Lane};
use sightline_core::pricing::{EstimateParams, PriceTable, PricingError};
use sightline_core::PrepareOptions;

/// The prompt asking for the analysis object (its version is part of the idempotency key).
/// It lives in the core, so the browser's estimate counts the same prompt as the server's.
pub use sightline_core::pricing::DEFAULT_PROMPT;

/// The OpenAI API; any OpenAI-compatible endpoint can replace it (`OPENAI_BASE_URL`).
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// The Anthropic API (`ANTHROPIC_BASE_URL`); the provider posts to `{base}/v1/messages`.
pub const DEFAULT_ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// Longest output edge that may be asked for (larger is no image a model takes).
pub const MAX_EDGE_LIMIT: u32 = 16_384;

/// Time a record needs besides its provider calls and limiter waits: reads and writes.
const RECORD_WRITES: Duration = Duration::from_secs(5);
/// What a claim lease keeps over a record's worst case (clock skew, a slow store).
const LEASE_MARGIN: Duration = Duration::from_secs(25);
/// Image generation can take a minute or more at high quality: a call is given at least this
/// long, whatever the vision calls' timeout.
pub const MIN_GENERATION_TIMEOUT: Duration = Duration::from_secs(180);

/// Which vision provider analyses images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The offline analyzer: $0, deterministic, no network.
    Local,
    /// Any OpenAI-compatible chat completions API.
    OpenAi,
    /// Anthropic's Messages API (Claude models only).
    Anthropic,
    /// Amazon Bedrock's Converse API (Claude and Nova models); AWS credentials, no key.
    Bedrock,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 4] = [
        ProviderKind::Local,
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Bedrock,
    ];

    /// The name used in settings and stored with results.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Bedrock => "bedrock",
        }
    }

    pub fn parse(value: &str) -> Option<ProviderKind> {
        let value = value.trim();
        ProviderKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(value))
    }
}

/// Which embedder gives done images their vector (similarity and text search).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    /// No vectors: `similar` and vector search are off (keyword search still works).
    Off,
    /// The offline visual embedding ($0): near-duplicates and look-alikes, no words.
    Local,
    /// An OpenAI-compatible multimodal `/v1/embeddings` (a CLIP-serving gateway).
    OpenAi,
    /// Amazon Bedrock (Titan Multimodal Embeddings, Nova Multimodal Embeddings).
    Bedrock,
}

impl EmbedderKind {
    pub const ALL: [EmbedderKind; 4] = [
        EmbedderKind::Off,
        EmbedderKind::Local,
        EmbedderKind::OpenAi,
        EmbedderKind::Bedrock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EmbedderKind::Off => "off",
            EmbedderKind::Local => "local",
            EmbedderKind::OpenAi => "openai",
            EmbedderKind::Bedrock => "bedrock",
        }
    }

    pub fn parse(value: &str) -> Option<EmbedderKind> {
        let value = value.trim();
        EmbedderKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(value))
    }

    /// The model used when none is set.
    pub fn default_model(self) -> Option<&'static str> {
        match self {
            EmbedderKind::Off => None,
            EmbedderKind::Local => Some(sightline_core::embed::LOCAL_EMBED_MODEL),
            EmbedderKind::OpenAi => Some("clip-vit-b-32"),
            EmbedderKind::Bedrock => Some("amazon.titan-embed-image-v1"),
        }
    }
}

/// Whether an image that looks like one analysed before reuses its analysis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dedupe {
    /// Every image with new bytes is analysed (identical bytes are cached anyway).
    #[default]
    Off,
    /// A near-duplicate (resized, recompressed, slightly cropped, brightened or mirrored copy)
    /// of an image analysed with the same model and prompt version reuses its analysis at $0.
    Near,
}

impl Dedupe {
    pub fn as_str(self) -> &'static str {
        match self {
            Dedupe::Off => "off",
            Dedupe::Near => "near",
        }
    }

    pub fn parse(value: &str) -> Option<Dedupe> {
        match value.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => Some(Dedupe::Off),
            "near" => Some(Dedupe::Near),
            _ => None,
        }
    }
}

/// Where the settings are used: the runtime picks the defaults that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `sightline run` / `serve`: one long process.
    Local,
    /// The Lambda functions.
    Lambda,
}

/// A setting that could not be applied, or settings that do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{origin}={value:?}: expected {expected}")]
    BadValue {
        /// Where the value came from: `SIGHTLINE_RPM`, `rpm in sightline.toml`, `--rpm`.
        origin: String,
        value: String,
        expected: &'static str,
    },
    #[error("unknown setting {key:?}; known settings: {known}")]
    UnknownKey { key: String, known: String },
    #[error(transparent)]
    UnknownModel(#[from] PricingError),
    #[error("prompt_version must be non-empty and contain no ':' (got {0:?})")]
    PromptVersion(String),
    #[error("max_output_tokens must be > 0")]
    NoOutputTokens,
    #[error("max_edge must be 1..={MAX_EDGE_LIMIT} (got {0})")]
    MaxEdge(u32),
    #[error("resize_memory_mb must be at least 64 (got {0} MB)")]
    ResizeBudget(u64),
    #[error("quality must be 1..=100 (got {0})")]
    Quality(u8),
    #[error("embedding model {model} returns {allowed:?} dimensions, not {dims}")]
    EmbeddingDims {
        model: String,
        dims: u32,
        allowed: Vec<u32>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub prepare: PrepareOptions,
    /// None: chosen by the model and the keys configured
    /// ([`crate::providers::select::provider_kind`]).
    pub provider: Option<ProviderKind>,
    pub openai_base_url: String,
    pub anthropic_base_url: String,
    /// One provider request's timeout.
    pub provider_timeout: Duration,
    /// Model whose price is estimated and, with a paid provider, called.
    pub model: String,
    /// Tried in order when the primary model is throttled for long or unavailable.
    pub fallback_models: Vec<String>,
    pub prompt: String,
    pub prompt_version: String,
    pub max_output_tokens: u32,
    /// Image detail sent to the provider, unless the tenant or the upload asks otherwise.
    pub detail: Detail,
    /// Detail per tenant (over `detail`; an upload's own request is over both).
    pub tenant_detail: BTreeMap<String, Detail>,
    /// Global provider limits (0 = unlimited).
    pub rpm: u64,
    pub tpm: u64,
    /// Instances sharing the global limits (SQS MaximumConcurrency on AWS; 1 locally).
    pub max_concurrency: u64,
    /// Longest wait for our own limiter done in place; longer waits go back to the queue.
    pub max_inline_wait: Duration,
    /// One limit shared through the store by every process and instance (the limits are
    /// global), instead of each taking `rpm`/`tpm` ÷ `max_concurrency` on its own.
    pub shared_limit: bool,
    /// The limiter's burst, as time at the steady rate (see
    /// [`sightline_core::limiter::DEFAULT_BURST`]).
    pub limit_burst: Duration,
    /// A Retry-After at least this long switches to the fallback model at once.
    pub fallback_after: Duration,
    /// In-flight claim lease on an idempotency key; never shorter than
    /// [`Settings::claim_lease`] makes it.
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
    /// Spending caps of every tenant without its own budget item (none by default).
    pub budget: BudgetCaps,
    /// What a job refused by its tenant's budget does.
    pub over_budget: OverBudget,
    /// The key of the admin routes (`x-admin-key`); None: they answer 403. Never serialized.
    #[serde(skip)]
    pub admin_api_key: Option<String>,
    /// The lane of an image that does not ask for one and matches no `batch_key_prefixes`.
    pub lane: Lane,
    /// Upload keys starting with one of these go to the batch lane (S3 drops and local paths).
    pub batch_key_prefixes: Vec<String>,
    /// The oldest pending batch request waits at most this long before a batch is submitted.
    pub batch_max_wait: Duration,
    /// Requests per batch (each provider's own limit applies too).
    pub batch_max_requests: usize,
    /// Bytes of one batch's input (each provider's own limit applies too); the submitter
    /// holds one batch's input in memory while it uploads it.
    pub batch_max_bytes: usize,
    /// Batches a request may end in without an answer (transient errors, expiry) before its
    /// images go to the real-time lane.
    pub batch_attempts: u32,
    /// How often open batches are polled and pending requests looked at (local; on AWS the
    /// schedule of the batch function).
    pub batch_poll_every: Duration,
    /// Which embedder gives done images their vector.
    pub embedder: EmbedderKind,
    /// The embedding model (None: the embedder's default, [`EmbedderKind::default_model`]).
    pub embedding_model: Option<String>,
    /// The vector size asked for (None: the model's default dimension).
    pub embedding_dims: Option<u32>,
    /// Base URL of the OpenAI-compatible embeddings API (None: `openai_base_url`).
    pub embedding_base_url: Option<String>,
    /// Requests per minute to the embedding model, per instance like `rpm` (0 = unlimited;
    /// the offline embedder is never limited).
    pub embedding_rpm: u64,
    /// Near-duplicate skip for tenants without their own choice.
    pub dedupe: Dedupe,
    /// Near-duplicate skip per tenant (over `dedupe`).
    pub tenant_dedupe: BTreeMap<String, Dedupe>,
    /// The templates file the API's named templates come from (None: inline templates only).
    pub templates_file: Option<PathBuf>,
    /// Generated images per minute to each image model, per instance like `rpm` (0 = unlimited).
    pub generation_ipm: u64,
    /// Image models tried, in order, when a row's model is throttled for long or down.
    pub generation_fallback_models: Vec<String>,
    /// Generate a row once more when its image fails its check.
    pub regenerate_on_mismatch: bool,
    /// The `whsec_` secret webhooks are signed with, for tenants without their own.
    pub webhook_secret: Option<String>,
    /// Webhook secrets per tenant (over `webhook_secret`).
    pub tenant_webhook_secret: BTreeMap<String, String>,
    /// Multiplies the webhook retry schedule and its 24 h window (1 = as specified; tests and
    /// demos shrink it).
    pub webhook_retry_scale: f64,
    /// Local: concurrent analysis workers of one process.
    pub workers: usize,
    /// Local: the data directory (SQLite database and blobs).
    pub data_dir: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::defaults_for(Runtime::Local)
    }
}

/// The prompt a job is analysed with and the version its answers are cached under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnalysisPrompt {
    pub text: String,
    pub version: String,
}

impl Settings {
    /// The defaults of a runtime (they differ only where the runtime makes them differ).
    pub fn defaults_for(runtime: Runtime) -> Settings {
        Settings {
            prepare: PrepareOptions::default(),
            provider: None,
            openai_base_url: DEFAULT_OPENAI_BASE_URL.into(),
            anthropic_base_url: DEFAULT_ANTHROPIC_BASE_URL.into(),
            provider_timeout: match runtime {
                Runtime::Local => Duration::from_secs(60),
                // A few records' worst cases must fit the function timeout (template: 180 s).
                Runtime::Lambda => Duration::from_secs(30),
            },
            model: "gpt-4.1-mini".into(),
            fallback_models: Vec::new(),
            prompt: DEFAULT_PROMPT.into(),
            prompt_version: "v1".into(),
            max_output_tokens: sightline_core::pricing::DEFAULT_MAX_OUTPUT_TOKENS,
            detail: Detail::High,
            tenant_detail: BTreeMap::new(),
            rpm: 500,
            tpm: 200_000,
            max_concurrency: 1,
            max_inline_wait: match runtime {
                // Sleeping costs nothing in a local process.
                Runtime::Local => Duration::from_secs(60),
                // A Lambda pays for waiting: longer waits go back to the queue.
                Runtime::Lambda => Duration::from_secs(2),
            },
            // A Lambda instance is one of many: the store keeps their one limit. A local
            // process is usually alone (set it when several share a data dir).
            shared_limit: matches!(runtime, Runtime::Lambda),
            limit_burst: sightline_core::limiter::DEFAULT_BURST,
            fallback_after: Duration::from_secs(10),
            claim_lease: Duration::from_secs(120),
            max_receives: match runtime {
                Runtime::Local => 8,
                Runtime::Lambda => 5,
            },
            upload_ttl: Duration::from_secs(900),
            share_cache_across_tenants: false,
            reconcile_after: Duration::from_secs(60),
            stuck_after: Duration::from_secs(6 * 3600),
            reconcile_every: Duration::from_secs(30),
            pending_ttl: Duration::from_secs(7 * 86_400),
            resize_memory_budget: 1 << 30,
            max_concurrent_resizes: 8,
            budget: BudgetCaps::default(),
            over_budget: OverBudget::Wait,
            admin_api_key: None,
            lane: Lane::Realtime,
            batch_key_prefixes: Vec::new(),
            batch_max_wait: Duration::from_secs(600),
            batch_max_requests: 2_000,
            batch_max_bytes: 100 << 20,
            batch_attempts: 3,
            batch_poll_every: Duration::from_secs(30),
            embedder: EmbedderKind::Local,
            embedding_model: None,
            embedding_dims: None,
            embedding_base_url: None,
            embedding_rpm: 0,
            dedupe: Dedupe::Off,
            tenant_dedupe: BTreeMap::new(),
            templates_file: None,
            generation_ipm: 0,
            generation_fallback_models: Vec::new(),
            regenerate_on_mismatch: true,
            webhook_secret: None,
            tenant_webhook_secret: BTreeMap::new(),
            webhook_retry_scale: 1.0,
            workers: 4,
            data_dir: PathBuf::from(".sightline"),
        }
    }

    /// Check the settings together, and names against the price table, so a typo fails at
    /// start, not per image.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let table = PriceTable::builtin();
        for m in std::iter::once(&self.model).chain(self.fallback_models.iter()) {
            table.model(m)?;
        }
        if self.prompt_version.is_empty() || self.prompt_version.contains(':') {
            return Err(SettingsError::PromptVersion(self.prompt_version.clone()));
        }
        if self.max_output_tokens == 0 {
            return Err(SettingsError::NoOutputTokens);
        }
        if self.prepare.max_edge == 0 || self.prepare.max_edge > MAX_EDGE_LIMIT {
            return Err(SettingsError::MaxEdge(self.prepare.max_edge));
        }
        if !(1..=100).contains(&self.prepare.quality) {
            return Err(SettingsError::Quality(self.prepare.quality));
        }
        if self.resize_memory_budget < 64 << 20 {
            return Err(SettingsError::ResizeBudget(self.resize_memory_budget >> 20));
        }
        if let Some((model, dims)) = self.embedding()? {
            let m = table.embedding_model(&model)?;
            if !m.dims.contains(&dims) {
                return Err(SettingsError::EmbeddingDims {
                    model,
                    dims,
                    allowed: m.dims.clone(),
                });
            }
        }
        Ok(())
    }

    /// The embedding model and dimension in use; None when the embedder is off.
    pub fn embedding(&self) -> Result<Option<(String, u32)>, SettingsError> {
        let Some(default) = self.embedder.default_model() else {
            return Ok(None);
        };
        let model = self
            .embedding_model
            .clone()
            .unwrap_or_else(|| default.to_string());
        let dims = match self.embedding_dims {
            Some(d) => d,
            None => PriceTable::builtin()
                .embedding_model(&model)?
                .default_dims(),
        };
        Ok(Some((model, dims)))
    }

    /// Whether near-duplicates of `tenant`'s analysed images reuse their analysis.
    /// The secret a tenant's webhooks are signed with (None: the tenant has none, and its jobs
    /// may not name a webhook).
    pub fn webhook_secret_for(&self, tenant: &str) -> Option<&str> {
        self.tenant_webhook_secret
            .get(tenant)
            .or(self.webhook_secret.as_ref())
            .map(String::as_str)
    }

    pub fn dedupe_for(&self, tenant: &str) -> Dedupe {
        self.tenant_dedupe
            .get(tenant)
            .copied()
            .unwrap_or(self.dedupe)
    }

    /// Whose answers the idempotency cache may reuse for an image of `tenant`.
    pub fn cache_scope<'a>(&self, tenant: &'a str) -> CacheScope<'a> {
        if self.share_cache_across_tenants {
            CacheScope::Shared
        } else {
            CacheScope::Tenant(tenant)
        }
    }

    /// The detail for an image: the upload's own request, else the tenant's, else the default.
    pub fn detail_for(&self, tenant: &str, requested: Option<Detail>) -> Detail {
        requested
            .or_else(|| self.tenant_detail.get(tenant).copied())
            .unwrap_or(self.detail)
    }

    /// The lane of an image: its own request, else the first key-prefix rule it matches, else
    /// the default.
    pub fn lane_for(&self, requested: Option<Lane>, key: &str) -> Lane {
        requested.unwrap_or_else(|| {
            if self
                .batch_key_prefixes
                .iter()
                .any(|p| key.starts_with(p.as_str()))
            {
                Lane::Batch
            } else {
                self.lane
            }
        })
    }

    /// The request parameters an answer depends on besides the image and the model.
    pub fn answer_params(&self, detail: Detail) -> AnswerParams<'_> {
        self.answer_params_for("", detail)
    }

    /// The answer parameters of a call to `model`: a model that never reads `detail` (Claude,
    /// Gemini) gets one cache entry whatever detail was asked, so low then high is not paid twice.
    pub fn answer_params_for(&self, model: &str, detail: Detail) -> AnswerParams<'_> {
        self.answer_params_with(model, detail, &self.prompt_version)
    }

    /// [`Settings::answer_params_for`] with a job's own prompt version (a generated image's
    /// check, see [`Settings::analysis_prompt`]).
    pub fn answer_params_with<'a>(
        &self,
        model: &str,
        detail: Detail,
        prompt_version: &'a str,
    ) -> AnswerParams<'a> {
        let reads_detail = PriceTable::builtin()
            .model(model)
            .map_or(true, |m| m.reads_detail());
        let detail = if reads_detail { detail } else { Detail::High };
        AnswerParams {
            prompt_version,
            detail,
            max_output_tokens: self.max_output_tokens,
        }
    }

    /// The prompt a job is analysed with and the version its answer is cached under: the
    /// configured prompt, or for a generated image the check prompt built on it (one rule for
    /// ingest's estimate, the analyzer's call and its cache key).
    pub fn analysis_prompt(
        &self,
        check: Option<&sightline_core::genjob::CheckSpec>,
    ) -> AnalysisPrompt {
        match check {
            None => AnalysisPrompt {
                text: self.prompt.clone(),
                version: self.prompt_version.clone(),
            },
            Some(c) => {
                let text = sightline_core::genjob::check_prompt(&self.prompt, &c.prompt);
                let version =
                    sightline_core::genjob::check_prompt_version(&self.prompt_version, &text);
                AnalysisPrompt { text, version }
            }
        }
    }

    /// What an estimate of a job with this prompt assumes besides the image.
    pub fn estimate_params_with(&self, detail: Detail, prompt: &AnalysisPrompt) -> EstimateParams {
        EstimateParams::for_prompt(&prompt.text, self.max_output_tokens, detail)
    }

    /// What an estimate assumes besides the image: the core's one rule for the prompt and
    /// output tokens, so the widget, `estimate` and the recorded estimate agree.
    pub fn estimate_params(&self, detail: Detail) -> EstimateParams {
        EstimateParams::for_prompt(&self.prompt, self.max_output_tokens, detail)
    }

    /// The longest one record can take: an invalid-output retry (two provider calls), two
    /// in-place limiter waits, and its reads and writes. The one formula behind the claim
    /// lease, the Lambda's per-record deadline check and the local queue's visibility.
    pub fn record_worst_case(&self) -> Duration {
        self.provider_timeout * 2 + self.max_inline_wait * 2 + RECORD_WRITES
    }

    /// The timeout of one image generation call.
    pub fn generation_timeout(&self) -> Duration {
        self.provider_timeout.max(MIN_GENERATION_TIMEOUT)
    }

    /// Image models tried for a request of `model`, in order.
    pub fn generation_chain(&self, model: &str) -> Vec<String> {
        let mut chain = vec![model.to_string()];
        for m in &self.generation_fallback_models {
            if !chain.contains(m) {
                chain.push(m.clone());
            }
        }
        chain
    }

    /// The longest one generation message can take: per model of the longest chain, an
    /// in-place limiter wait and two calls (one in-place retry of an unusable answer), and the
    /// image's writes. The one formula behind the generation claim's lease and the generate
    /// Lambda's deadline check.
    pub fn generation_worst_case(&self) -> Duration {
        let models = 1 + self.generation_fallback_models.len() as u32;
        (self.generation_timeout() * 2 + self.max_inline_wait) * models + RECORD_WRITES
    }

    /// How long a generation claim holds: the worst case plus a margin, so a redelivery
    /// never pays for an image still being made.
    pub fn generation_lease(&self) -> Duration {
        self.generation_worst_case() + LEASE_MARGIN
    }

    /// Make the claim lease at least a record's worst case plus a margin (done once the
    /// settings are resolved). A lease that ends while the call is still running would let a
    /// redelivery pay for the same image.
    pub fn fit_claim_lease(&mut self) {
        self.claim_lease = self
            .claim_lease
            .max(self.record_worst_case() + LEASE_MARGIN);
    }

    /// The last step of every resolution: validate, then derive what follows from the rest.
    pub fn finish(&mut self) -> Result<(), SettingsError> {
        self.validate()?;
        self.fit_claim_lease();
        Ok(())
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

    /// Apply one setting by its key (see [`SETTINGS`]); `origin` names where the value came
    /// from in errors.
    pub fn set(&mut self, key: &str, value: &str, origin: &str) -> Result<(), SettingsError> {
        let def =
            SETTINGS
                .iter()
                .find(|d| d.key == key)
                .ok_or_else(|| SettingsError::UnknownKey {
                    key: key.to_string(),
                    known: SETTINGS
                        .iter()
                        .map(|d| d.key)
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        let bad = |expected: &'static str| SettingsError::BadValue {
            origin: origin.to_string(),
            value: value.to_string(),
            expected,
        };
        (def.apply)(self, value.trim()).map_err(bad)
    }

    /// Apply every `SIGHTLINE_*` (and `OPENAI_BASE_URL`, `ANTHROPIC_BASE_URL`) variable that
    /// `get` finds; empty values count as unset.
    pub fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), SettingsError> {
        for def in SETTINGS {
            if let Some(v) = get(def.env).filter(|v| !v.trim().is_empty()) {
                self.set(def.key, &v, def.env)?;
            }
        }
        Ok(())
    }

    /// The Lambda functions' settings: defaults, then the environment, then validation.
    pub fn for_lambda(get: &dyn Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let mut s = Settings::defaults_for(Runtime::Lambda);
        s.apply_env(get)?;
        s.finish()?;
        Ok(s)
    }
}

/// What a job refused by its tenant's budget does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverBudget {
    /// Back to the queue until the budget period rolls over.
    Wait,
    /// The image fails with "budget exceeded" (permanent).
    Fail,
}

fn usd(v: &str) -> Result<f64, &'static str> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err("an amount in USD, 0 or more (0 = no cap)"),
    }
}

/// Where a setting takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    Everywhere,
    /// `sightline run` / `serve` only.
    Local,
    /// The Lambda functions only.
    Lambda,
}

impl Applies {
    fn as_str(self) -> &'static str {
        match self {
            Applies::Everywhere => "local + Lambda",
            Applies::Local => "local",
            Applies::Lambda => "Lambda",
        }
    }
}

/// One setting: its key (in `sightline.toml`; the flag, where there is one, is `--key` with
/// dashes), its variable, where it applies, how a value is read and how its value is shown.
pub struct SettingDef {
    pub key: &'static str,
    pub env: &'static str,
    /// The `sightline` flag that sets it, if any.
    pub flag: bool,
    pub applies: Applies,
    pub help: &'static str,
    /// Read a value into the settings; Err names what was expected.
    apply: fn(&mut Settings, &str) -> Result<(), &'static str>,
    /// The current value, as a user would write it.
    show: fn(&Settings) -> String,
}

fn num<T: std::str::FromStr>(v: &str) -> Result<T, &'static str> {
    v.parse().map_err(|_| "a whole number")
}

fn secs(v: &str) -> Result<Duration, &'static str> {
    num::<u64>(v)
        .map(Duration::from_secs)
        .map_err(|_| "whole seconds")
}

fn flag(v: &str) -> Result<bool, &'static str> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("true or false"),
    }
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

fn detail(v: &str) -> Result<Detail, &'static str> {
    Detail::parse(v).ok_or("low, high or auto")
}

fn tenant_details(v: &str) -> Result<BTreeMap<String, Detail>, &'static str> {
    const EXPECTED: &str = "tenant=detail pairs, comma-separated (acme=low,beta=auto)";
    let mut map = BTreeMap::new();
    for pair in list(v) {
        let (tenant, d) = pair.split_once('=').ok_or(EXPECTED)?;
        let tenant = tenant.trim();
        if tenant.is_empty() {
            return Err(EXPECTED);
        }
        map.insert(tenant.to_string(), Detail::parse(d).ok_or(EXPECTED)?);
    }
    Ok(map)
}

fn tenant_dedupes(v: &str) -> Result<BTreeMap<String, Dedupe>, &'static str> {
    const EXPECTED: &str = "tenant=off|near pairs, comma-separated (acme=near,beta=off)";
    let mut map = BTreeMap::new();
    for pair in list(v) {
        let (tenant, d) = pair.split_once('=').ok_or(EXPECTED)?;
        let tenant = tenant.trim();
        if tenant.is_empty() {
            return Err(EXPECTED);
        }
        map.insert(tenant.to_string(), Dedupe::parse(d).ok_or(EXPECTED)?);
    }
    Ok(map)
}

/// A `whsec_` secret, checked.
pub fn webhook_secret(v: &str) -> Result<String, &'static str> {
    sightline_core::webhook::WebhookSecret::parse(v)
        .map(|_| v.to_string())
        .map_err(|_| "a whsec_ secret: `whsec_` and 24 to 64 bytes in base64")
}

fn tenant_webhook_secrets(v: &str) -> Result<BTreeMap<String, String>, &'static str> {
    const EXPECTED: &str = "tenant=whsec_… pairs, comma-separated";
    let mut map = BTreeMap::new();
    for pair in list(v) {
        let (tenant, secret) = pair.split_once('=').ok_or(EXPECTED)?;
        let tenant = tenant.trim();
        if tenant.is_empty() {
            return Err(EXPECTED);
        }
        map.insert(tenant.to_string(), webhook_secret(secret.trim())?);
    }
    Ok(map)
}

fn http_url(v: &str) -> Result<String, &'static str> {
    if v.starts_with("https://") || v.starts_with("http://") {
        Ok(v.to_string())
    } else {
        Err("an http(s) URL")
    }
}

fn show_secs(d: Duration) -> String {
    d.as_secs().to_string()
}

/// Every setting, once. The README table and the docs are generated from this list.
pub const SETTINGS: &[SettingDef] = &[
    SettingDef {
        key: "data_dir",
        env: "SIGHTLINE_DATA_DIR",
        flag: true,
        applies: Applies::Local,
        help: "SQLite database and image files",
        apply: |s, v| {
            s.data_dir = PathBuf::from(v);
            Ok(())
        },
        show: |s| s.data_dir.display().to_string(),
    },
    SettingDef {
        key: "provider",
        env: "SIGHTLINE_PROVIDER",
        flag: true,
        applies: Applies::Everywhere,
        help: "`local` (offline analyzer, $0), `openai` (any OpenAI-compatible API), `anthropic` (Messages API, Claude models) or `bedrock` (Amazon Bedrock's Converse API, AWS credentials); unset: `bedrock` for a Bedrock model, else the model's provider when its key is set (`claude-*` with `ANTHROPIC_API_KEY`), else `openai` when `OPENAI_API_KEY` is set, else `local`",
        apply: |s, v| {
            s.provider = Some(
                ProviderKind::parse(v).ok_or("local, openai, anthropic or bedrock")?,
            );
            Ok(())
        },
        show: |s| match s.provider {
            None => "(by model and key)".into(),
            Some(kind) => kind.as_str().into(),
        },
    },
    SettingDef {
        key: "openai_base_url",
        env: "OPENAI_BASE_URL",
        flag: false,
        applies: Applies::Everywhere,
        help: "OpenAI-compatible endpoint (Gemini's OpenAI endpoint, DeepSeek, a gateway)",
        apply: |s, v| {
            s.openai_base_url = http_url(v)?;
            Ok(())
        },
        show: |s| s.openai_base_url.clone(),
    },
    SettingDef {
        key: "anthropic_base_url",
        env: "ANTHROPIC_BASE_URL",
        flag: false,
        applies: Applies::Everywhere,
        help: "Anthropic Messages API endpoint (requests go to `{base}/v1/messages`)",
        apply: |s, v| {
            s.anthropic_base_url = http_url(v)?;
            Ok(())
        },
        show: |s| s.anthropic_base_url.clone(),
    },
    SettingDef {
        key: "timeout_secs",
        env: "SIGHTLINE_TIMEOUT_SECS",
        flag: true,
        applies: Applies::Everywhere,
        help: "one provider request's timeout",
        apply: |s, v| {
            // Fractions are allowed: fault runs use sub-second timeouts.
            let secs: f64 = v
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                .ok_or("seconds, > 0 and at most 3600")?;
            s.provider_timeout = Duration::from_secs_f64(secs);
            Ok(())
        },
        show: |s| format!("{}", s.provider_timeout.as_secs_f64()),
    },
    SettingDef {
        key: "model",
        env: "SIGHTLINE_MODEL",
        flag: true,
        applies: Applies::Everywhere,
        help: "model to estimate and (with a paid provider) call; see `sightline models`",
        apply: |s, v| {
            s.model = v.to_string();
            Ok(())
        },
        show: |s| s.model.clone(),
    },
    SettingDef {
        key: "fallback_models",
        env: "SIGHTLINE_FALLBACK_MODELS",
        flag: true,
        applies: Applies::Everywhere,
        help: "comma-separated models tried when the model is throttled for long or down",
        apply: |s, v| {
            s.fallback_models = list(v);
            Ok(())
        },
        show: |s| s.fallback_models.join(","),
    },
    SettingDef {
        key: "prompt",
        env: "SIGHTLINE_PROMPT",
        flag: false,
        applies: Applies::Everywhere,
        help: "the analysis prompt (change `prompt_version` with it)",
        apply: |s, v| {
            if v.is_empty() {
                return Err("a non-empty prompt");
            }
            s.prompt = v.to_string();
            Ok(())
        },
        show: |_| "(built in)".into(),
    },
    SettingDef {
        key: "prompt_version",
        env: "SIGHTLINE_PROMPT_VERSION",
        flag: true,
        applies: Applies::Everywhere,
        help: "part of the cache key: a new version analyses again",
        apply: |s, v| {
            s.prompt_version = v.to_string();
            Ok(())
        },
        show: |s| s.prompt_version.clone(),
    },
    SettingDef {
        key: "detail",
        env: "SIGHTLINE_DETAIL",
        flag: true,
        applies: Applies::Everywhere,
        help: "image detail: `low` (85 tokens per image on GPT-4o-class models), `high` (by tiles) or `auto` (estimated as high); part of the cache key of OpenAI models (the only ones that read it)",
        apply: |s, v| {
            s.detail = detail(v)?;
            Ok(())
        },
        show: |s| s.detail.to_string(),
    },
    SettingDef {
        key: "tenant_detail",
        env: "SIGHTLINE_TENANT_DETAIL",
        flag: false,
        applies: Applies::Everywhere,
        help: "detail per tenant, `acme=low,beta=auto` (a table in the file); an upload's `detail` wins",
        apply: |s, v| {
            s.tenant_detail = tenant_details(v)?;
            Ok(())
        },
        show: |s| {
            s.tenant_detail
                .iter()
                .map(|(t, d)| format!("{t}={d}"))
                .collect::<Vec<_>>()
                .join(",")
        },
    },
    SettingDef {
        key: "max_output_tokens",
        env: "SIGHTLINE_MAX_OUTPUT_TOKENS",
        flag: false,
        applies: Applies::Everywhere,
        help: "`max_tokens` of each call; part of the cache key",
        apply: |s, v| {
            s.max_output_tokens = num(v)?;
            Ok(())
        },
        show: |s| s.max_output_tokens.to_string(),
    },
    SettingDef {
        key: "rpm",
        env: "SIGHTLINE_RPM",
        flag: true,
        applies: Applies::Everywhere,
        help: "provider requests per minute, all instances together (0 = unlimited)",
        apply: |s, v| {
            s.rpm = num(v)?;
            Ok(())
        },
        show: |s| s.rpm.to_string(),
    },
    SettingDef {
        key: "tpm",
        env: "SIGHTLINE_TPM",
        flag: true,
        applies: Applies::Everywhere,
        help: "provider tokens per minute, all instances together (0 = unlimited)",
        apply: |s, v| {
            s.tpm = num(v)?;
            Ok(())
        },
        show: |s| s.tpm.to_string(),
    },
    SettingDef {
        key: "max_concurrency",
        env: "SIGHTLINE_MAX_CONCURRENCY",
        flag: false,
        applies: Applies::Lambda,
        help: "analyze instances that split `rpm`/`tpm` between them when `shared_limit` is off (the template passes the SQS MaximumConcurrency)",
        apply: |s, v| {
            s.max_concurrency = num::<u64>(v)?.max(1);
            Ok(())
        },
        show: |s| s.max_concurrency.to_string(),
    },
    SettingDef {
        key: "max_inline_wait_ms",
        env: "SIGHTLINE_MAX_INLINE_WAIT_MS",
        flag: false,
        applies: Applies::Everywhere,
        help: "longest wait done in place for a limiter slot or another worker's claim; longer waits go back to the queue",
        apply: |s, v| {
            s.max_inline_wait = Duration::from_millis(num(v)?);
            Ok(())
        },
        show: |s| s.max_inline_wait.as_millis().to_string(),
    },
    SettingDef {
        key: "shared_limit",
        env: "SIGHTLINE_SHARED_LIMIT",
        flag: false,
        applies: Applies::Everywhere,
        help: "one `rpm`/`tpm` limit per model shared through the store (DynamoDB on AWS, the data dir's SQLite locally) by every analyze instance or process, instead of each taking its `max_concurrency` share",
        apply: |s, v| {
            s.shared_limit = flag(v)?;
            Ok(())
        },
        show: |s| s.shared_limit.to_string(),
    },
    SettingDef {
        key: "limit_burst_ms",
        env: "SIGHTLINE_LIMIT_BURST_MS",
        flag: false,
        applies: Applies::Everywhere,
        help: "requests and tokens the limiter lets through at once, as time at the steady rate (providers such as OpenAI enforce per-minute limits over shorter periods, so a minute's burst gets 429s)",
        apply: |s, v| {
            s.limit_burst = Duration::from_millis(num(v)?);
            Ok(())
        },
        show: |s| s.limit_burst.as_millis().to_string(),
    },
    SettingDef {
        key: "max_receives",
        env: "SIGHTLINE_MAX_RECEIVES",
        flag: false,
        applies: Applies::Everywhere,
        help: "deliveries before a job is dead-lettered (on Lambda the queue's maxReceiveCount, passed by the template); the last one marks the image failed",
        apply: |s, v| {
            s.max_receives = num(v)?;
            Ok(())
        },
        show: |s| s.max_receives.to_string(),
    },
    SettingDef {
        key: "budget_daily_usd",
        env: "SIGHTLINE_BUDGET_DAILY_USD",
        flag: false,
        applies: Applies::Everywhere,
        help: "spending cap per tenant per UTC day, USD (0 = none); a tenant's own budget overrides it",
        apply: |s, v| {
            s.budget.daily_usd = Some(usd(v)?).filter(|x| *x > 0.0);
            Ok(())
        },
        show: |s| s.budget.daily_usd.unwrap_or(0.0).to_string(),
    },
    SettingDef {
        key: "budget_monthly_usd",
        env: "SIGHTLINE_BUDGET_MONTHLY_USD",
        flag: false,
        applies: Applies::Everywhere,
        help: "spending cap per tenant per UTC month, USD (0 = none); a tenant's own budget overrides it",
        apply: |s, v| {
            s.budget.monthly_usd = Some(usd(v)?).filter(|x| *x > 0.0);
            Ok(())
        },
        show: |s| s.budget.monthly_usd.unwrap_or(0.0).to_string(),
    },
    SettingDef {
        key: "over_budget",
        env: "SIGHTLINE_OVER_BUDGET",
        flag: false,
        applies: Applies::Everywhere,
        help: "a job over its tenant's budget: `wait` (back to the queue until the period rolls over) or `fail` (the image fails with \"budget exceeded\")",
        apply: |s, v| {
            s.over_budget = match v {
                "wait" => OverBudget::Wait,
                "fail" => OverBudget::Fail,
                _ => return Err("wait or fail"),
            };
            Ok(())
        },
        show: |s| match s.over_budget {
            OverBudget::Wait => "wait".into(),
            OverBudget::Fail => "fail".into(),
        },
    },
    SettingDef {
        key: "admin_api_key",
        env: "SIGHTLINE_ADMIN_API_KEY",
        flag: false,
        applies: Applies::Everywhere,
        help: "key of the admin routes (`x-admin-key` header: `PUT`/`DELETE /v1/tenants/{tenant}/budget`); unset: they answer 403",
        apply: |s, v| {
            s.admin_api_key = Some(v.to_string()).filter(|k| !k.is_empty());
            Ok(())
        },
        show: |s| {
            if s.admin_api_key.is_some() {
                "(set)".into()
            } else {
                String::new()
            }
        },
    },
    SettingDef {
        key: "workers",
        env: "SIGHTLINE_WORKERS",
        flag: true,
        applies: Applies::Local,
        help: "concurrent analysis workers",
        apply: |s, v| {
            s.workers = num::<usize>(v)?.clamp(1, 64);
            Ok(())
        },
        show: |s| s.workers.to_string(),
    },
    SettingDef {
        key: "max_edge",
        env: "SIGHTLINE_MAX_EDGE",
        flag: true,
        applies: Applies::Everywhere,
        help: "longest edge of the resized image, pixels",
        apply: |s, v| {
            s.prepare.max_edge = num(v)?;
            Ok(())
        },
        show: |s| s.prepare.max_edge.to_string(),
    },
    SettingDef {
        key: "quality",
        env: "SIGHTLINE_QUALITY",
        flag: false,
        applies: Applies::Everywhere,
        help: "JPEG quality of the resized image (1-100)",
        apply: |s, v| {
            s.prepare.quality = num(v)?;
            Ok(())
        },
        show: |s| s.prepare.quality.to_string(),
    },
    SettingDef {
        key: "max_input_bytes",
        env: "SIGHTLINE_MAX_INPUT_BYTES",
        flag: false,
        applies: Applies::Everywhere,
        help: "largest original accepted",
        apply: |s, v| {
            s.prepare.max_input_bytes = num(v)?;
            Ok(())
        },
        show: |s| s.prepare.max_input_bytes.to_string(),
    },
    SettingDef {
        key: "max_pixels",
        env: "SIGHTLINE_MAX_PIXELS",
        flag: false,
        applies: Applies::Everywhere,
        help: "largest original accepted, pixels (read from the header before decoding)",
        apply: |s, v| {
            s.prepare.max_pixels = num(v)?;
            Ok(())
        },
        show: |s| s.prepare.max_pixels.to_string(),
    },
    SettingDef {
        key: "upload_ttl_secs",
        env: "SIGHTLINE_UPLOAD_TTL_SECS",
        flag: false,
        applies: Applies::Everywhere,
        help: "lifetime of an upload URL",
        apply: |s, v| {
            s.upload_ttl = secs(v)?.max(Duration::from_secs(1));
            Ok(())
        },
        show: |s| show_secs(s.upload_ttl),
    },
    SettingDef {
        key: "share_cache_across_tenants",
        env: "SIGHTLINE_SHARE_CACHE",
        flag: false,
        applies: Applies::Everywhere,
        help: "reuse answers across tenants for identical images",
        apply: |s, v| {
            s.share_cache_across_tenants = flag(v)?;
            Ok(())
        },
        show: |s| s.share_cache_across_tenants.to_string(),
    },
    SettingDef {
        key: "reconcile_after_secs",
        env: "SIGHTLINE_RECONCILE_AFTER_SECS",
        flag: false,
        applies: Applies::Everywhere,
        help: "an upload waiting for its resize, or a job for its message, this long is redone",
        apply: |s, v| {
            s.reconcile_after = secs(v)?;
            Ok(())
        },
        show: |s| show_secs(s.reconcile_after),
    },
    SettingDef {
        key: "stuck_after_secs",
        env: "SIGHTLINE_STUCK_AFTER_SECS",
        flag: false,
        applies: Applies::Everywhere,
        help: "a queued image untouched this long gets its job sent again",
        apply: |s, v| {
            s.stuck_after = secs(v)?;
            Ok(())
        },
        show: |s| show_secs(s.stuck_after),
    },
    SettingDef {
        key: "reconcile_every_secs",
        env: "SIGHTLINE_RECONCILE_EVERY_SECS",
        flag: false,
        applies: Applies::Local,
        help: "period of `serve`'s reconciler sweep (on AWS the template's schedule)",
        apply: |s, v| {
            s.reconcile_every = secs(v)?.max(Duration::from_secs(1));
            Ok(())
        },
        show: |s| show_secs(s.reconcile_every),
    },
    SettingDef {
        key: "pending_ttl_secs",
        env: "SIGHTLINE_PENDING_TTL_SECS",
        flag: false,
        applies: Applies::Everywhere,
        help: "a `pending` record with nothing uploaded is deleted after this",
        apply: |s, v| {
            s.pending_ttl = secs(v)?;
            Ok(())
        },
        show: |s| show_secs(s.pending_ttl),
    },
    SettingDef {
        key: "lane",
        env: "SIGHTLINE_LANE",
        flag: true,
        applies: Applies::Everywhere,
        help: "`realtime` (one call now) or `batch` (the provider's batch API: half price, answered within 24 h) for images that do not ask for a lane",
        apply: |s, v| {
            s.lane = Lane::parse(v).ok_or("realtime or batch")?;
            Ok(())
        },
        show: |s| s.lane.to_string(),
    },
    SettingDef {
        key: "batch_key_prefixes",
        env: "SIGHTLINE_BATCH_KEY_PREFIXES",
        flag: false,
        applies: Applies::Everywhere,
        help: "upload keys with one of these prefixes go to the batch lane, comma-separated (`uploads/nightly/` for a tenant `nightly`)",
        apply: |s, v| {
            s.batch_key_prefixes = list(v);
            Ok(())
        },
        show: |s| s.batch_key_prefixes.join(","),
    },
    SettingDef {
        key: "batch_max_wait_secs",
        env: "SIGHTLINE_BATCH_MAX_WAIT_SECS",
        flag: false,
        applies: Applies::Everywhere,
        help: "a batch is submitted when it is full or its oldest request has waited this long",
        apply: |s, v| {
            s.batch_max_wait = secs(v)?;
            Ok(())
        },
        show: |s| show_secs(s.batch_max_wait),
    },
    SettingDef {
        key: "batch_max_requests",
        env: "SIGHTLINE_BATCH_MAX_REQUESTS",
        flag: false,
        applies: Applies::Everywhere,
        help: "requests per batch (OpenAI allows 50,000, Anthropic 100,000)",
        apply: |s, v| {
            s.batch_max_requests = num::<usize>(v)?.max(1);
            Ok(())
        },
        show: |s| s.batch_max_requests.to_string(),
    },
    SettingDef {
        key: "batch_max_mb",
        env: "SIGHTLINE_BATCH_MAX_MB",
        flag: false,
        applies: Applies::Everywhere,
        help: "MB of one batch's input, held in memory while it is uploaded (OpenAI allows 200, Anthropic 256)",
        apply: |s, v| {
            s.batch_max_bytes = num::<usize>(v)?.max(1).saturating_mul(1 << 20);
            Ok(())
        },
        show: |s| (s.batch_max_bytes >> 20).to_string(),
    },
    SettingDef {
        key: "batch_attempts",
        env: "SIGHTLINE_BATCH_ATTEMPTS",
        flag: false,
        applies: Applies::Everywhere,
        help: "batches a request may come back from unanswered (transient errors, expiry) before its images go to the real-time lane",
        apply: |s, v| {
            s.batch_attempts = num::<u32>(v)?.max(1);
            Ok(())
        },
        show: |s| s.batch_attempts.to_string(),
    },
    SettingDef {
        key: "batch_poll_secs",
        env: "SIGHTLINE_BATCH_POLL_SECS",
        flag: false,
        applies: Applies::Local,
        help: "how often `serve` polls open batches and submits pending requests (on AWS: the batch function's schedule)",
        apply: |s, v| {
            s.batch_poll_every = secs(v)?.max(Duration::from_secs(1));
            Ok(())
        },
        show: |s| show_secs(s.batch_poll_every),
    },
    SettingDef {
        key: "embedder",
        env: "SIGHTLINE_EMBEDDER",
        flag: true,
        applies: Applies::Everywhere,
        help: "who gives each analysed image its vector for `similar` and search: `local` (offline visual embedding, $0, no words), `openai` (an OpenAI-compatible multimodal `/v1/embeddings`), `bedrock` (Titan or Nova Multimodal Embeddings) or `off`",
        apply: |s, v| {
            s.embedder = EmbedderKind::parse(v).ok_or("local, openai, bedrock or off")?;
            Ok(())
        },
        show: |s| s.embedder.as_str().into(),
    },
    SettingDef {
        key: "embedding_model",
        env: "SIGHTLINE_EMBEDDING_MODEL",
        flag: false,
        applies: Applies::Everywhere,
        help: "embedding model (`sightline models` lists them); unset: `sightline-visual-v1`, `clip-vit-b-32` or `amazon.titan-embed-image-v1` by embedder",
        apply: |s, v| {
            s.embedding_model = Some(v.trim().to_string()).filter(|m| !m.is_empty());
            Ok(())
        },
        show: |s| {
            s.embedding_model
                .clone()
                .unwrap_or_else(|| "(by embedder)".into())
        },
    },
    SettingDef {
        key: "embedding_dims",
        env: "SIGHTLINE_EMBEDDING_DIMS",
        flag: false,
        applies: Applies::Everywhere,
        help: "vector size asked of the embedding model (one it offers); unset: its default",
        apply: |s, v| {
            s.embedding_dims = Some(num::<u32>(v)?);
            Ok(())
        },
        show: |s| {
            s.embedding_dims
                .map(|d| d.to_string())
                .unwrap_or_else(|| "(model's default)".into())
        },
    },
    SettingDef {
        key: "embedding_base_url",
        env: "SIGHTLINE_EMBEDDING_BASE_URL",
        flag: false,
        applies: Applies::Everywhere,
        help: "base URL of the OpenAI-compatible embeddings API; unset: `openai_base_url`",
        apply: |s, v| {
            s.embedding_base_url = Some(http_url(v)?);
            Ok(())
        },
        show: |s| {
            s.embedding_base_url
                .clone()
                .unwrap_or_else(|| "(openai_base_url)".into())
        },
    },
    SettingDef {
        key: "embedding_rpm",
        env: "SIGHTLINE_EMBEDDING_RPM",
        flag: false,
        applies: Applies::Everywhere,
        help: "requests per minute to a paid embedding model (shared like `rpm` by `max_concurrency` instances); 0 = unlimited",
        apply: |s, v| {
            s.embedding_rpm = num(v)?;
            Ok(())
        },
        show: |s| s.embedding_rpm.to_string(),
    },
    SettingDef {
        key: "dedupe",
        env: "SIGHTLINE_DEDUPE",
        flag: true,
        applies: Applies::Everywhere,
        help: "`near`: an image that is a near-duplicate (resized, recompressed, cropped, brightened or mirrored copy) of one analysed with the same model and prompt version reuses its analysis at $0; `off`: every new image is analysed",
        apply: |s, v| {
            s.dedupe = Dedupe::parse(v).ok_or("off or near")?;
            Ok(())
        },
        show: |s| s.dedupe.as_str().into(),
    },
    SettingDef {
        key: "tenant_dedupe",
        env: "SIGHTLINE_TENANT_DEDUPE",
        flag: false,
        applies: Applies::Everywhere,
        help: "near-duplicate skip per tenant, `acme=near,beta=off` (a table in the file)",
        apply: |s, v| {
            s.tenant_dedupe = tenant_dedupes(v)?;
            Ok(())
        },
        show: |s| {
            s.tenant_dedupe
                .iter()
                .map(|(t, d)| format!("{t}={}", d.as_str()))
                .collect::<Vec<_>>()
                .join(",")
        },
    },
    SettingDef {
        key: "templates_file",
        env: "SIGHTLINE_TEMPLATES_FILE",
        flag: false,
        applies: Applies::Everywhere,
        help: "the generation templates file (`templates.toml`) the API's named templates come from; unset: the API takes inline templates only",
        apply: |s, v| {
            s.templates_file = Some(PathBuf::from(v)).filter(|p| !p.as_os_str().is_empty());
            Ok(())
        },
        show: |s| {
            s.templates_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        },
    },
    SettingDef {
        key: "generation_ipm",
        env: "SIGHTLINE_GENERATION_IPM",
        flag: false,
        applies: Applies::Everywhere,
        help: "generated images per minute to each image model (shared like `rpm` by `max_concurrency` instances); 0 = unlimited",
        apply: |s, v| {
            s.generation_ipm = num(v)?;
            Ok(())
        },
        show: |s| s.generation_ipm.to_string(),
    },
    SettingDef {
        key: "generation_fallback_models",
        env: "SIGHTLINE_GENERATION_FALLBACK_MODELS",
        flag: false,
        applies: Applies::Everywhere,
        help: "comma-separated image models tried when a row's model is throttled for long or down",
        apply: |s, v| {
            s.generation_fallback_models = list(v);
            Ok(())
        },
        show: |s| s.generation_fallback_models.join(","),
    },
    SettingDef {
        key: "regenerate_on_mismatch",
        env: "SIGHTLINE_REGENERATE_ON_MISMATCH",
        flag: false,
        applies: Applies::Everywhere,
        help: "generate a row once more (paid) when its image fails its check; a job may say otherwise",
        apply: |s, v| {
            s.regenerate_on_mismatch = flag(v)?;
            Ok(())
        },
        show: |s| s.regenerate_on_mismatch.to_string(),
    },
    SettingDef {
        key: "webhook_secret",
        env: "SIGHTLINE_WEBHOOK_SECRET",
        flag: false,
        applies: Applies::Everywhere,
        help: "the `whsec_` secret generation webhooks are signed with (Standard Webhooks); unset: jobs may not name a webhook",
        apply: |s, v| {
            s.webhook_secret = Some(webhook_secret(v)?);
            Ok(())
        },
        show: |s| {
            if s.webhook_secret.is_some() {
                "(set)".into()
            } else {
                String::new()
            }
        },
    },
    SettingDef {
        key: "tenant_webhook_secret",
        env: "SIGHTLINE_TENANT_WEBHOOK_SECRET",
        flag: false,
        applies: Applies::Everywhere,
        help: "webhook secrets per tenant, `acme=whsec_…,beta=whsec_…` (a table in the file)",
        apply: |s, v| {
            s.tenant_webhook_secret = tenant_webhook_secrets(v)?;
            Ok(())
        },
        show: |s| {
            s.tenant_webhook_secret
                .keys()
                .map(|t| format!("{t}=(set)"))
                .collect::<Vec<_>>()
                .join(",")
        },
    },
    SettingDef {
        key: "webhook_retry_scale",
        env: "SIGHTLINE_WEBHOOK_RETRY_SCALE",
        flag: false,
        applies: Applies::Everywhere,
        help: "multiplies the webhook retry schedule (5 s, 5 min, 30 min, 2 h, … within 24 h); below 1 only for tests and demos",
        apply: |s, v| {
            let scale: f64 = num(v)?;
            if !(scale > 0.0 && scale <= 1.0) {
                return Err("a number in (0, 1]");
            }
            s.webhook_retry_scale = scale;
            Ok(())
        },
        show: |s| s.webhook_retry_scale.to_string(),
    },
    SettingDef {
        key: "resize_memory_mb",
        env: "SIGHTLINE_RESIZE_MEMORY_MB",
        flag: false,
        applies: Applies::Everywhere,
        help: "memory the concurrent resizes may budget together",
        apply: |s, v| {
            s.resize_memory_budget = num::<u64>(v)?.saturating_mul(1 << 20);
            Ok(())
        },
        show: |s| (s.resize_memory_budget >> 20).to_string(),
    },
    SettingDef {
        key: "max_concurrent_resizes",
        env: "SIGHTLINE_MAX_CONCURRENT_RESIZES",
        flag: false,
        applies: Applies::Everywhere,
        help: "resizes admitted at once",
        apply: |s, v| {
            s.max_concurrent_resizes = num::<usize>(v)?.max(1);
            Ok(())
        },
        show: |s| s.max_concurrent_resizes.to_string(),
    },
];

/// The README's settings table (Markdown), from [`SETTINGS`] and both runtimes' defaults.
pub fn settings_table() -> String {
    let local = Settings::defaults_for(Runtime::Local);
    let lambda = Settings::defaults_for(Runtime::Lambda);
    let mut out = String::from(
        "| key (`sightline.toml`) | variable | flag | default | applies | what it does |\n|---|---|---|---|---|---|\n",
    );
    for d in SETTINGS {
        let (l, a) = ((d.show)(&local), (d.show)(&lambda));
        let default = match d.applies {
            Applies::Everywhere if l != a => format!("{l} (local), {a} (Lambda)"),
            Applies::Lambda => a,
            _ => l,
        };
        let default = if default.is_empty() {
            "(none)".to_string()
        } else if default.starts_with('(') {
            default
        } else {
            format!("`{default}`")
        };
        let flag = if d.flag {
            format!("`--{}`", d.key.replace('_', "-"))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} | {} | {} |\n",
            d.key,
            d.env,
            flag,
            default,
            d.applies.as_str(),
            d.help
        ));
    }
    out
}

/// Secrets from `webhook_secret` and `tenant_webhook_secret` (the local runtime; on AWS the
/// SSM adapter falls back to them).
#[async_trait::async_trait]
impl crate::ports::WebhookSecrets for Settings {
    async fn secret_for(&self, tenant: &str) -> crate::ports::StoreResult<Option<String>> {
        Ok(self.webhook_secret_for(tenant).map(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn defaults_are_valid_and_typos_are_caught() {
        Settings::default().validate().unwrap();
        Settings::defaults_for(Runtime::Lambda).validate().unwrap();
        let s = Settings {
            fallback_models: vec!["gpt-4o".into(), "gpt-4o".into(), "nope".into()],
            ..Default::default()
        };
        assert!(matches!(s.validate(), Err(SettingsError::UnknownModel(_))));
        assert!(s.validate().unwrap_err().to_string().contains("nope"));
        let s = Settings {
            fallback_models: vec!["gpt-4o".into(), "gpt-4o".into()],
            ..Default::default()
        };
        assert_eq!(s.model_chain(), vec!["gpt-4.1-mini", "gpt-4o"]);
    }

    #[test]
    fn validation_is_the_same_for_every_runtime() {
        for runtime in [Runtime::Local, Runtime::Lambda] {
            let mut s = Settings::defaults_for(runtime);
            s.prepare.max_edge = 20_000;
            assert!(matches!(s.validate(), Err(SettingsError::MaxEdge(20_000))));
            let mut s = Settings::defaults_for(runtime);
            s.prompt_version = "a:b".into();
            assert!(matches!(s.validate(), Err(SettingsError::PromptVersion(_))));
            let mut s = Settings::defaults_for(runtime);
            s.max_output_tokens = 0;
            assert!(matches!(s.validate(), Err(SettingsError::NoOutputTokens)));
        }
    }

    #[test]
    fn the_default_settings_estimate_like_the_browser_does() {
        // The WASM client prices with EstimateParams::default(): the same numbers as the server.
        let s = Settings::default();
        assert_eq!(s.estimate_params(s.detail), EstimateParams::default());
    }

    #[test]
    fn environment_settings_parse_and_bad_values_are_named() {
        let mut s = Settings::default();
        s.apply_env(&env(&[
            ("SIGHTLINE_SHARE_CACHE", "true"),
            ("SIGHTLINE_RECONCILE_AFTER_SECS", "5"),
            ("SIGHTLINE_RESIZE_MEMORY_MB", "512"),
            ("SIGHTLINE_DETAIL", "low"),
            ("SIGHTLINE_TENANT_DETAIL", "acme=auto, beta=high"),
            ("SIGHTLINE_MAX_INPUT_BYTES", "1000"),
            ("SIGHTLINE_RPM", " "),
        ]))
        .unwrap();
        assert!(s.share_cache_across_tenants);
        assert_eq!(s.reconcile_after, Duration::from_secs(5));
        assert_eq!(s.resize_memory_budget, 512 << 20);
        assert_eq!(s.prepare.max_input_bytes, 1000);
        assert_eq!(s.detail, Detail::Low);
        assert_eq!(s.detail_for("acme", None), Detail::Auto);
        assert_eq!(s.detail_for("beta", None), Detail::High);
        assert_eq!(s.detail_for("other", None), Detail::Low);
        assert_eq!(s.detail_for("acme", Some(Detail::Low)), Detail::Low);
        assert_eq!(s.rpm, Settings::default().rpm, "empty means unset");
        assert_eq!(s.cache_scope("t"), CacheScope::Shared);
        for (name, value) in [
            ("SIGHTLINE_SHARE_CACHE", "maybe"),
            ("SIGHTLINE_TPM", "lots"),
            ("SIGHTLINE_DETAIL", "medium"),
            ("SIGHTLINE_TENANT_DETAIL", "acme"),
            ("SIGHTLINE_PROVIDER", "smoke-signals"),
        ] {
            let get = move |k: &str| (k == name).then(|| value.to_string());
            let err = Settings::default().apply_env(&get).unwrap_err();
            assert!(
                matches!(&err, SettingsError::BadValue { origin, .. } if origin == name),
                "{err}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
        assert_eq!(
            Settings::default().cache_scope("t"),
            CacheScope::Tenant("t")
        );
    }

    #[test]
    fn lambda_settings_come_from_the_environment_and_are_validated() {
        let s = Settings::for_lambda(&env(&[
            ("SIGHTLINE_MODEL", "gpt-4o"),
            ("SIGHTLINE_FALLBACK_MODELS", "gpt-4.1-mini, "),
            ("SIGHTLINE_RPM", "60"),
            ("SIGHTLINE_MAX_CONCURRENCY", "5"),
            ("SIGHTLINE_MAX_EDGE", "512"),
        ]))
        .unwrap();
        assert_eq!(s.model, "gpt-4o");
        assert_eq!(s.fallback_models, vec!["gpt-4.1-mini"]);
        assert_eq!((s.rpm, s.tpm, s.max_concurrency), (60, 200_000, 5));
        assert_eq!(s.prepare.max_edge, 512);
        assert_eq!(s.max_inline_wait, Duration::from_secs(2));
        // Lambda instances share one limit through the table unless told otherwise; a local
        // process keeps its own.
        assert!(s.shared_limit && !Settings::default().shared_limit);
        let s = Settings::for_lambda(&env(&[
            ("SIGHTLINE_SHARED_LIMIT", "false"),
            ("SIGHTLINE_LIMIT_BURST_MS", "250"),
        ]))
        .unwrap();
        assert!(!s.shared_limit);
        assert_eq!(s.limit_burst, Duration::from_millis(250));
        assert!(Settings::for_lambda(&env(&[("SIGHTLINE_SHARED_LIMIT", "maybe")])).is_err());
        assert!(Settings::for_lambda(&env(&[("SIGHTLINE_MODEL", "nope")])).is_err());
        assert!(Settings::for_lambda(&env(&[("SIGHTLINE_MAX_EDGE", "99999")])).is_err());
    }

    #[test]
    fn anthropic_is_a_provider_with_its_own_endpoint() {
        let mut s = Settings::default();
        assert_eq!(s.anthropic_base_url, DEFAULT_ANTHROPIC_BASE_URL);
        s.apply_env(&env(&[
            ("SIGHTLINE_PROVIDER", "Anthropic"),
            ("ANTHROPIC_BASE_URL", "http://127.0.0.1:9/"),
        ]))
        .unwrap();
        assert_eq!(s.provider, Some(ProviderKind::Anthropic));
        assert_eq!(s.anthropic_base_url, "http://127.0.0.1:9/");
        let err = Settings::default()
            .set(
                "anthropic_base_url",
                "api.anthropic.com",
                "ANTHROPIC_BASE_URL",
            )
            .unwrap_err();
        assert!(err.to_string().contains("ANTHROPIC_BASE_URL"), "{err}");
        for kind in ProviderKind::ALL {
            assert_eq!(ProviderKind::parse(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn detail_is_in_the_cache_key_only_for_models_that_read_it() {
        let s = Settings::default();
        let low = s.answer_params_for("gpt-4o", Detail::Low);
        let high = s.answer_params_for("gpt-4o", Detail::High);
        assert_ne!(low, high);
        // Claude never reads detail: low and high share one answer.
        assert_eq!(
            s.answer_params_for("claude-haiku-4-5", Detail::Low),
            s.answer_params_for("claude-haiku-4-5", Detail::High)
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_the_known_ones() {
        let err = Settings::default()
            .set("modle", "x", "modle in sightline.toml")
            .unwrap_err();
        assert!(matches!(err, SettingsError::UnknownKey { .. }));
        assert!(err.to_string().contains("model"), "{err}");
    }

    #[test]
    fn one_worst_case_sets_the_lease() {
        let mut s = Settings::defaults_for(Runtime::Lambda);
        // 2 × 30 s calls + 2 × 2 s waits + 5 s of writes.
        assert_eq!(s.record_worst_case(), Duration::from_secs(69));
        s.finish().unwrap();
        assert_eq!(s.claim_lease, Duration::from_secs(120));
        s.provider_timeout = Duration::from_secs(60);
        s.finish().unwrap();
        assert_eq!(s.claim_lease, Duration::from_secs(154));
        let local = Settings::default();
        // Locally the limiter may wait 60 s in place: 2 × 60 + 2 × 60 + 5.
        assert_eq!(local.record_worst_case(), Duration::from_secs(245));
    }

    #[test]
    fn every_setting_has_a_distinct_key_and_variable() {
        let mut keys: Vec<_> = SETTINGS.iter().map(|d| d.key).collect();
        let mut envs: Vec<_> = SETTINGS.iter().map(|d| d.env).collect();
        keys.sort_unstable();
        keys.dedup();
        envs.sort_unstable();
        envs.dedup();
        assert_eq!(keys.len(), SETTINGS.len());
        assert_eq!(envs.len(), SETTINGS.len());
        // Every default round-trips through its own reader.
        let d = Settings::default();
        for def in SETTINGS {
            let shown = (def.show)(&d);
            if shown.starts_with('(') || shown.is_empty() {
                continue;
            }
            let mut s = Settings::default();
            s.set(def.key, &shown, def.key).unwrap();
            assert_eq!((def.show)(&s), shown, "{}", def.key);
        }
    }

    #[test]
    fn the_readme_settings_table_is_generated_from_the_settings() {
        let readme = include_str!("../../../README.md");
        let table = settings_table();
        assert!(
            readme.contains(&table),
            "README.md's settings table is out of date; paste this:\n{table}"
        );
    }
}
