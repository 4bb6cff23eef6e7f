//! Ports: the small traits the use-cases need. `local` (files + SQLite) and `aws`
//! (S3, SQS, DynamoDB) adapters implement them; the use-cases know neither.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sightline_core::budget::{BudgetCaps, Counted, Period, Periods};
use sightline_core::limiter::{LimitOp, LimitOutcome, Limits};
use sightline_core::model::{AnalysisResult, Detail, ImageRecord, ImageStatus, Lane};
use sightline_core::pricing::Usage;
use sightline_core::retry::FailureKind;

/// Errors from storage and queue adapters.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("object {key} is {bytes} bytes, over the {max}-byte limit")]
    TooLarge { key: String, bytes: u64, max: u64 },
    /// Retry may help (throttling, network, service errors).
    #[error("transient storage error: {0}")]
    Transient(String),
    #[error("storage error: {0}")]
    Permanent(String),
    /// The caller's input cannot be used (a cursor that is not one of ours).
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Object storage for originals and resized JPEGs.
#[async_trait]
pub trait BlobStore: Send + Sync {
    async fn put(&self, key: &str, bytes: Vec<u8>, content_type: &str) -> StoreResult<()>;
    /// The object's size, or None when absent (checked before downloading).
    async fn size(&self, key: &str) -> StoreResult<Option<u64>>;
    /// Read an object, refusing (StoreError::TooLarge) anything over `max_bytes`.
    async fn get(&self, key: &str, max_bytes: u64) -> StoreResult<Vec<u8>>;
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// The user metadata the object was written with (S3's `x-amz-meta-*`, names in lower
    /// case), or None when it is absent. Objects put through this port have none.
    async fn metadata(&self, key: &str) -> StoreResult<Option<BTreeMap<String, String>>>;
}

/// One received queue message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMessage {
    pub message_id: String,
    /// Handle for delete / change-visibility (SQS receipt handle).
    pub receipt: String,
    pub body: String,
    /// 1 on first delivery.
    pub receive_count: u32,
}

/// A queue with SQS semantics: at-least-once, visibility timeout, redelivery, DLQ.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Send bodies (batched by the adapter: SQS takes 10 at a time).
    async fn send(&self, bodies: Vec<String>) -> StoreResult<()>;
    /// Receive up to `max` visible messages and hide them for `visibility`.
    async fn receive(&self, max: usize, visibility: Duration) -> StoreResult<Vec<QueueMessage>>;
    /// Acknowledge: the message is done.
    async fn delete(&self, receipt: &str) -> StoreResult<()>;
    /// Make the message visible again after `delay` (ChangeMessageVisibility).
    async fn retry_after(&self, receipt: &str, delay: Duration) -> StoreResult<()>;
}

/// One page of a tenant's images, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagePage {
    pub images: Vec<ImageRecord>,
    /// Opaque; pass back to get the next page. None on the last page.
    pub next_cursor: Option<String>,
}

/// Ledger totals for one (day, model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostRow {
    /// YYYY-MM-DD (UTC).
    pub day: String,
    pub model: String,
    /// Images that got a result (cached ones included).
    pub images: u64,
    pub cached_images: u64,
    /// Provider calls paid for (answers, invalid answers, answers that lost a race).
    #[serde(default)]
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// Sum of the pre-call estimates of the same images (estimate error = cost − estimate).
    pub estimated_cost_usd: f64,
    /// Paid calls whose usage could not be read (truncated or unreadable answers), booked at
    /// their estimate; their cost is part of `cost_usd`.
    #[serde(default)]
    pub calls_at_estimate: u64,
    #[serde(default)]
    pub cost_at_estimate_usd: f64,
    /// The batch lane's part of the row (the rest is real-time): its images, paid calls,
    /// cost at batch prices, and what the same usage would have cost in real time, minus it.
    #[serde(default)]
    pub batch_images: u64,
    #[serde(default)]
    pub batch_calls: u64,
    #[serde(default)]
    pub batch_cost_usd: f64,
    #[serde(default)]
    pub batch_saved_usd: f64,
    /// What the row's money bought: image analyses, or embeddings (similarity search).
    #[serde(default)]
    pub kind: LedgerKind,
    /// Near-duplicates that reused another image's analysis at $0, and the estimates of the
    /// calls they spared.
    #[serde(default)]
    pub reused_images: u64,
    #[serde(default)]
    pub reused_saved_usd: f64,
}

/// What a ledger row's money bought. Models of different kinds never share a row: an embedding
/// or image generation model is never a vision model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    #[default]
    Analysis,
    Embedding,
    /// Generated images (booked once per image's spend id, on the ledger only).
    Generation,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Analysis => "analysis",
            LedgerKind::Embedding => "embedding",
            LedgerKind::Generation => "generation",
        }
    }

    pub fn parse(value: &str) -> LedgerKind {
        match value {
            "embedding" => LedgerKind::Embedding,
            "generation" => LedgerKind::Generation,
            _ => LedgerKind::Analysis,
        }
    }
}

/// Money paid for provider calls of an image that left no stored result: invalid answers of
/// an image that then failed (or was retried later), or an answer for an image another worker
/// completed first. Booked once per `spend_id`, on the ledger and on the image
/// ([`ImageRecord::extra_spend`]), so every paid call belongs to an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Spend {
    /// YYYY-MM-DD (UTC) the money was spent.
    pub day: String,
    pub model: String,
    pub calls: u64,
    pub usage: Usage,
    pub cost_usd: f64,
    pub calls_at_estimate: u64,
    pub cost_at_estimate_usd: f64,
    /// The lane that paid (batch lines are priced at batch prices).
    pub lane: Lane,
    /// Real-time price of the same usage minus `cost_usd` (batch lane; 0 otherwise).
    pub saved_usd: f64,
    /// Analysis calls (kept on the image as `extra_spend`) or an embedding (ledger only: it is
    /// paid for the image's vector, not for an answer).
    pub kind: LedgerKind,
}

impl Spend {
    /// A paid answer's money booked as spend without its result (an answer that lost the race
    /// for its image, or arrived after the image was answered another way).
    pub fn of_result(result: &AnalysisResult) -> Spend {
        Spend {
            day: day_of(&result.completed_at).to_string(),
            model: result.model.clone(),
            calls: u64::from(result.calls),
            usage: result.usage,
            cost_usd: result.cost_usd,
            calls_at_estimate: u64::from(result.usage_estimated),
            cost_at_estimate_usd: result.cost_at_estimate_usd,
            lane: result.lane,
            saved_usd: result.saved_usd,
            kind: LedgerKind::Analysis,
        }
    }

    /// What the image record keeps of it.
    pub fn as_extra(&self) -> sightline_core::model::ExtraSpend {
        sightline_core::model::ExtraSpend {
            calls: self.calls,
            input_tokens: self.usage.input_tokens,
            output_tokens: self.usage.output_tokens,
            cost_usd: self.cost_usd,
            cost_at_estimate_usd: self.cost_at_estimate_usd,
        }
    }
}

/// What `complete` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Result stored and ledger updated, atomically.
    Stored,
    /// The image already had a result: nothing written (duplicate delivery).
    AlreadyDone,
}

/// What `put_image` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutImage {
    Stored,
    /// The image already has a result: the record was left as it is.
    HasResult,
    /// The stored record came from another upload (its `original_sha256` differs from the new
    /// record's): the record was left as it is.
    OtherUpload,
}

/// Whether a failed image may still be completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Cannot heal: duplicates of its job are not analysed again.
    Permanent,
    /// Gave up after transient errors: a redrive of its job may still complete it.
    GaveUp,
}

/// How a queued record's job reached the queue (see [`Repository::put_queued`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobDelivery {
    /// Written in the same transaction as the record: nothing left to do.
    Delivered,
    /// Only the record was written: the caller sends the job, then moves the recheck on.
    SendIt,
}

/// Result of trying to take the in-flight claim for an idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// We hold it until the lease ends; call the provider.
    Acquired,
    /// A finished result exists: reuse it at $0.
    Cached(Box<AnalysisResult>),
    /// Someone else is calling the provider right now; try later.
    Busy { retry_in: Duration },
}

/// What a budget reservation got.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetHold {
    /// Held until settled or until it expires; settle it by this id.
    Reserved(String),
    /// This period's cap is spent (or held): no paid call until it rolls over.
    Over(Period),
}

/// A tenant's budget position for the periods of one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetCounts {
    pub day: Counted,
    pub month: Counted,
}

/// A tenant's API key, as listed (the key itself is never stored, only its sha256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    /// The first 12 hex digits of the key's sha256: enough to name it, useless to use it.
    pub id: String,
    pub tenant: String,
    pub created_at: String,
}

/// The id under which a key is listed and revoked.
pub fn api_key_id(key_sha256: &str) -> String {
    key_sha256.chars().take(12).collect()
}

/// Images, results, the idempotency cache, the cost ledger and API keys.
#[async_trait]
pub trait Repository: Send + Sync {
    /// Create or overwrite an image record (resize path: retries are harmless), except one
    /// that already has a result or that came from another upload (see [`PutImage`]).
    /// `recheck_at_ms`: when the reconciler should look at the image if nothing moved it on
    /// (None: never).
    async fn put_image(
        &self,
        record: &ImageRecord,
        recheck_at_ms: Option<u64>,
    ) -> StoreResult<PutImage>;
    /// Store a queued record together with its job (a transactional outbox). A repository
    /// that holds the queue writes both in one transaction ([`JobDelivery::Delivered`], next
    /// recheck at `recheck_sent_ms`). The default writes the record alone with a recheck at
    /// `recheck_unsent_ms`, so a crash before the caller's send is found by the reconciler.
    async fn put_queued(
        &self,
        record: &ImageRecord,
        job_body: &str,
        now_ms: u64,
        recheck_unsent_ms: u64,
        recheck_sent_ms: u64,
    ) -> StoreResult<(PutImage, JobDelivery)> {
        let _ = (job_body, now_ms, recheck_sent_ms);
        let put = self.put_image(record, Some(recheck_unsent_ms)).await?;
        Ok((put, JobDelivery::SendIt))
    }
    async fn get_image(&self, tenant: &str, image_id: &str) -> StoreResult<Option<ImageRecord>>;
    async fn list_images(
        &self,
        tenant: &str,
        status: Option<ImageStatus>,
        limit: usize,
        cursor: Option<&str>,
    ) -> StoreResult<ImagePage>;
    /// Mark an image failed with a reason, unless it is already done. Clears its recheck time.
    async fn mark_failed(
        &self,
        tenant: &str,
        image_id: &str,
        error: &str,
        failure: Failure,
        now: &str,
    ) -> StoreResult<()>;

    /// Set or clear when the reconciler looks at an image next (no-op for a missing image).
    async fn set_recheck(
        &self,
        tenant: &str,
        image_id: &str,
        recheck_at_ms: Option<u64>,
    ) -> StoreResult<()>;
    /// Images of any tenant whose recheck time is at or before `now_ms`, soonest first.
    async fn due_rechecks(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<ImageRecord>>;
    /// Delete a record that is still `pending` (an upload URL nobody used). False when the
    /// record is absent or no longer pending.
    async fn expire_pending(&self, tenant: &str, image_id: &str) -> StoreResult<bool>;
    /// Delete an image's record, whatever its state (the ledger and the idempotency cache keep
    /// theirs). False when there was none.
    async fn delete_image(&self, tenant: &str, image_id: &str) -> StoreResult<bool>;

    /// Take the in-flight claim for `key` (lease), or learn it is cached or busy.
    async fn claim(
        &self,
        key: &str,
        owner: &str,
        lease: Duration,
        now_ms: u64,
    ) -> StoreResult<Claim>;
    /// Give a claim back after a failed call so a retry can take it at once.
    async fn release_claim(&self, key: &str, owner: &str) -> StoreResult<()>;
    /// Atomically: store the result on the image (only if it has none), store it in the
    /// idempotency cache, add usage and cost to the ledger and clear the image's recheck.
    /// A duplicate never double-counts.
    async fn complete(
        &self,
        tenant: &str,
        image_id: &str,
        result: &AnalysisResult,
        estimated_cost_usd: f64,
    ) -> StoreResult<Completion>;
    /// Put a paid answer in the idempotency cache without touching any image (an answer that
    /// lost the race for its image is still good for its key). Ends an in-flight claim on it.
    async fn cache_result(&self, result: &AnalysisResult) -> StoreResult<()>;
    /// Add money that left no result to the ledger and to the image's `extra_spend`, once per
    /// `spend_id` (a repeat is a no-op). A missing image only gets the ledger entry; so do an
    /// embedding ([`LedgerKind::Embedding`]) and a generated image ([`LedgerKind::Generation`]),
    /// whose rows say what they bought.
    async fn book_spend(
        &self,
        tenant: &str,
        image_id: &str,
        spend_id: &str,
        spend: &Spend,
    ) -> StoreResult<()>;
    /// Ledger rows for a tenant, for days in [from, to] (inclusive, YYYY-MM-DD).
    async fn costs(&self, tenant: &str, from: &str, to: &str) -> StoreResult<Vec<CostRow>>;

    /// Reserve `amount` USD against the tenant's caps for `periods`, atomically with every
    /// other reservation and booking: admitted while the period's spent (what the ledger booked
    /// on its days) plus live reservations is under its cap (see [`sightline_core::budget::fits`]).
    /// The hold counts until [`Repository::settle_budget`] or until `expires_ms`, so a process
    /// that dies between reserve and settle leaks nothing for long.
    async fn reserve_budget(
        &self,
        tenant: &str,
        periods: &Periods,
        amount: f64,
        caps: &BudgetCaps,
        now_ms: u64,
        expires_ms: u64,
    ) -> StoreResult<BudgetHold>;
    /// End a hold (the real cost is counted by the ledger booking made before). Idempotent.
    async fn settle_budget(&self, tenant: &str, periods: &Periods, id: &str) -> StoreResult<()>;
    /// Spent and live reserved money of a tenant for `periods`.
    async fn budget_counts(
        &self,
        tenant: &str,
        periods: &Periods,
        now_ms: u64,
    ) -> StoreResult<BudgetCounts>;
    /// A tenant's own caps (they override the settings), None when it has none.
    async fn tenant_budget(&self, tenant: &str) -> StoreResult<Option<BudgetCaps>>;
    /// Set (Some) or remove (None) a tenant's own caps.
    async fn set_tenant_budget(&self, tenant: &str, caps: Option<&BudgetCaps>) -> StoreResult<()>;

    /// Add an API key (stored as its sha256) for a tenant; other keys stay valid.
    async fn add_api_key(
        &self,
        key_sha256: &str,
        tenant: &str,
        created_at: &str,
    ) -> StoreResult<()>;
    /// A tenant's keys, oldest first.
    async fn list_api_keys(&self, tenant: &str) -> StoreResult<Vec<ApiKeyInfo>>;
    /// Revoke a tenant's key by its id ([`api_key_id`]); false when the tenant has no such key.
    async fn revoke_api_key(&self, tenant: &str, key_id: &str) -> StoreResult<bool>;
    async fn tenant_for_key(&self, key_sha256: &str) -> StoreResult<Option<String>>;
}

/// Rate-limit state reported by a provider (x-ratelimit-* headers); the limiter reads it.
pub use sightline_core::limiter::ProviderView as RateInfo;

/// A provider's rate limit shared by every process (and every Lambda instance) using the same
/// store: one [`LimitState`](sightline_core::limiter::LimitState) per key (provider and model),
/// changed by one [`LimitOp`] at a time. The maths is the core's
/// ([`LimitState::apply`](sightline_core::limiter::LimitState::apply)); an adapter only reads the
/// state, applies the op and writes the result back atomically (one transaction, or a write
/// conditioned on the version it read, retried when another writer came first).
#[async_trait]
pub trait RateLimitStore: Send + Sync {
    /// Apply `op` to the state under `key` (none yet: a full, open limit) as one atomic step
    /// and return its outcome. A denied take writes nothing. The time is read from `clock`
    /// once the state is in hand (after a lock wait or a lost race), never before.
    async fn apply_limit(
        &self,
        key: &str,
        limits: &Limits,
        op: &LimitOp,
        clock: std::sync::Arc<dyn Clock>,
    ) -> StoreResult<LimitOutcome>;
}

/// One vision call.
#[derive(Debug, Clone)]
pub struct VisionRequest {
    pub model: String,
    pub jpeg: std::sync::Arc<Vec<u8>>,
    pub width: u32,
    pub height: u32,
    pub prompt: String,
    pub max_output_tokens: u32,
    pub detail: Detail,
    /// A generated image's request, which `prompt` already asks about: the offline analyzer
    /// checks pictures of the offline generator with it; API providers read the prompt.
    pub check: Option<sightline_core::genjob::CheckSpec>,
}

#[derive(Debug, Clone)]
pub struct VisionResponse {
    /// Validated analysis object.
    pub analysis: serde_json::Value,
    /// As reported by the provider; None when the answer carried no readable usage (it is
    /// still paid for: the caller books it at the estimate).
    pub usage: Option<Usage>,
    /// Model that actually answered (providers may report a dated variant).
    pub model: String,
    pub rate: RateInfo,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: FailureKind,
    pub message: String,
    pub rate: RateInfo,
    /// Tokens the failed call still consumed, when known (malformed output is billed).
    pub usage: Option<Usage>,
    /// The provider answered (HTTP 200) before the failure, so the call is billed even when
    /// `usage` is unknown: a truncated or unreadable answer.
    pub billed: bool,
}

/// A vision model behind some API.
#[async_trait]
pub trait VisionProvider: Send + Sync {
    /// Provider name stored with results ("openai", "local").
    fn name(&self) -> &str;
    /// Whether calls cost money (the local analyzer does not).
    fn is_paid(&self) -> bool;
    async fn analyze(&self, request: &VisionRequest) -> Result<VisionResponse, ProviderError>;
}

/// Hands out upload URLs bound to a key, content type and size.
#[async_trait]
pub trait Presigner: Send + Sync {
    async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        content_length: u64,
        expires_in: Duration,
    ) -> StoreResult<PresignedUpload>;
    /// A URL that reads `key` (a resized image, for thumbnails) until `expires_in` has passed.
    async fn presign_get(&self, key: &str, expires_in: Duration) -> StoreResult<String>;
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PresignedUpload {
    pub url: String,
    pub method: String,
    /// Headers the client must send with the PUT.
    pub headers: std::collections::BTreeMap<String, String>,
    pub expires_at: String,
}

/// Time source (tests use a fixed one).
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// Wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// RFC 3339 UTC timestamp with milliseconds for `ms` since the epoch.
pub fn rfc3339(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

/// Milliseconds since the epoch of an RFC 3339 timestamp (None when it is not one).
pub fn parse_rfc3339_ms(timestamp: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(timestamp, &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The UTC day (YYYY-MM-DD) of an RFC 3339 timestamp produced by [`rfc3339`].
pub fn day_of(timestamp: &str) -> &str {
    timestamp.get(..10).unwrap_or(timestamp)
}

/// One request of a provider batch: a real-time request under its `custom_id`.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    pub custom_id: String,
    pub request: VisionRequest,
}

/// A provider batch as the provider reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderBatch {
    pub provider_batch_id: String,
    /// The provider's own word for it (`in_progress`, `expired`, `ended`, …).
    pub status: String,
    pub phase: sightline_core::batch::BatchPhase,
    /// Why the provider refused it (validation, the enqueued-token limit), when it did.
    pub error: Option<String>,
}

/// How one line of an ended batch came back.
#[derive(Debug, Clone)]
pub enum LineOutcome {
    /// A valid analysis (usage None: unreadable, still paid).
    Answered(VisionResponse),
    /// The line failed: classified like a real-time failure (`kind`); `billed`/`usage` say
    /// whether it was paid (an invalid answer is).
    Failed(ProviderError),
    /// Never processed: the batch expired or was cancelled before this line ran (`why`).
    Unprocessed(String),
}

/// One line of an ended batch, matched by `custom_id` (output order is not input order).
#[derive(Debug, Clone)]
pub struct BatchLine {
    pub custom_id: String,
    pub outcome: LineOutcome,
}

/// A provider's batch API (OpenAI Files + Batches, Anthropic Message Batches).
#[async_trait]
pub trait BatchProvider: Send + Sync {
    /// Provider name stored with results ("openai", "anthropic").
    fn name(&self) -> &str;
    /// What one batch may hold.
    fn limits(&self) -> sightline_core::batch::BatchLimits;
    /// One request as the batch input holds it (a JSONL line or one element of the requests
    /// array), without separator: its length is what the byte limit counts.
    // The same error every provider call returns; boxing it here alone would make it differ.
    #[allow(clippy::result_large_err)]
    fn encode(&self, request: &BatchRequest) -> Result<Vec<u8>, ProviderError>;
    /// Submit encoded requests (already split to fit [`BatchProvider::limits`]), tagged with
    /// our `batch_id` where the provider keeps metadata. Returns the provider's batch id.
    async fn submit(&self, batch_id: &str, encoded: Vec<Vec<u8>>) -> Result<String, ProviderError>;
    async fn status(&self, provider_batch_id: &str) -> Result<ProviderBatch, ProviderError>;
    /// Every line of an ended batch (answers and errors), in the provider's order.
    async fn results(&self, provider_batch_id: &str) -> Result<Vec<BatchLine>, ProviderError>;
    /// The provider batch submitted under our `batch_id` since `since_ms`, when the provider
    /// can tell (OpenAI keeps our id in the batch's metadata; Anthropic keeps none: None).
    /// Used after a crash between the provider's accept and our record of it.
    async fn find(&self, batch_id: &str, since_ms: u64) -> Result<Option<String>, ProviderError>;
}

/// An image waiting for a batch item's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchWaiter {
    pub tenant: String,
    pub image_id: String,
}

/// One idempotency key waiting for (or in) a provider batch: one request, however many images
/// of its scope have the same bytes. The first waiter pays; the others get the answer at $0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchItem {
    /// [`sightline_core::batch::custom_id`] of `key`: the request's id at the provider.
    pub custom_id: String,
    /// The idempotency key the answer is cached under.
    pub key: String,
    /// Whose budget and ledger pay for the line (the first waiter's tenant).
    pub tenant: String,
    pub provider: String,
    pub model: String,
    pub sha256: String,
    pub resized_key: String,
    pub width: u32,
    pub height: u32,
    /// Bytes of the resized JPEG (what a batch's size is estimated by before it is built).
    pub bytes: u64,
    pub detail: Detail,
    /// One line's estimate at the model's batch prices (budget holds; an answer whose usage
    /// cannot be read is booked at it).
    pub estimate_usd: f64,
    pub estimate_input_tokens: u64,
    pub estimate_output_tokens: u64,
    pub waiters: Vec<BatchWaiter>,
    /// Our batch id while the item is in one; None while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// Batches it was in that ended without an answer for it.
    pub attempts: u32,
    pub created_ms: u64,
    /// Not submitted before this (a refused batch makes the submitter back off).
    pub not_before_ms: u64,
    /// Set once its line is reconciled for good (answered, or failed its images); the item
    /// stays in its batch until the batch's totals are recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<ItemEnd>,
}

/// How an item's line ended for good, as its batch's totals count it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemEnd {
    pub answered: bool,
    /// Booked for the line (an invalid answer that failed its image is paid too).
    pub cost_usd: f64,
    pub saved_usd: f64,
}

/// What [`BatchStore::enqueue_batch`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// A new pending item for the key.
    Created,
    /// The key already waits in an item (pending or in a batch): the image waits for it.
    Joined,
    /// The image already waits in the item (a redelivered job).
    AlreadyWaiting,
    /// The key is answered already: reuse it at $0.
    Cached(Box<AnalysisResult>),
}

/// Our record of a state of a provider batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchState {
    /// Recorded, items assigned; the provider's accept is not recorded yet.
    Submitting,
    /// Accepted by the provider; polled until it ends.
    Running,
    /// Ended and every line reconciled.
    Ended,
    /// Refused by the provider (validation, the enqueued-token limit) or never accepted: its
    /// items went back to pending.
    Failed,
}

impl BatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Submitting => "submitting",
            BatchState::Running => "running",
            BatchState::Ended => "ended",
            BatchState::Failed => "failed",
        }
    }

    pub fn is_open(self) -> bool {
        matches!(self, BatchState::Submitting | BatchState::Running)
    }
}

/// How a batch's lines ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineCounts {
    /// Answered and booked.
    pub succeeded: u64,
    /// Failed for good (their images failed with a reason).
    pub failed: u64,
    /// Back to pending (transient errors, expired or cancelled lines) or to the real-time lane.
    pub retried: u64,
}

/// A tenant's budget hold for a batch (settled when the batch is reconciled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchHold {
    pub id: String,
    /// When it was reserved (its day and month are the periods it counts in).
    pub at_ms: u64,
}

/// One batch as sightline keeps it (listed by `sightline batches` and `GET /v1/batches`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Ours (a UUID); the provider's id is `provider_batch_id`.
    pub batch_id: String,
    pub tenant: String,
    pub provider: String,
    pub model: String,
    pub state: BatchState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_batch_id: Option<String>,
    /// The provider's last word on it (`in_progress`, `expired`, `ended`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<String>,
    /// Why the provider refused it, or why it was never accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub requests: u64,
    #[serde(default)]
    pub counts: LineCounts,
    /// Booked for its lines at batch prices, and what real time would have cost more.
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default)]
    pub saved_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<BatchHold>,
    pub created_at: String,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
}

/// Batch items and batch records (the batch lane's state), in the same store as the images so
/// the ledger and the lines move together.
#[async_trait]
pub trait BatchStore: Send + Sync {
    /// Add `waiter` to the item of `item.key` (creating it pending from `item`), unless the key
    /// is answered already ([`Enqueued::Cached`]). Idempotent per waiter.
    async fn enqueue_batch(&self, item: &BatchItem, waiter: &BatchWaiter) -> StoreResult<Enqueued>;
    /// The cached answer of an idempotency key, if any (the submitter skips answered keys).
    async fn cached_answer(&self, key: &str) -> StoreResult<Option<AnalysisResult>>;
    /// Pending items (in no batch, `not_before_ms` reached), oldest first.
    async fn pending_batch_items(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<BatchItem>>;
    /// Items in a batch.
    async fn batch_items(&self, batch_id: &str) -> StoreResult<Vec<BatchItem>>;
    /// Put items that are still pending into `batch_id`; returns the custom_ids it took.
    async fn assign_batch_items(
        &self,
        batch_id: &str,
        custom_ids: &[String],
    ) -> StoreResult<Vec<String>>;
    /// Back to pending if still in `batch_id`: `attempts` + `count_attempt`, not submitted
    /// before `not_before_ms`. False when the item is not in that batch (any more).
    async fn release_batch_item(
        &self,
        custom_id: &str,
        batch_id: &str,
        count_attempt: bool,
        not_before_ms: u64,
    ) -> StoreResult<bool>;
    /// Mark an item of `batch_id` ended (it stays there until [`BatchStore::purge_batch`]).
    /// False when it is not in that batch or already ended.
    async fn end_batch_item(
        &self,
        custom_id: &str,
        batch_id: &str,
        end: &ItemEnd,
    ) -> StoreResult<bool>;
    /// Delete a pending item (its key got answered another way). False when it was not pending.
    async fn drop_pending_item(&self, custom_id: &str) -> StoreResult<bool>;
    /// Keep a pending item from being submitted before `not_before_ms` (budget waits).
    async fn defer_batch_item(&self, custom_id: &str, not_before_ms: u64) -> StoreResult<bool>;
    /// Delete the ended items of a batch whose totals are recorded.
    async fn purge_batch(&self, batch_id: &str) -> StoreResult<()>;
    /// Create or overwrite a batch record.
    async fn put_batch(&self, batch: &BatchRecord) -> StoreResult<()>;
    /// Overwrite a batch record only while the stored one is still open (submitting or
    /// running): the first of two pollers to finish a batch records it; false for the other.
    async fn close_batch(&self, batch: &BatchRecord) -> StoreResult<bool>;
    async fn get_batch(&self, batch_id: &str) -> StoreResult<Option<BatchRecord>>;
    /// Batch records, newest first: of one tenant (or all), only open ones (or all).
    async fn list_batches(
        &self,
        tenant: Option<&str>,
        open_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<BatchRecord>>;
}

/// Where vectors of one embedding space live: one index per (model, dimension), since vectors of
/// different models or sizes cannot be compared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VectorIndex {
    pub model: String,
    pub dims: u32,
}

impl VectorIndex {
    pub fn new(model: impl Into<String>, dims: u32) -> Self {
        Self {
            model: model.into(),
            dims,
        }
    }

    /// The index's name where the store wants one (S3 Vectors: 3–63 characters of lowercase
    /// letters, digits, hyphens and dots): the model lowercased with anything else turned into
    /// a hyphen, then the dimension; a long model name keeps its start and a hash of the rest.
    pub fn name(&self) -> String {
        let mut model: String = self
            .model
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let suffix = format!("-{}", self.dims);
        let room = 63 - suffix.len();
        if model.len() > room {
            use sha2::Digest;
            let digest = hex::encode(sha2::Sha256::digest(self.model.as_bytes()));
            model.truncate(room - 9);
            model.push('-');
            model.push_str(&digest[..8]);
        }
        let name = format!("{model}{suffix}");
        let name = name.trim_start_matches(['-', '.']).to_string();
        if name.len() < 3 {
            format!("v-{name}")
        } else {
            name
        }
    }
}

/// What is stored beside a vector, and filtered on.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct VectorMeta {
    /// The image's status when it was embedded ("done").
    pub status: String,
    /// The analysis tags, lowercased.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// One image's vector.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorRecord {
    pub tenant: String,
    pub image_id: String,
    /// L2-normalised by the embedder.
    pub vector: Vec<f32>,
    pub meta: VectorMeta,
}

/// A nearest-neighbour search within one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorQuery {
    pub tenant: String,
    pub vector: Vec<f32>,
    /// Hits wanted, 1..=[`MAX_TOP_K`].
    pub top_k: usize,
    /// Only vectors carrying this tag.
    pub tag: Option<String>,
}

/// The most hits one query returns (S3 Vectors' QueryVectors limit).
pub const MAX_TOP_K: usize = 100;

/// One hit, nearest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VectorHit {
    pub image_id: String,
    /// Cosine distance, 1 − cos(query, vector): 0 for the same direction, up to 2.
    pub distance: f32,
    pub meta: VectorMeta,
}

/// Image embeddings by tenant and index: exact cosine search, tenant-scoped.
#[async_trait]
pub trait VectorStore: Send + Sync {
    /// Create the index if it does not exist (idempotent).
    async fn ensure_index(&self, index: &VectorIndex) -> StoreResult<()>;
    /// Insert or replace vectors (the index exists). A vector whose length is not the index's
    /// dimension is refused with [`StoreError::InvalidInput`].
    async fn put_vectors(&self, index: &VectorIndex, records: &[VectorRecord]) -> StoreResult<()>;
    /// One image's vector, if stored.
    async fn get_vector(
        &self,
        index: &VectorIndex,
        tenant: &str,
        image_id: &str,
    ) -> StoreResult<Option<VectorRecord>>;
    /// Delete the vectors of these images in every index (deleting an image, re-indexing).
    /// Missing ones are not an error.
    async fn delete_vectors(&self, tenant: &str, image_ids: &[String]) -> StoreResult<()>;
    /// The `top_k` nearest vectors of the query's tenant, nearest first; ties in image id order.
    /// A missing index has no hits.
    async fn query(&self, index: &VectorIndex, query: &VectorQuery) -> StoreResult<Vec<VectorHit>>;
}

/// What an embedding call returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// L2-normalised, of the embedder's dimension.
    pub vector: Vec<f32>,
    /// Text tokens billed (0 for an image, or when the provider does not say).
    pub input_tokens: u64,
    /// Images billed (1 for an image input, else 0).
    pub images: u64,
}

/// An embedding model: images (the resized JPEG) and, when it understands words, text, into one
/// vector space.
#[async_trait]
pub trait Embedder: Send + Sync {
    /// Provider name ("local", "openai", "bedrock").
    fn name(&self) -> &str;
    /// The model id, as in the price table's `[[embedding_models]]`.
    fn model(&self) -> &str;
    fn dims(&self) -> u32;
    /// Whether text queries land in the same space as images. The offline embedder's do not:
    /// text search then ranks by the analysis text instead (`"mode": "keyword"`).
    fn understands_text(&self) -> bool;
    /// Whether a call is a paid provider call, booked on the ledger. The offline embedder's
    /// are not (like the offline analyzer's, they cost nothing and call nobody).
    fn is_paid(&self) -> bool {
        true
    }
    async fn embed_image(&self, jpeg: &[u8]) -> Result<Embedding, ProviderError>;
    /// Fails with a permanent [`ProviderError`] when [`Embedder::understands_text`] is false.
    async fn embed_text(&self, text: &str) -> Result<Embedding, ProviderError>;
}

/// One image to generate, as a provider is asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationCall {
    pub model: String,
    pub prompt: String,
    pub size: sightline_core::generate::Size,
    pub quality: sightline_core::generate::Quality,
    pub output_format: sightline_core::generate::OutputFormat,
    /// Passed on where the provider takes one (Bedrock, the local generator); OpenAI's Images
    /// API takes none, so the same call may give another picture there.
    pub seed: Option<u64>,
}

impl GenerationCall {
    /// The call a planned job row asks for.
    pub fn of_request(req: &sightline_core::generate::GenerationRequest) -> GenerationCall {
        GenerationCall {
            model: req.model.clone(),
            prompt: req.prompt.clone(),
            size: req.size,
            quality: req.quality,
            output_format: req.output_format,
            seed: req.seed,
        }
    }
}

/// A generated image, checked to decode as the format asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    pub bytes: Vec<u8>,
    /// `image/png`, `image/jpeg` or `image/webp`.
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    /// Tokens billed, where the provider bills and reports them (OpenAI's GPT image models);
    /// None for providers that bill per image.
    pub usage: Option<Usage>,
    /// The model that made it, as the provider names it.
    pub model: String,
}

/// An image generation model behind some API (`local`, `openai`, `bedrock`).
#[async_trait]
pub trait ImageGenerator: Send + Sync {
    /// Provider name stored with results.
    fn name(&self) -> &str;
    /// Whether calls cost money and are booked on the ledger (the local generator's are not).
    fn is_paid(&self) -> bool;
    /// One image. Failures are classified like the vision providers' ([`ProviderError`]): an
    /// answer whose image is unusable is billed invalid output.
    async fn generate(&self, req: &GenerationCall) -> Result<GeneratedImage, ProviderError>;
}

// ---------------------------------------------------------------------------------------------
// Generation jobs
// ---------------------------------------------------------------------------------------------

/// A generation job as stored: its rows are [`GenerationRow`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationJob {
    pub job_id: String,
    pub tenant: String,
    /// The job's template (rows may name others).
    pub template: String,
    pub rows: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Also a webhook per row once it is final (`generation.row.finished`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub webhook_rows: bool,
    /// Regenerate a row once when its check fails.
    pub regenerate: bool,
    pub status: sightline_core::genjob::JobStatus,
    /// Where it came from: `cli`, `api`, or the S3 key of a dropped CSV.
    pub source: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// One row of a generation job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRow {
    pub job_id: String,
    pub tenant: String,
    pub row: u32,
    /// As planned (attempt 1); a regeneration's request is derived from it
    /// ([`sightline_core::genjob::attempt_request`]).
    pub request: sightline_core::generate::GenerationRequest,
    pub status: sightline_core::genjob::RowStatus,
    /// 1, or 2 once regenerated.
    pub attempt: u32,
    /// The image of the current attempt (analysed like any upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// Where the image was delivered (`generated/{tenant}/{job}/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_key: Option<String>,
    /// Generation money of this row: every attempt's call, $0 for images reused.
    #[serde(default)]
    pub generation_cost_usd: f64,
    /// The current image came from an earlier generation of the same request ($0).
    #[serde(default)]
    pub reused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<sightline_core::genjob::CheckVerdict>,
    /// The failed check of the first image, when the row was regenerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_check: Option<sightline_core::genjob::CheckVerdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Queued but waiting for its tenant's budget period to roll over (epoch ms): the sweep
    /// leaves its message alone until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_wait_until_ms: Option<u64>,
    pub updated_at: String,
}

impl GenerationRow {
    /// The request of the row's current attempt.
    pub fn current_request(&self) -> sightline_core::generate::GenerationRequest {
        sightline_core::genjob::attempt_request(&self.request, self.attempt)
    }
}

/// An image generated once for an idempotency key (scoped by tenant): what a rerun reuses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedObject {
    pub tenant: String,
    pub key: String,
    pub blob_key: String,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub provider: String,
    pub model: String,
    #[serde(default)]
    pub usage: Option<Usage>,
    pub cost_usd: f64,
    pub created_at: String,
}

/// What taking the generation claim of a key got.
#[derive(Debug, Clone, PartialEq)]
pub enum GenClaim {
    Acquired,
    /// Generated before: reuse it at $0.
    Done(Box<GeneratedObject>),
    /// Another worker is generating it now.
    Busy {
        retry_in: Duration,
    },
}

/// Where a webhook delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (`next_at_ms`).
    Pending,
    Delivered,
    /// The receiver answered 410 Gone: never sent again unless redelivered by hand.
    Gone,
    /// Out of attempts or time: a dead letter, listed by the API; redelivery is a command.
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Gone => "gone",
            DeliveryStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "gone" => Some(DeliveryStatus::Gone),
            "dead" => Some(DeliveryStatus::Dead),
            _ => None,
        }
    }
}

/// One signed webhook message and its delivery state. The message id (`webhook-id`) stays
/// the same across attempts, so a receiver can drop duplicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    pub delivery_id: String,
    pub tenant: String,
    pub job_id: String,
    pub url: String,
    pub event: String,
    /// The JSON body, signed anew at each attempt (the timestamp changes).
    pub body: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_at_ms: u64,
    pub first_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl WebhookDelivery {
    /// A new delivery of `event`, due now: the body is the event envelope
    /// `{"type", "timestamp", "data"}` every sightline webhook carries.
    pub fn new_event(
        delivery_id: String,
        tenant: &str,
        job_id: &str,
        url: &str,
        event: &str,
        data: serde_json::Value,
        now_ms: u64,
    ) -> WebhookDelivery {
        let now = rfc3339(now_ms);
        let body = serde_json::json!({ "type": event, "timestamp": now, "data": data });
        WebhookDelivery {
            delivery_id,
            tenant: tenant.to_string(),
            job_id: job_id.to_string(),
            url: url.to_string(),
            event: event.to_string(),
            body: body.to_string(),
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_at_ms: now_ms,
            first_at_ms: now_ms,
            last_status: None,
            last_error: None,
            created_at: now.clone(),
            updated_at: now,
        }
    }
}

/// Generation jobs, their rows, the per-tenant cache of generated images, and webhook
/// deliveries.
/// The secrets tenants' webhooks are signed with: the settings locally, SSM on AWS.
#[async_trait]
pub trait WebhookSecrets: Send + Sync {
    /// The tenant's `whsec_` secret; None when it has none (its jobs may not name a webhook).
    async fn secret_for(&self, tenant: &str) -> StoreResult<Option<String>>;
}

#[async_trait]
pub trait GenerationStore: Send + Sync {
    /// Store a new job and its rows (all or nothing).
    async fn create_job(&self, job: &GenerationJob, rows: &[GenerationRow]) -> StoreResult<()>;
    async fn get_job(&self, tenant: &str, job_id: &str) -> StoreResult<Option<GenerationJob>>;
    /// A tenant's jobs, newest first.
    async fn list_jobs(&self, tenant: &str, limit: usize) -> StoreResult<Vec<GenerationJob>>;
    /// Jobs of every tenant still running (the sweep).
    async fn running_jobs(&self, limit: usize) -> StoreResult<Vec<GenerationJob>>;
    async fn rows(&self, tenant: &str, job_id: &str) -> StoreResult<Vec<GenerationRow>>;
    async fn get_row(
        &self,
        tenant: &str,
        job_id: &str,
        row: u32,
    ) -> StoreResult<Option<GenerationRow>>;
    /// Replace a row if it still is at `(expected status, expected attempt)`: two workers
    /// moving the same row on can never both win. False when it was not.
    async fn update_row(
        &self,
        row: &GenerationRow,
        expected: (sightline_core::genjob::RowStatus, u32),
    ) -> StoreResult<bool>;
    /// Mark a running job finished and record its webhook delivery (if any) at once; false
    /// when it was finished already (nothing written).
    async fn finish_job(
        &self,
        tenant: &str,
        job_id: &str,
        finished_at: &str,
        delivery: Option<&WebhookDelivery>,
    ) -> StoreResult<bool>;

    /// Take the claim to generate `key` for a tenant, or learn it was generated (or is being).
    async fn claim_generation(
        &self,
        tenant: &str,
        key: &str,
        owner: &str,
        lease: Duration,
        now_ms: u64,
    ) -> StoreResult<GenClaim>;
    async fn release_generation(&self, tenant: &str, key: &str, owner: &str) -> StoreResult<()>;
    /// Record a generated image under its key (ends the claim). A second record of the same
    /// key keeps the first.
    async fn put_generated(&self, object: &GeneratedObject) -> StoreResult<()>;
    /// Drop the record of `object` whose stored image is gone (the bucket's lifecycle expired
    /// it, or someone deleted it), so the key can be generated again. Only that record: a
    /// newer one of the same key stays.
    async fn forget_generated(&self, object: &GeneratedObject) -> StoreResult<()>;

    async fn put_delivery(&self, delivery: &WebhookDelivery) -> StoreResult<()>;
    async fn get_delivery(
        &self,
        tenant: &str,
        delivery_id: &str,
    ) -> StoreResult<Option<WebhookDelivery>>;
    /// Pending deliveries due at `now_ms`, oldest first.
    async fn due_deliveries(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<WebhookDelivery>>;
    /// Replace a delivery if its attempts are still `expected_attempts` (one sender per attempt).
    async fn update_delivery(
        &self,
        delivery: &WebhookDelivery,
        expected_attempts: u32,
    ) -> StoreResult<bool>;
    /// A tenant's deliveries, newest first; `status` filters.
    async fn list_deliveries(
        &self,
        tenant: &str,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> StoreResult<Vec<WebhookDelivery>>;
}
