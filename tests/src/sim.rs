//! Provider simulator: a fake of OpenAI's `POST /v1/chat/completions`, Anthropic's
//! `POST /v1/messages` and Amazon Bedrock's `POST /model/{modelId}/converse` for vision
//! requests ([`bedrock`] has Bedrock's wire format). The routes share one flow (auth → body →
//! poison → faults → rate limits → latency → answer) and one set of windows, faults and stats;
//! only the wire format differs ([`Api`]). Embeddings ([`embed`]: OpenAI-compatible
//! `POST /v1/embeddings`, Bedrock's `POST /model/{modelId}/invoke` for Titan and Nova) follow
//! the same flow with the same windows and faults, and answer deterministic vectors. Image
//! generation ([`images`]: `POST /v1/images/generations`, Bedrock's `invoke` for Nova Canvas and
//! Titan Image Generator v2) does too, answering small real pictures.
//!
//! Deterministic enough for tests and realistic enough for benchmarks:
//!
//! - **Auth**: OpenAI: `Authorization: Bearer <key>`; a missing or wrong key is a 401
//!   (`invalid_api_key`). Anthropic: `x-api-key: <key>` (401 `authentication_error`) and an
//!   `anthropic-version` header (400 `invalid_request_error` when missing). With
//!   [`SimConfig::api_key`] empty any non-empty key is accepted (each key then has its own
//!   rate-limit windows, shared by both routes).
//! - **Usage** follows the published image-token rules of `sightline-core`
//!   ([`PriceTable::builtin`]). OpenAI: `prompt_tokens` = Σ per message
//!   ([`MESSAGE_OVERHEAD_TOKENS`] + tokens of the role + tokens of each text part (≈ chars/4,
//!   [`text_tokens`]) + image tokens of each image) + [`REPLY_PRIMING_TOKENS`]. Anthropic:
//!   `input_tokens` = tokens of `system` + Σ per message ([`MESSAGE_OVERHEAD_TOKENS`] + tokens of
//!   each text block + image tokens of each image, by the model's `anthropic` rule). Output
//!   tokens = [`text_tokens`] of the answer. Models not in the table are a 404
//!   (`model_not_found`); the Anthropic route also answers 404 `not_found_error` for models of
//!   other providers.
//! - **Content**: a JSON object string with `description`, `category`, `tags`, `objects`, `text`
//!   and `quality_issues`, derived from the image's pixels (size, mean brightness, tone,
//!   contrast) and its sha256, so it is the same for the same image and differs between images.
//!   If it does not fit in `max_tokens` it is cut, with `finish_reason: "length"` (OpenAI) or
//!   `stop_reason: "max_tokens"` (Anthropic). Anthropic answers are
//!   `{"type":"message","content":[{"type":"text","text":…}],"stop_reason":…,"usage":…}`.
//! - **Rate limits**: per-key RPM and TPM (0 = unlimited), enforced by one of two models
//!   ([`LimitModel`]): sliding 60 s windows (the default), or what OpenAI documents, a bucket
//!   refilled continuously at the per-minute rate and enforced over a short quantum (1 s:
//!   600 RPM admits at most 10 at once). TPM counts
//!   prompt tokens + `max_completion_tokens`/`max_tokens` (or [`DEFAULT_MAX_TOKENS`]) at admission
//!   like OpenAI's estimate ([`SimStats::tokens_admitted`]). Requests rejected with 429 do not
//!   count. Every response after
//!   authentication carries the limit headers. OpenAI: the six `x-ratelimit-*` headers (`reset`
//!   = time until capacity frees in a sliding window, until the bucket is full in the quantized
//!   model; Go duration format: `"20ms"`, `"1.5s"`, `"6m0s"`; unlimited
//!   dimensions report [`UNLIMITED_REPORTED`]); a 429 carries `Retry-After` (decimal seconds) and
//!   `retry-after-ms`. Anthropic: `anthropic-ratelimit-requests-*` and
//!   `anthropic-ratelimit-tokens-*` (`-limit`, `-remaining`, `-reset` as an RFC 3339 instant,
//!   rounded up to the second; the one token window is reported as the combined `tokens-*`, no
//!   `input-tokens-*`/`output-tokens-*`); a 429 `rate_limit_error` carries `retry-after` in whole
//!   seconds, rounded up.
//! - **Faults** ([`FaultPlan`]): probabilities for 5xx, 429, timeouts, malformed bodies and
//!   non-JSON content, an `every_nth` schedule, and the per-request header `x-sim-fault`
//!   (`500|502|503|504|429|timeout|malformed|bad-content|none`; `529` and `overloaded` are
//!   names of 503). 503 is "the provider is overloaded": the OpenAI route answers 503, the
//!   Anthropic route 529 `overloaded_error`; 500 is Anthropic's `api_error`. Draws come from a
//!   `StdRng` seeded from [`SimConfig::seed`] and the request's sequence number, so a run is
//!   reproducible.
//! - **Poison images** ([`FaultPlan::poison_rate`]): a fraction of *images* (not requests) that
//!   the provider always rejects with a 400 `image_rejected`, a permanent error, whatever else is
//!   configured. Which images are poison depends only on the seed and the image's sha256
//!   ([`is_poison`]), so a harness can predict them.
//! - **Batches** ([`batch`]): OpenAI Files + Batches and Anthropic Message Batches, each line
//!   answered by this route's code; their counters are [`SimStats::batch`].
//! - **Control**: `GET /sim/stats`, `POST /sim/reset`, `GET|POST /sim/config` (a partial JSON
//!   object merged into the current config), `GET /v1/models`.
//!
//! Order of checks for a call: auth (401; Anthropic's missing version: 400) → JSON/body
//! validation (400) → model (404) → image decoding (400) → poison image (400, before any fault or
//! limit; not counted in the windows) → fault decision (an injected 429 returns here, not counted
//! in the windows) → rate-limit admission (429) → latency → other injected faults or success.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io::Cursor;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sightline_core::model::Detail;
use sightline_core::pricing::{text_tokens, ModelPrice, PriceTable};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod batch;
pub mod bedrock;
pub mod embed;
pub mod images;

use batch::BatchStore;
pub use batch::{BatchConfig, BatchStats};
pub use embed::EmbedStats;
pub use images::ImageStats;

/// Length of the rate-limit windows.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Tokens added per message (role/separators), as in OpenAI's token-counting guide.
pub const MESSAGE_OVERHEAD_TOKENS: u64 = 3;
/// Tokens added once per request to prime the assistant's reply.
pub const REPLY_PRIMING_TOKENS: u64 = 3;
/// Output tokens assumed for TPM admission when the request sets no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// Value of `x-ratelimit-limit-*` / `x-ratelimit-remaining-*` for an unlimited dimension.
pub const UNLIMITED_REPORTED: u64 = 1_000_000_000;
/// Largest request body accepted (OpenAI allows up to 50 MB of images per request).
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Header that forces a fault for one request.
pub const FAULT_HEADER: &str = "x-sim-fault";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// One injectable fault. String forms (header `x-sim-fault`, JSON, CLI): `"500"`, `"502"`,
/// `"503"`, `"504"`, `"429"`, `"timeout"`, `"malformed"`, `"bad-content"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Fault {
    /// 500 `server_error` JSON body.
    Http500,
    /// 502 with an HTML body, like the CDN in front of OpenAI.
    Http502,
    /// 503 "overloaded" JSON body (Anthropic's route: 529 `overloaded_error`).
    Http503,
    /// 504 gateway timeout JSON body.
    Http504,
    /// 429 with `Retry-After` = [`FaultPlan::retry_after_s`].
    RateLimit,
    /// Hang for [`SimConfig::timeout_hang_ms`], then drop the connection mid-response.
    Timeout,
    /// 200 whose body is truncated JSON.
    Malformed,
    /// 200 with a valid envelope whose message content is not JSON.
    BadContent,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Http500,
        Fault::Http502,
        Fault::Http503,
        Fault::Http504,
        Fault::RateLimit,
        Fault::Timeout,
        Fault::Malformed,
        Fault::BadContent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Http500 => "500",
            Fault::Http502 => "502",
            Fault::Http503 => "503",
            Fault::Http504 => "504",
            Fault::RateLimit => "429",
            Fault::Timeout => "timeout",
            Fault::Malformed => "malformed",
            Fault::BadContent => "bad-content",
        }
    }

    /// The 5xx fault for `status`, if it is one the simulator can produce.
    pub fn server_error(status: u16) -> Option<Fault> {
        match status {
            500 => Some(Fault::Http500),
            502 => Some(Fault::Http502),
            503 => Some(Fault::Http503),
            504 => Some(Fault::Http504),
            _ => None,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        Fault::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .or(match s.as_str() {
                "rate-limit" | "rate_limit" => Some(Fault::RateLimit),
                // Anthropic's name for "overloaded".
                "529" | "overloaded" => Some(Fault::Http503),
                "bad_content" => Some(Fault::BadContent),
                _ => None,
            })
            .ok_or_else(|| {
                format!("unknown fault {s:?}; expected one of 500, 502, 503, 504, 429, timeout, malformed, bad-content")
            })
    }
}

impl TryFrom<String> for Fault {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Fault> for String {
    fn from(f: Fault) -> String {
        f.as_str().to_string()
    }
}

/// A deterministic schedule: the `n`th, `2n`th, … valid request gets `fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EveryNth {
    pub n: u64,
    pub fault: Fault,
}

/// Which faults to inject. Probabilities are per valid request and must add up to ≤ 1; the
/// precedence is `x-sim-fault` header > `every_nth` > probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    /// Probability of a 5xx; the status is drawn uniformly from `error_statuses`.
    pub error_rate: f64,
    /// 5xx statuses to draw from (500, 502, 503, 504).
    pub error_statuses: Vec<u16>,
    /// Probability of an injected 429.
    pub rate_limit_rate: f64,
    /// `Retry-After` (seconds) of an injected 429.
    pub retry_after_s: f64,
    /// Probability of a hang of [`SimConfig::timeout_hang_ms`].
    pub timeout_rate: f64,
    /// Probability of a 200 with truncated JSON.
    pub malformed_rate: f64,
    /// Probability of a 200 whose message content is not JSON.
    pub bad_content_rate: f64,
    /// Deterministic schedule, applied before the probabilities.
    pub every_nth: Option<EveryNth>,
    /// Fraction of images that are "poison": every request carrying one is a 400
    /// `image_rejected`, always (see [`is_poison`]). Per image, not per request, so it is not
    /// part of the probabilities that must add up to ≤ 1.
    pub poison_rate: f64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_statuses: vec![500, 502, 503],
            rate_limit_rate: 0.0,
            retry_after_s: 1.0,
            timeout_rate: 0.0,
            malformed_rate: 0.0,
            bad_content_rate: 0.0,
            every_nth: None,
            poison_rate: 0.0,
        }
    }
}

impl FaultPlan {
    /// No faults at all.
    pub fn none() -> Self {
        Self::default()
    }

    fn validate(&self) -> Result<(), String> {
        let rates = [
            ("error_rate", self.error_rate),
            ("rate_limit_rate", self.rate_limit_rate),
            ("timeout_rate", self.timeout_rate),
            ("malformed_rate", self.malformed_rate),
            ("bad_content_rate", self.bad_content_rate),
        ];
        for (name, r) in rates {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("faults.{name} must be in [0, 1], got {r}"));
            }
        }
        let sum: f64 = rates.iter().map(|(_, r)| r).sum();
        if sum > 1.0 + 1e-9 {
            return Err(format!("fault probabilities add up to {sum} > 1"));
        }
        if !(0.0..=1.0).contains(&self.poison_rate) {
            return Err(format!(
                "faults.poison_rate must be in [0, 1], got {}",
                self.poison_rate
            ));
        }
        for s in &self.error_statuses {
            if Fault::server_error(*s).is_none() {
                return Err(format!(
                    "faults.error_statuses: {s} is not one of 500, 502, 503, 504"
                ));
            }
        }
        if self.error_rate > 0.0 && self.error_statuses.is_empty() {
            return Err("faults.error_rate > 0 needs at least one error status".into());
        }
        if !(self.retry_after_s.is_finite() && (0.0..86_400.0).contains(&self.retry_after_s)) {
            return Err(format!(
                "faults.retry_after_s must be in [0, 86400), got {}",
                self.retry_after_s
            ));
        }
        if let Some(e) = &self.every_nth {
            if e.n == 0 {
                return Err("faults.every_nth.n must be ≥ 1".into());
            }
        }
        Ok(())
    }
}

/// Simulator settings; every field can be changed at run time (`POST /sim/config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// The one accepted key (bearer or `x-api-key`); empty = accept any non-empty key.
    pub api_key: String,
    /// Requests per minute per key (0 = unlimited).
    pub rpm: u64,
    /// Tokens per minute per key (0 = unlimited).
    pub tpm: u64,
    /// How `rpm` and `tpm` are enforced ([`LimitModel`]).
    pub limit_model: LimitModel,
    /// The period a [`LimitModel::Quantized`] limit is enforced over: at most
    /// `limit × quantum_ms / 60,000` at once (at least one request).
    pub quantum_ms: u64,
    /// Fixed latency added to every admitted request.
    pub latency_ms: u64,
    /// Extra uniformly random latency in `0..=jitter_ms`.
    pub jitter_ms: u64,
    pub faults: FaultPlan,
    pub seed: u64,
    /// How long a `timeout` fault hangs before dropping the connection.
    pub timeout_hang_ms: u64,
    /// The batch endpoints: timing, limits and faults ([`batch`]).
    pub batch: BatchConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_key: "sk-sim".into(),
            rpm: 0,
            tpm: 0,
            limit_model: LimitModel::default(),
            quantum_ms: 1_000,
            latency_ms: 0,
            jitter_ms: 0,
            faults: FaultPlan::default(),
            seed: 1,
            timeout_hang_ms: 30_000,
            batch: BatchConfig::default(),
        }
    }
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.limit_model == LimitModel::Quantized && self.quantum_ms == 0 {
            return Err("quantum_ms must be at least 1 with the quantized limit model".into());
        }
        self.faults.validate()?;
        self.batch.validate()
    }

    fn limits(&self) -> LimitCfg {
        LimitCfg {
            model: self.limit_model,
            rpm: self.rpm,
            tpm: self.tpm,
            quantum_ms: self.quantum_ms,
        }
    }
}

/// How the simulator enforces its per-minute limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitModel {
    /// A sliding 60 s window: a minute's worth may go at once, then each request waits for
    /// the oldest to leave the window; `reset` is the time until the oldest leaves.
    #[default]
    SlidingMinute,
    /// What OpenAI documents: limits "can be quantized, meaning they are enforced over shorter
    /// periods of time (e.g. 60,000 requests/minute may be enforced as 1,000
    /// requests/second)". Each limit is a bucket refilled continuously at the per-minute rate;
    /// admission takes from a bucket holding one quantum's share ([`SimConfig::quantum_ms`]),
    /// so a burst past it is a 429 however little of the minute is used. The headers report
    /// the minute's bucket as OpenAI's do: `remaining` of the limit, `reset` the time until it
    /// is full ("resets to its initial state").
    Quantized,
}

impl FromStr for LimitModel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sliding-minute" | "sliding_minute" => Ok(LimitModel::SlidingMinute),
            "quantized" => Ok(LimitModel::Quantized),
            other => Err(format!(
                "unknown limit model {other:?} (sliding-minute or quantized)"
            )),
        }
    }
}

/// The limits as admission needs them.
#[derive(Debug, Clone, Copy)]
struct LimitCfg {
    model: LimitModel,
    rpm: u64,
    tpm: u64,
    quantum_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// Stats
// ---------------------------------------------------------------------------------------------

/// Injected faults, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    pub http_500: u64,
    pub http_502: u64,
    pub http_503: u64,
    pub http_504: u64,
    pub rate_limit: u64,
    pub timeout: u64,
    pub malformed: u64,
    pub bad_content: u64,
}

impl FaultCounts {
    pub fn get(&self, f: Fault) -> u64 {
        match f {
            Fault::Http500 => self.http_500,
            Fault::Http502 => self.http_502,
            Fault::Http503 => self.http_503,
            Fault::Http504 => self.http_504,
            Fault::RateLimit => self.rate_limit,
            Fault::Timeout => self.timeout,
            Fault::Malformed => self.malformed,
            Fault::BadContent => self.bad_content,
        }
    }

    fn bump(&mut self, f: Fault) {
        let slot = match f {
            Fault::Http500 => &mut self.http_500,
            Fault::Http502 => &mut self.http_502,
            Fault::Http503 => &mut self.http_503,
            Fault::Http504 => &mut self.http_504,
            Fault::RateLimit => &mut self.rate_limit,
            Fault::Timeout => &mut self.timeout,
            Fault::Malformed => &mut self.malformed,
            Fault::BadContent => &mut self.bad_content,
        };
        *slot += 1;
    }

    pub fn total(&self) -> u64 {
        Fault::ALL.iter().map(|f| self.get(*f)).sum()
    }
}

/// Counters since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Every `POST /v1/chat/completions`, `POST /v1/messages` and Bedrock `converse`.
    pub requests: u64,
    /// 200 responses with well-formed JSON content (no fault injected).
    pub completions: u64,
    /// 401s (Bedrock's route: 403 `UnrecognizedClientException`).
    pub unauthorized: u64,
    /// 400s (invalid body, image, parameter or `x-sim-fault` value).
    pub bad_requests: u64,
    /// 404s (unknown model).
    pub not_found: u64,
    /// 429s from the RPM/TPM limiter (injected 429s are in `faults.rate_limit`).
    pub rate_limited: u64,
    /// Injected faults.
    pub faults: FaultCounts,
    /// Prompt tokens of every 200 (completions, malformed and bad-content responses).
    pub prompt_tokens: u64,
    /// Completion tokens of every 200.
    pub completion_tokens: u64,
    /// `prompt_tokens + completion_tokens`: what OpenAI would bill.
    pub tokens_billed: u64,
    /// Tokens the TPM limit counted for the admitted requests (prompt + `max_tokens`).
    #[serde(default)]
    pub tokens_admitted: u64,
    /// When the first and the last admitted request were admitted (ms since the epoch; 0:
    /// none yet): how long the limits kept the provider busy.
    #[serde(default)]
    pub first_admitted_ms: u64,
    #[serde(default)]
    pub last_admitted_ms: u64,
    /// Valid, authenticated requests per image sha256 (hex of the decoded image bytes),
    /// whatever their outcome: "how often was the provider called with this image".
    pub requests_per_image: BTreeMap<String, u64>,
    /// Successful completions per image sha256.
    pub completions_per_image: BTreeMap<String, u64>,
    /// 400 `image_rejected` answers to requests carrying a poison image (not in `bad_requests`).
    pub poisoned: u64,
    /// Distinct poison images seen (`poisoned_per_image.len()`).
    pub poisoned_images: u64,
    /// Rejected requests per poison image sha256.
    pub poisoned_per_image: BTreeMap<String, u64>,
    /// Calls (either route) being handled now.
    pub in_flight: u64,
    /// Most calls handled at once.
    pub peak_in_flight: u64,
    /// The batch endpoints (their lines are not in the real-time counters above).
    #[serde(default)]
    pub batch: BatchStats,
    /// The embedding routes (not in `requests`; their injected faults and limiter 429s are in
    /// `faults` and `rate_limited` with the others').
    #[serde(default)]
    pub embeddings: EmbedStats,
    /// The image generation routes (not in `requests`; their injected faults and limiter 429s
    /// are in `faults` and `rate_limited` with the others').
    #[serde(default)]
    pub images: ImageStats,
}

// ---------------------------------------------------------------------------------------------
// Rate-limit windows
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Window {
    /// Sliding minute: admitted requests, (time, estimated tokens), oldest first.
    entries: VecDeque<(Instant, u64)>,
    /// Quantized: the buckets, from the first request on.
    buckets: Option<Buckets>,
}

/// The quantized model's buckets as levels at `at`: the minute's (reported in the headers)
/// and the quantum's (what admission takes from).
#[derive(Debug, Clone, Copy)]
struct Buckets {
    at: Instant,
    minute_requests: f64,
    minute_tokens: f64,
    quantum_requests: f64,
    quantum_tokens: f64,
}

#[derive(Debug, Clone, Copy)]
struct LimitSnapshot {
    limit_requests: u64,
    limit_tokens: u64,
    remaining_requests: u64,
    remaining_tokens: u64,
    reset_requests: Duration,
    reset_tokens: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LimitKind {
    Requests,
    Tokens,
}

#[derive(Debug)]
enum Admission {
    Admitted(LimitSnapshot),
    Limited {
        kind: LimitKind,
        limit: u64,
        used: u64,
        requested: u64,
        /// `None` when the request alone is over the limit (retrying cannot help).
        wait: Option<Duration>,
        snapshot: LimitSnapshot,
    },
}

/// Units of a per-minute limit refilled per millisecond.
fn per_ms(per_minute: u64) -> f64 {
    per_minute as f64 / 60_000.0
}

/// The quantum's share of a per-minute limit (at least one unit).
fn quantum_share(per_minute: u64, quantum_ms: u64) -> f64 {
    (per_ms(per_minute) * quantum_ms as f64).max(1.0)
}

/// How long until `needed` more units refill at `per_minute`.
fn refill_time(needed: f64, per_minute: u64) -> Duration {
    Duration::from_secs_f64((needed.max(0.0) / per_ms(per_minute)) / 1000.0)
}

impl Window {
    fn prune(&mut self, now: Instant) {
        while let Some((t, _)) = self.entries.front() {
            if now.saturating_duration_since(*t) >= WINDOW {
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    fn used_tokens(&self) -> u64 {
        self.entries.iter().map(|(_, t)| t).sum()
    }

    fn expiry(&self, idx: usize, now: Instant) -> Duration {
        self.entries
            .get(idx)
            .map(|(t, _)| (*t + WINDOW).saturating_duration_since(now))
            .unwrap_or_default()
    }

    fn snapshot(&mut self, now: Instant, lim: &LimitCfg) -> LimitSnapshot {
        match lim.model {
            LimitModel::SlidingMinute => self.sliding_snapshot(now, lim.rpm, lim.tpm),
            LimitModel::Quantized => {
                let b = self.refill(now, lim);
                Self::bucket_snapshot(&b, lim)
            }
        }
    }

    fn admit(&mut self, now: Instant, lim: &LimitCfg, requested: u64) -> Admission {
        match lim.model {
            LimitModel::SlidingMinute => self.admit_sliding(now, lim.rpm, lim.tpm, requested),
            LimitModel::Quantized => self.admit_quantized(now, lim, requested),
        }
    }

    /// The buckets refilled up to `now` (full at the first request).
    fn refill(&mut self, now: Instant, lim: &LimitCfg) -> Buckets {
        let (rpm, tpm, q) = (lim.rpm as f64, lim.tpm as f64, lim.quantum_ms);
        let b = self.buckets.get_or_insert(Buckets {
            at: now,
            minute_requests: rpm,
            minute_tokens: tpm,
            quantum_requests: quantum_share(lim.rpm, q),
            quantum_tokens: quantum_share(lim.tpm, q),
        });
        let dt = now.saturating_duration_since(b.at).as_secs_f64() * 1000.0;
        let (dr, dtk) = (dt * per_ms(lim.rpm), dt * per_ms(lim.tpm));
        b.minute_requests = (b.minute_requests + dr).min(rpm);
        b.minute_tokens = (b.minute_tokens + dtk).min(tpm);
        b.quantum_requests = (b.quantum_requests + dr).min(quantum_share(lim.rpm, q));
        b.quantum_tokens = (b.quantum_tokens + dtk).min(quantum_share(lim.tpm, q));
        b.at = now;
        *b
    }

    fn bucket_snapshot(b: &Buckets, lim: &LimitCfg) -> LimitSnapshot {
        let report = |limit: u64, level: f64| {
            if limit == 0 {
                (UNLIMITED_REPORTED, UNLIMITED_REPORTED, Duration::ZERO)
            } else {
                let level = level.max(0.0);
                (
                    limit,
                    level.floor() as u64,
                    refill_time(limit as f64 - level, limit),
                )
            }
        };
        let (limit_requests, remaining_requests, reset_requests) =
            report(lim.rpm, b.minute_requests);
        let (limit_tokens, remaining_tokens, reset_tokens) = report(lim.tpm, b.minute_tokens);
        LimitSnapshot {
            limit_requests,
            limit_tokens,
            remaining_requests,
            remaining_tokens,
            reset_requests,
            reset_tokens,
        }
    }

    fn admit_quantized(&mut self, now: Instant, lim: &LimitCfg, requested: u64) -> Admission {
        let b = self.refill(now, lim);
        let snapshot = Self::bucket_snapshot(&b, lim);
        if lim.rpm > 0 && b.quantum_requests < 1.0 {
            return Admission::Limited {
                kind: LimitKind::Requests,
                limit: lim.rpm,
                used: lim.rpm.saturating_sub(snapshot.remaining_requests),
                requested: 1,
                wait: Some(refill_time(1.0 - b.quantum_requests, lim.rpm)),
                snapshot,
            };
        }
        if lim.tpm > 0 {
            let used = lim.tpm.saturating_sub(snapshot.remaining_tokens);
            if requested > lim.tpm {
                return Admission::Limited {
                    kind: LimitKind::Tokens,
                    limit: lim.tpm,
                    used,
                    requested,
                    wait: None,
                    snapshot,
                };
            }
            // A request larger than the quantum's share goes when that bucket is full.
            let needed = (requested as f64).min(quantum_share(lim.tpm, lim.quantum_ms));
            if b.quantum_tokens < needed {
                return Admission::Limited {
                    kind: LimitKind::Tokens,
                    limit: lim.tpm,
                    used,
                    requested,
                    wait: Some(refill_time(needed - b.quantum_tokens, lim.tpm)),
                    snapshot,
                };
            }
        }
        if let Some(b) = self.buckets.as_mut() {
            if lim.rpm > 0 {
                b.quantum_requests -= 1.0;
                b.minute_requests -= 1.0;
            }
            if lim.tpm > 0 {
                b.quantum_tokens -= requested as f64;
                b.minute_tokens -= requested as f64;
            }
        }
        let b = self.refill(now, lim);
        Admission::Admitted(Self::bucket_snapshot(&b, lim))
    }

    fn sliding_snapshot(&mut self, now: Instant, rpm: u64, tpm: u64) -> LimitSnapshot {
        self.prune(now);
        let count = self.entries.len() as u64;
        let used = self.used_tokens();
        let reset = self.expiry(0, now);
        let (limit_requests, remaining_requests, reset_requests) = if rpm == 0 {
            (UNLIMITED_REPORTED, UNLIMITED_REPORTED, Duration::ZERO)
        } else {
            (rpm, rpm.saturating_sub(count), reset)
        };
        let (limit_tokens, remaining_tokens, reset_tokens) = if tpm == 0 {
            (UNLIMITED_REPORTED, UNLIMITED_REPORTED, Duration::ZERO)
        } else {
            (tpm, tpm.saturating_sub(used), reset)
        };
        LimitSnapshot {
            limit_requests,
            limit_tokens,
            remaining_requests,
            remaining_tokens,
            reset_requests,
            reset_tokens,
        }
    }

    fn admit_sliding(&mut self, now: Instant, rpm: u64, tpm: u64, requested: u64) -> Admission {
        self.prune(now);
        let count = self.entries.len() as u64;
        if rpm > 0 && count >= rpm {
            // `count - rpm + 1` entries must expire; the last of them is at index count - rpm.
            let wait = self.expiry((count - rpm) as usize, now);
            let mut snapshot = self.sliding_snapshot(now, rpm, tpm);
            snapshot.reset_requests = wait;
            return Admission::Limited {
                kind: LimitKind::Requests,
                limit: rpm,
                used: count,
                requested: 1,
                wait: Some(wait),
                snapshot,
            };
        }
        let used = self.used_tokens();
        if tpm > 0 && used + requested > tpm {
            let snapshot = self.sliding_snapshot(now, rpm, tpm);
            if requested > tpm {
                return Admission::Limited {
                    kind: LimitKind::Tokens,
                    limit: tpm,
                    used,
                    requested,
                    wait: None,
                    snapshot,
                };
            }
            let needed = used + requested - tpm;
            let mut freed = 0;
            let mut wait = Duration::ZERO;
            for (i, (_, t)) in self.entries.iter().enumerate() {
                freed += t;
                if freed >= needed {
                    wait = self.expiry(i, now);
                    break;
                }
            }
            let mut snapshot = snapshot;
            snapshot.reset_tokens = wait;
            return Admission::Limited {
                kind: LimitKind::Tokens,
                limit: tpm,
                used,
                requested,
                wait: Some(wait),
                snapshot,
            };
        }
        self.entries.push_back((now, requested));
        Admission::Admitted(self.sliding_snapshot(now, rpm, tpm))
    }
}

/// Go-style duration as in OpenAI's `x-ratelimit-reset-*`: `"0s"`, `"20ms"`, `"1.5s"`, `"6m0s"`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let total_s = ms / 1000;
    let frac = ms % 1000;
    let (h, m, s) = (total_s / 3600, (total_s % 3600) / 60, total_s % 60);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let f = format!("{frac:03}");
        format!("{s}.{}s", f.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

/// `Retry-After` value: decimal seconds rounded up to the millisecond (`"2"`, `"1.25"`).
pub fn format_retry_after(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    let (s, frac) = (ms / 1000, ms % 1000);
    if frac == 0 {
        format!("{s}")
    } else {
        let f = format!("{frac:03}");
        format!("{s}.{}", f.trim_end_matches('0'))
    }
}

/// Whether the image with sha256 `image_sha_hex` (hex of the decoded image bytes, as in
/// [`SimStats::requests_per_image`]) is poison under `seed` and `rate`: the first 8 bytes of
/// sha256(seed as little-endian bytes ‖ `image_sha_hex`), as a big-endian u64 divided by
/// `u64::MAX`, fall below `rate`. Pure, so a harness can predict the simulator's choice.
pub fn is_poison(seed: u64, image_sha_hex: &str, rate: f64) -> bool {
    if rate <= 0.0 || rate.is_nan() {
        return false;
    }
    if rate >= 1.0 {
        return true;
    }
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(image_sha_hex.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) as f64 / u64::MAX as f64) < rate
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Inner {
    cfg: SimConfig,
    stats: SimStats,
    windows: HashMap<String, Window>,
    /// Sequence number of valid requests (drives `every_nth` and the per-request RNG).
    valid_seq: u64,
    /// Uploaded files and batches (kept across a stats reset).
    batches: BatchStore,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters inconsistent enough to matter.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> SimStats {
        let mut g = self.lock();
        // Batches whose time has come end (and bill) now, so the counters are current.
        batch::settle(&mut g, Instant::now());
        g.stats.clone()
    }

    fn reset(&self) {
        let mut g = self.lock();
        let in_flight = g.stats.in_flight;
        g.stats = SimStats {
            in_flight,
            peak_in_flight: in_flight,
            ..SimStats::default()
        };
        g.windows.clear();
        g.valid_seq = 0;
    }

    fn snapshot(&self, key: &str) -> LimitSnapshot {
        let mut g = self.lock();
        let lim = g.cfg.limits();
        g.windows
            .entry(key.to_string())
            .or_default()
            .snapshot(Instant::now(), &lim)
    }
}

/// Decrements `in_flight` when the request ends, including when the client goes away.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(sh: &Arc<Shared>) -> InFlight {
        let mut g = sh.lock();
        g.stats.requests += 1;
        g.stats.in_flight += 1;
        g.stats.peak_in_flight = g.stats.peak_in_flight.max(g.stats.in_flight);
        drop(g);
        InFlight(sh.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.stats.in_flight = g.stats.in_flight.saturating_sub(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// A running simulator. Dropping it (or [`SimServer::shutdown`]) stops it.
pub struct SimServer {
    /// `http://127.0.0.1:PORT/v1` — use as an OpenAI client's base URL.
    pub base_url: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SimServer {
    /// Start on 127.0.0.1 with an OS-chosen port.
    pub async fn start(cfg: SimConfig) -> anyhow::Result<SimServer> {
        Self::start_on(cfg, 0).await
    }

    /// Start on 127.0.0.1:`port` (0 = OS-chosen).
    pub async fn start_on(cfg: SimConfig, port: u16) -> anyhow::Result<SimServer> {
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("invalid simulator config: {e}"))?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("binding 127.0.0.1:{port}"))?;
        let addr = listener.local_addr().context("local address")?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                cfg,
                stats: SimStats::default(),
                windows: HashMap::new(),
                valid_seq: 0,
                batches: BatchStore::default(),
            }),
            shutdown: shutdown_rx.clone(),
        });
        let app = router(shared.clone());
        let mut rx = shutdown_rx;
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // Ends on `true` or when the sender (the SimServer) is dropped.
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("provider-sim: server error: {e}");
            }
        });
        Ok(SimServer {
            base_url: format!("http://{addr}/v1"),
            addr,
            shared,
            shutdown_tx,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` — use as an Anthropic client's base URL (it posts to
    /// `{base}/v1/messages`).
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT{path}`, e.g. `url("/sim/stats")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// Zero the counters, empty the rate-limit windows and restart the fault sequence.
    pub async fn reset(&self) {
        self.shared.reset()
    }

    pub async fn config(&self) -> SimConfig {
        self.shared.lock().cfg.clone()
    }

    /// Replace the config (limits and faults apply to the next request).
    pub async fn set_config(&self, cfg: SimConfig) -> anyhow::Result<()> {
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("invalid simulator config: {e}"))?;
        self.shared.lock().cfg = cfg;
        Ok(())
    }

    /// Stop accepting connections; hanging `timeout` requests are released.
    pub fn shutdown(self) {
        drop(self)
    }

    /// Stop and wait until the server task has ended.
    pub async fn shutdown_and_wait(mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|state, headers, body| detached(handle(Api::OpenAi, None, state, headers, body))),
        )
        .route(
            "/v1/messages",
            post(|state, headers, body| {
                detached(handle(Api::Anthropic, None, state, headers, body))
            }),
        )
        .merge(batch::routes())
        .merge(bedrock::routes())
        .route(
            "/v1/embeddings",
            post(|state, headers, body| {
                detached(embed::handle(Api::OpenAi, None, state, headers, body))
            }),
        )
        .route(
            "/v1/images/generations",
            post(|state, headers, body| {
                detached(images::handle(Api::OpenAi, None, state, headers, body))
            }),
        )
        .route("/v1/models", get(list_models))
        .route("/sim/stats", get(get_stats))
        .route("/sim/reset", post(post_reset))
        .route("/sim/config", get(get_config).post(post_config))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
        }
    }

    fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl ApiError {
    /// The error as the API it answers on words it: OpenAI's `{"error": {message, type, param,
    /// code}}` or Anthropic's `{"type": "error", "error": {type, message}}`.
    fn render(self, api: Api) -> Response {
        match api {
            Api::OpenAi => (self.status, axum::Json(self.body())).into_response(),
            Api::Anthropic => anthropic_error(self.status, &self.message),
            Api::Bedrock => bedrock::render(self),
        }
    }
}

/// The control endpoints answer in OpenAI's shape.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.render(Api::OpenAi)
    }
}

/// Anthropic's error type for a status (its documented classes; other 4xx are
/// `invalid_request_error`, other 5xx `api_error`).
fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

fn anthropic_error(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        &json!({
            "type": "error",
            "error": {"type": anthropic_error_type(status), "message": message},
        }),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn set_header(resp: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

/// An RFC 3339 instant `d` from now, rounded up to the second (a reset must not come early).
fn rfc3339_after(d: Duration) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|n| n.as_millis())
        .unwrap_or(0);
    let at_s = (now_ms + d.as_millis()).div_ceil(1000);
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(at_s).unwrap_or(i64::MAX))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn add_anthropic_limit_headers(resp: &mut Response, s: &LimitSnapshot) {
    for (name, value) in [
        (
            "anthropic-ratelimit-requests-limit",
            s.limit_requests.to_string(),
        ),
        (
            "anthropic-ratelimit-requests-remaining",
            s.remaining_requests.to_string(),
        ),
        (
            "anthropic-ratelimit-requests-reset",
            rfc3339_after(s.reset_requests),
        ),
        (
            "anthropic-ratelimit-tokens-limit",
            s.limit_tokens.to_string(),
        ),
        (
            "anthropic-ratelimit-tokens-remaining",
            s.remaining_tokens.to_string(),
        ),
        (
            "anthropic-ratelimit-tokens-reset",
            rfc3339_after(s.reset_tokens),
        ),
    ] {
        set_header(resp, name, &value);
    }
}

fn add_openai_limit_headers(resp: &mut Response, s: &LimitSnapshot) {
    set_header(
        resp,
        "x-ratelimit-limit-requests",
        &s.limit_requests.to_string(),
    );
    set_header(
        resp,
        "x-ratelimit-limit-tokens",
        &s.limit_tokens.to_string(),
    );
    set_header(
        resp,
        "x-ratelimit-remaining-requests",
        &s.remaining_requests.to_string(),
    );
    set_header(
        resp,
        "x-ratelimit-remaining-tokens",
        &s.remaining_tokens.to_string(),
    );
    set_header(
        resp,
        "x-ratelimit-reset-requests",
        &format_reset(s.reset_requests),
    );
    set_header(
        resp,
        "x-ratelimit-reset-tokens",
        &format_reset(s.reset_tokens),
    );
}

fn add_retry_after(resp: &mut Response, d: Duration) {
    set_header(resp, "retry-after", &format_retry_after(d));
    set_header(
        resp,
        "retry-after-ms",
        &d.as_nanos().div_ceil(1_000_000).to_string(),
    );
}

// ---------------------------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<Value>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    response_format: Option<Value>,
    temperature: Option<f64>,
    stream: Option<bool>,
    n: Option<u64>,
}

/// What the simulator needs from one image part.
#[derive(Debug, Clone)]
struct ImageInfo {
    sha256: String,
    width: u32,
    height: u32,
    detail: Detail,
    /// Mean luma, 0–255.
    luma: f64,
    /// Standard deviation of luma.
    contrast: f64,
    /// Mean R, G, B.
    rgb: [f64; 3],
}

struct RawImage {
    bytes: Vec<u8>,
    detail: Detail,
}

#[derive(Debug)]
struct Parsed {
    model: String,
    prompt_tokens: u64,
    max_tokens: Option<u64>,
    images: Vec<ImageInfo>,
    /// The image request of a generated image's check prompt (between `<request>` tags).
    check_request: Option<String>,
}

fn authenticate(headers: &HeaderMap, expected: &str) -> Result<String, ApiError> {
    let unauthorized = |message: String| ApiError {
        status: StatusCode::UNAUTHORIZED,
        message,
        kind: "invalid_request_error",
        code: Some("invalid_api_key"),
        param: None,
    };
    let raw = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim();
    let key = raw
        .strip_prefix("Bearer ")
        .or_else(|| raw.strip_prefix("bearer "))
        .map(str::trim)
        .unwrap_or("");
    if key.is_empty() {
        return Err(unauthorized(
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                .into(),
        ));
    }
    if !expected.is_empty() && key != expected {
        return Err(unauthorized(format!(
            "Incorrect API key provided: {}. You can find your API key at \
             https://platform.openai.com/account/api-keys.",
            redact(key)
        )));
    }
    Ok(key.to_string())
}

/// Anthropic's auth: `x-api-key` (401 `authentication_error`), then `anthropic-version`, which
/// every call must send (400 `invalid_request_error`).
fn authenticate_anthropic(headers: &HeaderMap, expected: &str) -> Result<String, ApiError> {
    let unauthorized = |message: &str| ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.to_string(),
        kind: "authentication_error",
        code: None,
        param: None,
    };
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("");
    if key.is_empty() {
        return Err(unauthorized("x-api-key header is required"));
    }
    if !expected.is_empty() && key != expected {
        return Err(unauthorized("invalid x-api-key"));
    }
    let version = headers
        .get("anthropic-version")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("");
    if version.is_empty() {
        return Err(ApiError::invalid(
            "anthropic-version: header is required",
            None,
        ));
    }
    Ok(key.to_string())
}

fn redact(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

/// Validate the body and tokenize it; images are decoded on a blocking thread.
async fn parse_request(body: &[u8]) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!(
                "We could not parse the JSON body of your request. (HINT: This likely means \
                 you aren't using your HTTP library correctly. The OpenAI API expects a JSON \
                 payload, but what was sent was not valid JSON.) ({e})"
            ),
            None,
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "The request body must be a JSON object.",
            None,
        ));
    }
    let req: ChatRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(format!("Invalid request body: {e}"), None))?;

    let model = match req.model.as_deref() {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => {
            return Err(ApiError::invalid(
                "you must provide a model parameter",
                Some("model"),
            ))
        }
    };
    let messages = req.messages.ok_or_else(|| {
        ApiError::invalid("Missing required parameter: 'messages'.", Some("messages"))
    })?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            Some("messages"),
        ));
    }
    if req.stream == Some(true) {
        return Err(ApiError::invalid(
            "The provider simulator does not support stream=true.",
            Some("stream"),
        ));
    }
    if let Some(n) = req.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("The provider simulator supports only n=1, got {n}."),
                Some("n"),
            ));
        }
    }
    if let Some(t) = req.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                format!("Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got {t} instead."),
                Some("temperature"),
            )
            .with_code("decimal_above_max_value"));
        }
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
            Some("max_tokens"),
        )
        .with_code("integer_below_min_value"));
    }

    // Walk the messages: count text tokens, collect images.
    let mut text_tok = REPLY_PRIMING_TOKENS;
    let mut all_text = String::new();
    let mut raw_images: Vec<RawImage> = Vec::new();
    for (i, msg) in messages.iter().enumerate() {
        let obj = msg.as_object().ok_or_else(|| {
            ApiError::invalid(
                format!("Invalid type for 'messages[{i}]': expected an object."),
                Some("messages"),
            )
        })?;
        let role = obj.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid(
                format!("Missing required parameter: 'messages[{i}].role'."),
                Some("messages"),
            )
        })?;
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(ApiError::invalid(
                format!("Invalid value: '{role}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'."),
                Some("messages"),
            ));
        }
        text_tok += MESSAGE_OVERHEAD_TOKENS + text_tokens(role);
        match obj.get("content") {
            Some(Value::String(s)) => {
                text_tok += text_tokens(s);
                all_text.push_str(s);
                all_text.push('\n');
            }
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let ty = part.get("type").and_then(Value::as_str).unwrap_or("");
                    match ty {
                        "text" => {
                            let t = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                                ApiError::invalid(
                                    format!("Missing required parameter: 'messages[{i}].content[{j}].text'."),
                                    Some("messages"),
                                )
                            })?;
                            text_tok += text_tokens(t);
                            all_text.push_str(t);
                            all_text.push('\n');
                        }
                        "image_url" => {
                            if role != "user" {
                                return Err(ApiError::invalid(
                                    format!("Invalid 'messages[{i}]'. Image URLs are only allowed for messages with role 'user', but this message with role '{role}' contains an image URL."),
                                    Some("messages"),
                                ));
                            }
                            raw_images.push(parse_image_part(part, i, j)?);
                        }
                        other => {
                            return Err(ApiError::invalid(
                                format!("Invalid value: '{other}'. Supported values are: 'text' and 'image_url'."),
                                Some("messages"),
                            ))
                        }
                    }
                }
            }
            None | Some(Value::Null) if role == "assistant" => {}
            _ => {
                return Err(ApiError::invalid(
                    format!("Invalid 'messages[{i}].content': expected a string or an array of content parts."),
                    Some("messages"),
                ))
            }
        }
    }

    if let Some(rf) = &req.response_format {
        let ty = rf.get("type").and_then(Value::as_str).unwrap_or("");
        match ty {
            "text" | "json_schema" => {}
            "json_object" => {
                if !all_text.to_ascii_lowercase().contains("json") {
                    return Err(ApiError::invalid(
                        "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
                        Some("messages"),
                    ));
                }
            }
            other => {
                return Err(ApiError::invalid(
                    format!("Invalid value: '{other}'. Supported values are: 'text', 'json_object' and 'json_schema'."),
                    Some("response_format.type"),
                ))
            }
        }
    }

    let price = PriceTable::builtin().model(&model).map_err(|_| ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("The model `{model}` does not exist or you do not have access to it."),
        kind: "invalid_request_error",
        code: Some("model_not_found"),
        param: None,
    })?;
    let check = sightline_core::genjob::request_of_check_prompt(&all_text).map(str::to_string);
    tokenize(model, price, text_tok, max_tokens, raw_images, check).await
}

/// The end of parsing both APIs share: decode the images off the async threads and add their
/// tokens, by the model's rule, to the text tokens.
async fn tokenize(
    model: String,
    price: &ModelPrice,
    text_tok: u64,
    max_tokens: Option<u64>,
    raw_images: Vec<RawImage>,
    check_request: Option<String>,
) -> Result<Parsed, ApiError> {
    let images = if raw_images.is_empty() {
        Vec::new()
    } else {
        tokio::task::spawn_blocking(move || {
            raw_images
                .into_iter()
                .map(analyse_image)
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("image analysis task failed: {e}"),
            kind: "server_error",
            code: None,
            param: None,
        })??
    };
    let image_tok: u64 = images
        .iter()
        .map(|im| price.image_tokens(im.width, im.height, im.detail))
        .sum();

    Ok(Parsed {
        model,
        prompt_tokens: text_tok + image_tok,
        max_tokens,
        images,
        check_request,
    })
}

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: Option<String>,
    messages: Option<Vec<Value>>,
    max_tokens: Option<u64>,
    system: Option<Value>,
    temperature: Option<f64>,
    stream: Option<bool>,
}

/// Text tokens of Anthropic text content: a string or a list of `text` blocks (`what` names
/// the field in errors).
fn anthropic_text_tokens(v: &Value, what: &str) -> Result<u64, ApiError> {
    match v {
        Value::String(s) => Ok(text_tokens(s)),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(
                |(j, b)| match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(text_tokens(t)),
                    _ => Err(ApiError::invalid(
                        format!("{what}.{j}: expected a text block with a string `text`"),
                        None,
                    )),
                },
            )
            .sum(),
        _ => Err(ApiError::invalid(
            format!("{what}: expected a string or a list of text blocks"),
            None,
        )),
    }
}

/// Validate an Anthropic Messages body and tokenize it (see the module docs for the counts).
async fn parse_messages_request(body: &[u8]) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("The request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "The request body must be a JSON object.",
            None,
        ));
    }
    let req: MessagesRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(format!("Invalid request body: {e}"), None))?;
    let model = match req.model.as_deref() {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => return Err(ApiError::invalid("model: Field required", Some("model"))),
    };
    let max_tokens = match req.max_tokens {
        None => {
            return Err(ApiError::invalid(
                "max_tokens: Field required",
                Some("max_tokens"),
            ))
        }
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens: must be greater than or equal to 1",
                Some("max_tokens"),
            ))
        }
        Some(n) => n,
    };
    let messages = req
        .messages
        .ok_or_else(|| ApiError::invalid("messages: Field required", Some("messages")))?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages: at least one message is required",
            Some("messages"),
        ));
    }
    if req.stream == Some(true) {
        return Err(ApiError::invalid(
            "The provider simulator does not support stream=true.",
            Some("stream"),
        ));
    }
    if let Some(t) = req.temperature {
        if !(0.0..=1.0).contains(&t) {
            return Err(ApiError::invalid(
                format!("temperature: must be between 0 and 1, got {t}"),
                Some("temperature"),
            ));
        }
    }
    let mut all_text = String::new();
    let mut text_tok = match &req.system {
        None | Some(Value::Null) => 0,
        Some(system) => anthropic_text_tokens(system, "system")?,
    };
    let mut raw_images: Vec<RawImage> = Vec::new();
    for (i, msg) in messages.iter().enumerate() {
        let role = msg.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "user" | "assistant") {
            return Err(ApiError::invalid(
                format!("messages.{i}.role: Input should be 'user' or 'assistant'"),
                Some("messages"),
            ));
        }
        text_tok += MESSAGE_OVERHEAD_TOKENS;
        match msg.get("content") {
            Some(Value::String(s)) => {
                text_tok += text_tokens(s);
                all_text.push_str(s);
            }
            Some(Value::Array(blocks)) => {
                for (j, block) in blocks.iter().enumerate() {
                    match block.get("type").and_then(Value::as_str).unwrap_or("") {
                        "text" => {
                            text_tok += anthropic_text_tokens(
                                &Value::Array(vec![block.clone()]),
                                &format!("messages.{i}.content"),
                            )?;
                            if let Some(t) = block.get("text").and_then(Value::as_str) {
                                all_text.push_str(t);
                            }
                        }
                        "image" if role == "user" => {
                            raw_images.push(parse_image_block(block, i, j)?)
                        }
                        "image" => {
                            return Err(ApiError::invalid(
                                format!("messages.{i}.content.{j}: images are only allowed in user messages"),
                                Some("messages"),
                            ))
                        }
                        other => {
                            return Err(ApiError::invalid(
                                format!("messages.{i}.content.{j}.type: unsupported block type '{other}' (the simulator takes 'text' and 'image')"),
                                Some("messages"),
                            ))
                        }
                    }
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    format!("messages.{i}.content: expected a string or a list of content blocks"),
                    Some("messages"),
                ))
            }
        }
    }
    // The Messages API serves Claude models only.
    let price = PriceTable::builtin()
        .model(&model)
        .ok()
        .filter(|p| p.provider == "anthropic")
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("model: {model}"),
            kind: "not_found_error",
            code: Some("model_not_found"),
            param: None,
        })?;
    let check = sightline_core::genjob::request_of_check_prompt(&all_text).map(str::to_string);
    tokenize(model, price, text_tok, Some(max_tokens), raw_images, check).await
}

/// An Anthropic `image` block with a base64 source.
fn parse_image_block(block: &Value, i: usize, j: usize) -> Result<RawImage, ApiError> {
    let at = format!("messages.{i}.content.{j}.source");
    let bad = |why: &str| ApiError::invalid(format!("{at}: {why}"), Some("messages"));
    let source = block.get("source").ok_or_else(|| bad("Field required"))?;
    if source.get("type").and_then(Value::as_str) != Some("base64") {
        return Err(bad("the simulator accepts only base64 image sources"));
    }
    let media_type = source
        .get("media_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !matches!(
        media_type,
        "image/jpeg" | "image/png" | "image/gif" | "image/webp"
    ) {
        return Err(bad(&format!(
            "media_type {media_type:?} is not one of image/jpeg, image/png, image/gif, image/webp"
        )));
    }
    let data = source
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("data: Field required"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| bad(&format!("invalid base64 data ({e})")))?;
    if bytes.is_empty() {
        return Err(bad("the image data is empty"));
    }
    // Claude has no detail parameter; its image rule ignores it.
    Ok(RawImage {
        bytes,
        detail: Detail::High,
    })
}

fn parse_image_part(part: &Value, i: usize, j: usize) -> Result<RawImage, ApiError> {
    let iu = part.get("image_url").ok_or_else(|| {
        ApiError::invalid(
            format!("Missing required parameter: 'messages[{i}].content[{j}].image_url'."),
            Some("messages"),
        )
    })?;
    let url = iu.get("url").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            format!("Missing required parameter: 'messages[{i}].content[{j}].image_url.url'."),
            Some("messages"),
        )
    })?;
    let detail = match iu.get("detail").and_then(Value::as_str) {
        None | Some("auto") | Some("high") => Detail::High,
        Some("low") => Detail::Low,
        Some(other) => {
            return Err(ApiError::invalid(
                format!(
                    "Invalid value: '{other}'. Supported values are: 'low', 'high' and 'auto'."
                ),
                Some("messages"),
            ))
        }
    };
    let bad_url = |why: &str| {
        ApiError::invalid(
            format!("Invalid image URL in 'messages[{i}].content[{j}]': {why}"),
            Some("messages"),
        )
        .with_code("invalid_image_url")
    };
    let rest = url.strip_prefix("data:").ok_or_else(|| {
        bad_url("the simulator accepts only base64 data URLs (data:image/...;base64,...).")
    })?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| bad_url("the data URL has no ',' separator."))?;
    let mut meta_parts = meta.split(';');
    let mime = meta_parts.next().unwrap_or("").to_ascii_lowercase();
    if !meta_parts.any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(bad_url("the data URL is not base64-encoded."));
    }
    if !matches!(
        mime.as_str(),
        "image/jpeg" | "image/jpg" | "image/png" | "image/webp" | "image/gif"
    ) {
        return Err(ApiError::invalid(
            format!("Invalid MIME type {mime:?}. Supported formats are: ['png', 'jpeg', 'gif', 'webp']."),
            Some("messages"),
        )
        .with_code("invalid_image_format"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| bad_url(&format!("invalid base64 data ({e}).")))?;
    if bytes.is_empty() {
        return Err(bad_url("the image data is empty."));
    }
    Ok(RawImage { bytes, detail })
}

fn analyse_image(raw: RawImage) -> Result<ImageInfo, ApiError> {
    let invalid = |e: String| {
        ApiError::invalid(
            format!(
                "You uploaded an unsupported image. Please make sure your image is valid. ({e})"
            ),
            Some("messages"),
        )
        .with_code("invalid_image_format")
    };
    let sha256 = hex::encode(Sha256::digest(&raw.bytes));
    let reader = image::ImageReader::new(Cursor::new(&raw.bytes))
        .with_guessed_format()
        .map_err(|e| invalid(e.to_string()))?;
    let img = reader.decode().map_err(|e| invalid(e.to_string()))?;
    let rgb = img.to_rgb8();
    let (width, height) = rgb.dimensions();
    // Sample at most ~64k pixels.
    let total = u64::from(width) * u64::from(height);
    let step = ((total / 65_536).max(1)) as usize;
    let (mut n, mut sum, mut sum_sq) = (0f64, 0f64, 0f64);
    let mut sums = [0f64; 3];
    for px in rgb.pixels().step_by(step) {
        let [r, g, b] = px.0.map(f64::from);
        let y = 0.299 * r + 0.587 * g + 0.114 * b;
        n += 1.0;
        sum += y;
        sum_sq += y * y;
        sums[0] += r;
        sums[1] += g;
        sums[2] += b;
    }
    let n = n.max(1.0);
    let luma = sum / n;
    let contrast = (sum_sq / n - luma * luma).max(0.0).sqrt();
    Ok(ImageInfo {
        sha256,
        width,
        height,
        detail: raw.detail,
        luma,
        contrast,
        rgb: sums.map(|s| s / n),
    })
}

// ---------------------------------------------------------------------------------------------
// Content
// ---------------------------------------------------------------------------------------------

const CATEGORIES: [&str; 8] = [
    "landscape",
    "portrait",
    "document",
    "product",
    "food",
    "animal",
    "architecture",
    "abstract",
];

const OBJECTS: [&str; 16] = [
    "tree", "person", "car", "building", "sky", "dog", "cat", "table", "cup", "book", "bicycle",
    "flower", "window", "sign", "mountain", "bottle",
];

/// The verdict on a generated image's request. The simulator cannot see what a picture shows,
/// so a test marks what should fail: a request containing `[mismatch]` never matches.
fn check_answer(request: &str) -> serde_json::Map<String, Value> {
    let matches = !request.contains("[mismatch]");
    let issues: Vec<&str> = if matches {
        Vec::new()
    } else {
        vec!["the picture does not show what the request asked for"]
    };
    let mut m = serde_json::Map::new();
    m.insert("matches_prompt".into(), Value::Bool(matches));
    m.insert("prompt_issues".into(), json!(issues));
    m
}

/// The analysis object for the images (deterministic in their pixels and bytes).
fn analysis(images: &[ImageInfo]) -> Value {
    let Some(im) = images.first() else {
        return json!({
            "description": "No image was provided.",
            "category": "none",
            "tags": ["no-image", "sim"],
            "objects": [],
            "text": "",
            "quality_issues": ["no_image"],
        });
    };
    let sha = hex::decode(&im.sha256).unwrap_or_default();
    let byte = |i: usize| usize::from(sha.get(i).copied().unwrap_or(0));
    let brightness = match im.luma {
        l if l < 64.0 => "dark",
        l if l < 128.0 => "dim",
        l if l < 192.0 => "bright",
        _ => "very bright",
    };
    let orientation = match im.width.cmp(&im.height) {
        std::cmp::Ordering::Greater => "landscape-format",
        std::cmp::Ordering::Less => "portrait-format",
        std::cmp::Ordering::Equal => "square",
    };
    let [r, g, b] = im.rgb;
    let tone = if r.max(g).max(b) - r.min(g).min(b) < 16.0 {
        "neutral"
    } else if r >= g && r >= b {
        "red"
    } else if g >= r && g >= b {
        "green"
    } else {
        "blue"
    };
    let category = CATEGORIES[byte(0) % CATEGORIES.len()];
    let n_objects = 1 + byte(1) % 3;
    let mut objects: Vec<&str> = Vec::new();
    for k in 0..n_objects {
        let o = OBJECTS[byte(2 + k) % OBJECTS.len()];
        if !objects.contains(&o) {
            objects.push(o);
        }
    }
    let text = if category == "document" || category == "product" {
        format!(
            "SIM-{}",
            &im.sha256[..8.min(im.sha256.len())].to_ascii_uppercase()
        )
    } else {
        String::new()
    };
    let mut issues: Vec<&str> = Vec::new();
    if im.width.min(im.height) < 256 {
        issues.push("low_resolution");
    }
    if im.luma < 40.0 {
        issues.push("underexposed");
    }
    if im.luma > 220.0 {
        issues.push("overexposed");
    }
    if im.contrast < 8.0 {
        issues.push("low_contrast");
    }
    let mut tags = vec![
        brightness.to_string(),
        orientation.to_string(),
        format!("{tone}-toned"),
        category.to_string(),
        "sim".to_string(),
    ];
    if images.len() > 1 {
        tags.push(format!("images:{}", images.len()));
    }
    let description = format!(
        "A {brightness} {tone}-toned {orientation} {category} image ({}x{}) showing {}.",
        im.width,
        im.height,
        objects.join(", ")
    );
    json!({
        "description": description,
        "category": category,
        "tags": tags,
        "objects": objects,
        "text": text,
        "quality_issues": issues,
    })
}

fn truncate_chars(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

fn completion_body(
    id: &str,
    model: &str,
    content: &str,
    finish_reason: &str,
    prompt_tokens: u64,
    completion_tokens: u64,
) -> Value {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "system_fingerprint": "fp_sim",
    })
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

/// Forced fault from the header: `Ok(None)` = no header, `Ok(Some(None))` = `none`.
fn forced_fault(headers: &HeaderMap) -> Result<Option<Option<Fault>>, ApiError> {
    let Some(v) = headers.get(FAULT_HEADER) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::invalid("x-sim-fault is not ASCII", None))?
        .trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(Some(None));
    }
    s.parse::<Fault>()
        .map(|f| Some(Some(f)))
        .map_err(|e| ApiError::invalid(format!("x-sim-fault: {e}"), None))
}

fn per_request_rng(seed: u64, seq: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn decide_fault(plan: &FaultPlan, seq: u64, rng: &mut StdRng) -> Option<Fault> {
    if let Some(e) = &plan.every_nth {
        if e.n > 0 && seq.is_multiple_of(e.n) {
            return Some(e.fault);
        }
    }
    let u: f64 = rng.gen();
    let mut acc = plan.error_rate;
    if u < acc {
        let i = rng.gen_range(0..plan.error_statuses.len().max(1));
        return plan
            .error_statuses
            .get(i)
            .and_then(|s| Fault::server_error(*s))
            .or(Some(Fault::Http500));
    }
    for (rate, fault) in [
        (plan.rate_limit_rate, Fault::RateLimit),
        (plan.timeout_rate, Fault::Timeout),
        (plan.malformed_rate, Fault::Malformed),
        (plan.bad_content_rate, Fault::BadContent),
    ] {
        acc += rate;
        if u < acc {
            return Some(fault);
        }
    }
    None
}

fn server_error_response(f: Fault) -> Response {
    let (status, message) = match f {
        Fault::Http502 => {
            let html = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
                        <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n\
                        </body>\r\n</html>\r\n";
            let mut resp = (StatusCode::BAD_GATEWAY, html).into_response();
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            return resp;
        }
        Fault::Http503 => (
            StatusCode::SERVICE_UNAVAILABLE,
            "The engine is currently overloaded, please try again later.",
        ),
        Fault::Http504 => (
            StatusCode::GATEWAY_TIMEOUT,
            "The server did not respond in time. Please try again later.",
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request. Sorry about that!",
        ),
    };
    json_response(
        status,
        &json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}}),
    )
}

fn rate_limit_body(
    model: &str,
    kind: LimitKind,
    limit: u64,
    used: u64,
    requested: u64,
    wait: Option<Duration>,
) -> Value {
    let (dim, ty) = match kind {
        LimitKind::Requests => ("requests per min (RPM)", "requests"),
        LimitKind::Tokens => ("tokens per min (TPM)", "tokens"),
    };
    let message = match wait {
        Some(w) => format!(
            "Rate limit reached for {model} in organization org-sim on {dim}: Limit {limit}, \
             Used {used}, Requested {requested}. Please try again in {}. Visit \
             https://platform.openai.com/account/rate-limits to learn more.",
            format_reset(w)
        ),
        None => format!(
            "Request too large for {model} in organization org-sim on {dim}: Limit {limit}, \
             Requested {requested}. The input or output tokens must be reduced in order to run \
             successfully."
        ),
    };
    json!({"error": {"message": message, "type": ty, "param": null, "code": "rate_limit_exceeded"}})
}

/// The API a call came in on: the flow of [`handle`] is one, the wire format differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
    /// `POST /model/{modelId}/converse` (and `/invoke` for embeddings).
    Bedrock,
}

impl Api {
    fn authenticate(self, headers: &HeaderMap, expected: &str) -> Result<String, ApiError> {
        match self {
            Api::OpenAi => authenticate(headers, expected),
            Api::Anthropic => authenticate_anthropic(headers, expected),
            Api::Bedrock => bedrock::authenticate(headers),
        }
    }

    /// `path_model`: the model named by the path (Bedrock's routes).
    async fn parse(self, body: &[u8], path_model: Option<&str>) -> Result<Parsed, ApiError> {
        match self {
            Api::OpenAi => parse_request(body).await,
            Api::Anthropic => parse_messages_request(body).await,
            Api::Bedrock => bedrock::parse_converse(body, path_model).await,
        }
    }

    fn add_limit_headers(self, resp: &mut Response, snap: &LimitSnapshot) {
        match self {
            Api::OpenAi => add_openai_limit_headers(resp, snap),
            Api::Anthropic => add_anthropic_limit_headers(resp, snap),
            // Bedrock reports no limits.
            Api::Bedrock => {}
        }
    }

    fn add_retry_after(self, resp: &mut Response, d: Duration) {
        match self {
            Api::OpenAi => add_retry_after(resp, d),
            // Anthropic sends whole seconds; rounding down would invite an early retry. Bedrock
            // documents no Retry-After; the simulator sends one the same way (module docs).
            Api::Anthropic | Api::Bedrock => set_header(
                resp,
                "retry-after",
                &d.as_millis().div_ceil(1000).to_string(),
            ),
        }
    }

    /// The request id and timing headers of an answered call.
    fn add_id_headers(self, resp: &mut Response, request_id: &str, started: Instant) {
        match self {
            Api::OpenAi => {
                set_header(resp, "x-request-id", request_id);
                set_header(
                    resp,
                    "openai-processing-ms",
                    &started.elapsed().as_millis().to_string(),
                );
            }
            Api::Anthropic => set_header(resp, "request-id", request_id),
            Api::Bedrock => set_header(resp, "x-amzn-requestid", request_id),
        }
    }

    fn server_error(self, f: Fault) -> Response {
        match (self, f) {
            (Api::Bedrock, f) => bedrock::server_error(f),
            (Api::OpenAi, f) | (Api::Anthropic, f @ Fault::Http502) => server_error_response(f),
            (Api::Anthropic, Fault::Http503) => match StatusCode::from_u16(529) {
                Ok(overloaded) => anthropic_error(overloaded, "Overloaded"),
                Err(_) => anthropic_error(StatusCode::SERVICE_UNAVAILABLE, "Overloaded"),
            },
            (Api::Anthropic, Fault::Http504) => {
                anthropic_error(StatusCode::GATEWAY_TIMEOUT, "Gateway timeout")
            }
            (Api::Anthropic, _) => {
                anthropic_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
            }
        }
    }

    /// A 429 from the limiter or the fault plan (`wait` None: the request alone is over the
    /// limit, so no Retry-After).
    fn rate_limited(
        self,
        model: &str,
        kind: LimitKind,
        limit: u64,
        used: u64,
        requested: u64,
        wait: Option<Duration>,
    ) -> Response {
        let mut resp = match self {
            Api::OpenAi => json_response(
                StatusCode::TOO_MANY_REQUESTS,
                &rate_limit_body(model, kind, limit, used, requested, wait),
            ),
            Api::Anthropic => {
                let dim = match kind {
                    LimitKind::Requests => "requests",
                    LimitKind::Tokens => "tokens",
                };
                let message = match wait {
                    Some(_) => format!(
                        "This request would exceed your organization's (org-sim) rate limit of \
                         {limit} {dim} per minute for {model} (used {used}, requested {requested}). \
                         Wait for the time in the retry-after header."
                    ),
                    None => format!(
                        "This request alone ({requested} {dim}) exceeds your organization's \
                         (org-sim) rate limit of {limit} {dim} per minute for {model}; reduce the \
                         input or max_tokens."
                    ),
                };
                anthropic_error(StatusCode::TOO_MANY_REQUESTS, &message)
            }
            Api::Bedrock => bedrock::error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "ThrottlingException",
                bedrock::THROTTLED,
            ),
        };
        if let Some(w) = wait {
            self.add_retry_after(&mut resp, w);
        }
        resp
    }

    /// A 200's body: `cut` when the content stopped at `max_tokens`.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        self,
        seq: u64,
        sha_tag: &str,
        model: &str,
        content: &str,
        cut: bool,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Value {
        match self {
            Api::OpenAi => completion_body(
                &format!("chatcmpl-sim{seq:08}{sha_tag}"),
                model,
                content,
                if cut { "length" } else { "stop" },
                input_tokens,
                output_tokens,
            ),
            Api::Anthropic => json!({
                "id": format!("msg_sim{seq:08}{sha_tag}"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": content}],
                "stop_reason": if cut { "max_tokens" } else { "end_turn" },
                "stop_sequence": null,
                "usage": {
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            }),
            Api::Bedrock => bedrock::converse_body(content, cut, input_tokens, output_tokens),
        }
    }
}

/// The poison images among the call's (see [`is_poison`]).
fn poison_images<'a>(cfg: &SimConfig, parsed: &'a Parsed) -> Vec<&'a str> {
    parsed
        .images
        .iter()
        .map(|im| im.sha256.as_str())
        .filter(|sha| is_poison(cfg.seed, sha, cfg.faults.poison_rate))
        .collect()
}

/// The 400 a call carrying a poison image gets, on either route and on batch lines.
fn poison_error() -> ApiError {
    ApiError::invalid(
        "Your image was rejected (simulated poison image): the provider will never accept \
         this image, whatever you retry.",
        None,
    )
    .with_code("image_rejected")
}

/// A 200's body and the tokens it bills.
struct Answer {
    body: Value,
    input_tokens: u64,
    output_tokens: u64,
}

/// What the route answers (and bills) for a parsed call: the analysis, cut at `max_tokens`, or
/// with `bad_content` a refusal that is not JSON. The batch lines use it too, so a batch line
/// costs exactly what the same real-time call would.
fn answer_for(api: Api, seq: u64, parsed: &Parsed, bad_content: bool) -> Answer {
    let sha_tag = parsed
        .images
        .first()
        .map(|im| im.sha256[..12.min(im.sha256.len())].to_string())
        .unwrap_or_else(|| "000000000000".into());
    let (content, cut, completion_tokens) = if bad_content {
        let c = format!(
            "I'm sorry, but I can't provide a structured description of this image. It appears to \
             show {} image(s).",
            parsed.images.len()
        );
        let t = text_tokens(&c);
        (c, false, t)
    } else {
        let mut a = analysis(&parsed.images);
        if let (Some(request), Value::Object(map)) = (&parsed.check_request, &mut a) {
            map.extend(check_answer(request));
        }
        let c = a.to_string();
        let t = text_tokens(&c);
        match parsed.max_tokens {
            Some(max) if t > max => {
                let cut = truncate_chars(
                    &c,
                    usize::try_from(max.saturating_mul(4)).unwrap_or(usize::MAX),
                );
                (cut, true, max)
            }
            _ => (c, false, t),
        }
    };
    let body = api.answer(
        seq,
        &sha_tag,
        &parsed.model,
        &content,
        cut,
        parsed.prompt_tokens,
        completion_tokens,
    );
    Answer {
        body,
        input_tokens: parsed.prompt_tokens,
        output_tokens: completion_tokens,
    }
}

/// Like OpenAI and Anthropic, a request whose client gave up (a timeout, a killed process) is
/// still processed and billed: every route's work runs in its own task, which a dropped
/// connection does not cancel.
async fn detached(work: impl std::future::Future<Output = Response> + Send + 'static) -> Response {
    match tokio::spawn(work).await {
        Ok(resp) => resp,
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("simulator task failed: {e}"),
        )
            .into_response(),
    }
}

/// The steps every simulated call takes once it is parsed and counted, in order: an injected
/// 429, the RPM/TPM windows (`estimate` tokens against TPM), an injected hang past the client's
/// timeout, the latency, an injected 5xx. Ok: the limit snapshot to answer with; Err: the
/// response already finished (`finish` adds the limit and id headers).
#[allow(clippy::too_many_arguments)]
async fn gate(
    sh: &Arc<Shared>,
    cfg: &SimConfig,
    api: Api,
    key: &str,
    model: &str,
    estimate: u64,
    fault: Option<Fault>,
    rng: &mut StdRng,
    finish: &(dyn Fn(Response, &LimitSnapshot) -> Response + Sync),
) -> Result<LimitSnapshot, Response> {
    if fault == Some(Fault::RateLimit) {
        let wait = Duration::from_secs_f64(cfg.faults.retry_after_s);
        let mut snap = sh.snapshot(key);
        snap.remaining_requests = 0;
        snap.reset_requests = wait;
        let limit = if cfg.rpm > 0 {
            cfg.rpm
        } else {
            snap.limit_requests
        };
        sh.lock().stats.faults.bump(Fault::RateLimit);
        let resp = api.rate_limited(model, LimitKind::Requests, limit, limit, 1, Some(wait));
        return Err(finish(resp, &snap));
    }

    let admission = {
        let mut g = sh.lock();
        let lim = g.cfg.limits();
        let adm =
            g.windows
                .entry(key.to_string())
                .or_default()
                .admit(Instant::now(), &lim, estimate);
        match adm {
            Admission::Limited { .. } => g.stats.rate_limited += 1,
            Admission::Admitted(_) => {
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let stats = &mut g.stats;
                stats.tokens_admitted += estimate;
                if stats.first_admitted_ms == 0 {
                    stats.first_admitted_ms = at;
                }
                stats.last_admitted_ms = at;
            }
        }
        adm
    };
    let snap = match admission {
        Admission::Admitted(s) => s,
        Admission::Limited {
            kind,
            limit,
            used,
            requested,
            wait,
            snapshot,
        } => {
            let resp = api.rate_limited(model, kind, limit, used, requested, wait);
            return Err(finish(resp, &snapshot));
        }
    };

    if fault == Some(Fault::Timeout) {
        sh.lock().stats.faults.bump(Fault::Timeout);
        let mut stop = sh.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(cfg.timeout_hang_ms)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        // Headers go out, then the body errors: hyper drops the connection mid-response.
        let stream = futures_util::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other("simulated timeout"))
        });
        let mut resp = Response::new(Body::from_stream(stream));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Err(finish(resp, &snap));
    }

    let delay = cfg.latency_ms
        + if cfg.jitter_ms > 0 {
            rng.gen_range(0..=cfg.jitter_ms)
        } else {
            0
        };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    if let Some(f @ (Fault::Http500 | Fault::Http502 | Fault::Http503 | Fault::Http504)) = fault {
        sh.lock().stats.faults.bump(f);
        return Err(finish(api.server_error(f), &snap));
    }
    Ok(snap)
}

/// One vision call on any API: the checks, limits and faults of the module docs, in order.
/// `path_model`: the model the path names (Bedrock), None where the body names it.
async fn handle(
    api: Api,
    path_model: Option<String>,
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let _in_flight = InFlight::enter(&sh);
    let cfg = sh.lock().cfg.clone();

    let key = match api.authenticate(&headers, &cfg.api_key) {
        Ok(k) => k,
        Err(e) => {
            {
                let mut g = sh.lock();
                if matches!(e.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                    g.stats.unauthorized += 1;
                } else {
                    g.stats.bad_requests += 1;
                }
            }
            return e.render(api);
        }
    };

    let with_limits = |mut resp: Response, snap: &LimitSnapshot| {
        api.add_limit_headers(&mut resp, snap);
        resp
    };

    let forced = match forced_fault(&headers) {
        Ok(f) => f,
        Err(e) => {
            sh.lock().stats.bad_requests += 1;
            return with_limits(e.render(api), &sh.snapshot(&key));
        }
    };

    let parsed = match api.parse(&body, path_model.as_deref()).await {
        Ok(p) => p,
        Err(e) => {
            {
                let mut g = sh.lock();
                match e.status {
                    StatusCode::NOT_FOUND => g.stats.not_found += 1,
                    StatusCode::BAD_REQUEST => g.stats.bad_requests += 1,
                    _ => {}
                }
            }
            return with_limits(e.render(api), &sh.snapshot(&key));
        }
    };

    // Count the call per image; a poison image is rejected before anything else (it takes no
    // sequence number, so it does not shift the fault schedule of the other requests).
    let poison = poison_images(&cfg, &parsed);
    let seq = {
        let mut g = sh.lock();
        for im in &parsed.images {
            *g.stats
                .requests_per_image
                .entry(im.sha256.clone())
                .or_default() += 1;
        }
        if !poison.is_empty() {
            g.stats.poisoned += 1;
            for sha in &poison {
                *g.stats
                    .poisoned_per_image
                    .entry((*sha).to_string())
                    .or_default() += 1;
            }
            g.stats.poisoned_images = g.stats.poisoned_per_image.len() as u64;
            None
        } else {
            g.valid_seq += 1;
            Some(g.valid_seq)
        }
    };
    let Some(seq) = seq else {
        return with_limits(poison_error().render(api), &sh.snapshot(&key));
    };
    let mut rng = per_request_rng(cfg.seed, seq);
    let fault = match forced {
        Some(f) => f,
        None => decide_fault(&cfg.faults, seq, &mut rng),
    };
    let request_id = format!("req_sim{seq:08}");
    let finish = |mut resp: Response, snap: &LimitSnapshot| {
        api.add_limit_headers(&mut resp, snap);
        api.add_id_headers(&mut resp, &request_id, started);
        resp
    };

    // Rate-limit admission with OpenAI's estimate: prompt + max output tokens.
    let estimate = parsed.prompt_tokens + parsed.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let snap = match gate(
        &sh,
        &cfg,
        api,
        &key,
        &parsed.model,
        estimate,
        fault,
        &mut rng,
        &finish,
    )
    .await
    {
        Ok(snap) => snap,
        Err(resp) => return resp,
    };

    let Answer {
        body,
        input_tokens,
        output_tokens: completion_tokens,
    } = answer_for(api, seq, &parsed, fault == Some(Fault::BadContent));

    {
        let mut g = sh.lock();
        g.stats.prompt_tokens += input_tokens;
        g.stats.completion_tokens += completion_tokens;
        g.stats.tokens_billed += input_tokens + completion_tokens;
        match fault {
            Some(f) => g.stats.faults.bump(f),
            None => {
                g.stats.completions += 1;
                for im in &parsed.images {
                    *g.stats
                        .completions_per_image
                        .entry(im.sha256.clone())
                        .or_default() += 1;
                }
            }
        }
    }

    if fault == Some(Fault::Malformed) {
        let text = body.to_string();
        let cut = truncate_chars(&text, text.chars().count() / 2);
        let mut resp = (StatusCode::OK, cut).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return finish(resp, &snap);
    }
    finish(json_response(StatusCode::OK, &body), &snap)
}

async fn list_models() -> Response {
    let data: Vec<Value> = PriceTable::builtin()
        .models()
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": m.provider}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn get_stats(State(sh): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &json!(sh.stats()))
}

async fn post_reset(State(sh): State<Arc<Shared>>) -> Response {
    sh.reset();
    json_response(StatusCode::OK, &json!(sh.stats()))
}

async fn get_config(State(sh): State<Arc<Shared>>) -> Response {
    let cfg = sh.lock().cfg.clone();
    json_response(StatusCode::OK, &json!(cfg))
}

/// Merge `patch` into `base` (objects recursively, everything else replaced).
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, p) => *b = p,
    }
}

async fn post_config(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return ApiError::invalid("config patch must be a JSON object", None).into_response()
        }
        Err(e) => return ApiError::invalid(format!("invalid JSON: {e}"), None).into_response(),
    };
    let mut g = sh.lock();
    let mut current = match serde_json::to_value(&g.cfg) {
        Ok(v) => v,
        Err(e) => {
            return ApiError::invalid(format!("cannot serialise config: {e}"), None).into_response()
        }
    };
    merge(&mut current, patch);
    let cfg: SimConfig = match serde_json::from_value(current) {
        Ok(c) => c,
        Err(e) => return ApiError::invalid(format!("invalid config: {e}"), None).into_response(),
    };
    if let Err(e) = cfg.validate() {
        return ApiError::invalid(format!("invalid config: {e}"), None).into_response();
    }
    g.cfg = cfg.clone();
    drop(g);
    json_response(StatusCode::OK, &json!(cfg))
}

async fn fallback(method: Method, uri: Uri) -> Response {
    let mut err = ApiError::invalid(format!("Invalid URL ({method} {})", uri.path()), None);
    err.status = StatusCode::NOT_FOUND;
    err.into_response()
}
