//! Domain types shared by every adapter, the Lambdas, the CLI and the browser.

use serde::{Deserialize, Serialize};

pub use crate::batch::Lane;
use crate::pricing::Usage;

/// OpenAI's image `detail`: `low` is a fixed small charge per image (85 tokens on GPT-4o-class
/// models), `high` is priced by tiles, `auto` lets the provider choose (estimated as `high`,
/// the most it can cost). Other providers ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Detail {
    Low,
    #[default]
    High,
    Auto,
}

impl Detail {
    pub fn as_str(self) -> &'static str {
        match self {
            Detail::Low => "low",
            Detail::High => "high",
            Detail::Auto => "auto",
        }
    }

    /// `low`, `high` or `auto` (any case).
    pub fn parse(s: &str) -> Option<Detail> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Some(Detail::Low),
            "high" => Some(Detail::High),
            "auto" => Some(Detail::Auto),
            _ => None,
        }
    }
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Width, height and encoded size of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

/// Pre-call estimate of one analysis (image + prompt + expected output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub model: String,
    pub image_tokens: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// input + expected output
    pub tokens: u64,
    pub cost_usd: f64,
    pub price_version: String,
}

/// Where an image is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageStatus {
    /// Upload URL handed out, bytes not seen yet.
    Pending,
    /// Resized and queued for analysis.
    Queued,
    Done,
    Failed,
}

impl ImageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Pending => "pending",
            ImageStatus::Queued => "queued",
            ImageStatus::Done => "done",
            ImageStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<ImageStatus> {
        match s {
            "pending" => Some(ImageStatus::Pending),
            "queued" => Some(ImageStatus::Queued),
            "done" => Some(ImageStatus::Done),
            "failed" => Some(ImageStatus::Failed),
            _ => None,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, ImageStatus::Done | ImageStatus::Failed)
    }
}

/// The stored record of one image and, once analysed, its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub image_id: String,
    pub tenant: String,
    /// Where it came from: an S3 key, a local path or an upload.
    pub source: String,
    pub status: ImageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A `failed` image whose failure cannot heal (a bad image, a provider that refused it or
    /// answered invalidly twice): a duplicate job is not analysed (nor paid for) again. False
    /// when it gave up after transient errors, so a redrive from the dead-letter queue may still
    /// complete it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent_failure: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<ImageSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resized: Option<ImageSize>,
    /// EXIF orientation of the original (1–8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orientation: Option<u8>,
    /// sha256 (hex) of the resized JPEG: what is analysed and what the cache is keyed by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// sha256 (hex) of the uploaded original. A second, different upload to the same image id
    /// is told apart by it and refused, never mixed with the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_sha256: Option<String>,
    /// Blob key of the uploaded original (where the reconciler looks for a lost upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_key: Option<String>,
    /// Blob key of the resized JPEG (content-addressed: it names the sha256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resized_key: Option<String>,
    /// Estimate for the configured model on the resized image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    /// Estimate for the same model on the original image (what resizing saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_estimate: Option<Estimate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<AnalysisResult>,
    /// Paid provider calls for this image that are not part of its result: invalid answers of
    /// an image that then failed or was retried later, an answer that lost the race for the
    /// image. The image's whole cost is `result.cost_usd` + `extra_spend.cost_usd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_spend: Option<ExtraSpend>,
    /// The image detail asked for (on the upload request) and, once queued, the one the
    /// estimate and the job use. None: the settings' detail for the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
    /// The lane asked for (upload request, `run --lane`, a key-prefix rule). None: the
    /// settings' default lane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Lane>,
    /// A generated image: the job row that made it, and what its analysis checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<crate::genjob::GenerationLink>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
}

impl ImageRecord {
    /// A record for bytes announced but not seen yet (an upload URL handed out, a generated
    /// image about to be stored at `original_key`): everything the resize learns is unset.
    pub fn pending(
        tenant: &str,
        image_id: &str,
        source: String,
        original_key: String,
        now: &str,
    ) -> ImageRecord {
        ImageRecord {
            image_id: image_id.to_string(),
            tenant: tenant.to_string(),
            source,
            status: ImageStatus::Pending,
            error: None,
            permanent_failure: false,
            original: None,
            resized: None,
            orientation: None,
            sha256: None,
            original_sha256: None,
            original_key: Some(original_key),
            resized_key: None,
            estimate: None,
            original_estimate: None,
            result: None,
            extra_spend: None,
            detail: None,
            lane: None,
            generation: None,
            created_at: now.to_string(),
            updated_at: now.to_string(),
        }
    }
}

/// Paid calls of an image outside its result (see [`ImageRecord::extra_spend`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtraSpend {
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// The part of `cost_usd` booked at the estimate (answers whose usage could not be read).
    #[serde(default)]
    pub cost_at_estimate_usd: f64,
}

impl ExtraSpend {
    pub fn add(&mut self, other: &ExtraSpend) {
        self.calls += other.calls;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost_usd += other.cost_usd;
        self.cost_at_estimate_usd += other.cost_at_estimate_usd;
    }
}

/// The analysis of one image by one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisResult {
    pub provider: String,
    pub model: String,
    /// The analysis object (provider-specific JSON, validated).
    pub analysis: serde_json::Value,
    pub usage: Usage,
    pub cost_usd: f64,
    /// True when served from the idempotency cache (no provider call, $0).
    pub cached: bool,
    /// Provider calls paid for this result: 1, 2 when an invalid answer was retried, 0 when
    /// cached.
    #[serde(default)]
    pub calls: u32,
    /// True when some of `usage` is the pre-call estimate, not the provider's report: a paid
    /// answer whose usage could not be read (truncated or unreadable 200) is booked at its
    /// estimate rather than at $0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage_estimated: bool,
    /// The part of `cost_usd` booked at the estimate (0 when every call reported its usage).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cost_at_estimate_usd: f64,
    /// The lane that paid for it: a batch answer is priced at the model's batch prices.
    #[serde(default, skip_serializing_if = "Lane::is_realtime")]
    pub lane: Lane,
    /// The batch (our id) whose line this answer was: a second reconciliation of the same
    /// batch recognises its own result and books nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// What this result saved: for a batch answer, what the same usage would have cost in the
    /// real-time lane minus `cost_usd`; for a reused analysis, the estimate of the call it
    /// spared.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub saved_usd: f64,
    /// The image whose analysis this one reuses (near-duplicate skip): no call was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<String>,
    pub idempotency_key: String,
    pub prompt_version: String,
    pub price_version: String,
    pub completed_at: String,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// The queue message that asks for one analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisJob {
    /// Message schema version.
    pub v: u32,
    pub image_id: String,
    pub tenant: String,
    pub resized_key: String,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    /// The image detail decided when the job was recorded (what its estimate assumed); jobs
    /// written before it existed use the settings' detail for their tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
    /// The lane decided when the job was recorded (None: real-time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Lane>,
    /// A generated image's request: the analysis also checks the image against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::genjob::CheckSpec>,
}

/// Why a queue body is not an [`AnalysisJob`]: permanent for that message, never for the batch.
#[derive(Debug, thiserror::Error)]
pub enum JobParseError {
    #[error("malformed job message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported job message version {found} (this build reads version {expected})")]
    UnsupportedVersion { found: u32, expected: u32 },
    #[error("job message lacks {0}")]
    MissingField(&'static str),
}

impl AnalysisJob {
    pub const VERSION: u32 = 1;

    /// Parse one queue body; a bad body is a permanent error for that message only.
    pub fn parse(body: &str) -> Result<AnalysisJob, JobParseError> {
        let job: AnalysisJob = serde_json::from_str(body)?;
        if job.v != Self::VERSION {
            return Err(JobParseError::UnsupportedVersion {
                found: job.v,
                expected: Self::VERSION,
            });
        }
        if job.image_id.is_empty() {
            return Err(JobParseError::MissingField("an image_id"));
        }
        if job.resized_key.is_empty() {
            return Err(JobParseError::MissingField("a resized_key"));
        }
        if job.sha256.len() != 64 {
            return Err(JobParseError::MissingField("a sha256 of 64 hex digits"));
        }
        Ok(job)
    }
}

/// Whose answers an idempotency key may be reused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope<'a> {
    /// Only the tenant's own images (the default): one tenant's answer is never another's.
    Tenant(&'a str),
    /// Every tenant (an explicit setting: `share_cache_across_tenants`).
    Shared,
}

/// Every request parameter besides the image and the model that changes the answer: an
/// answer is reused only for a request that asked the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerParams<'a> {
    pub prompt_version: &'a str,
    pub detail: Detail,
    pub max_output_tokens: u32,
}

/// Idempotency key: the same resized bytes, model and answer parameters are analysed once per
/// scope. Tenants never contain '/' (they are one path segment of an upload key), so the
/// `t:{tenant}/` and `shared/` prefixes cannot collide; prompt versions contain no ':'.
pub fn idempotency_key(
    scope: CacheScope<'_>,
    sha256: &str,
    model: &str,
    params: &AnswerParams<'_>,
) -> String {
    let AnswerParams {
        prompt_version,
        detail,
        max_output_tokens,
    } = params;
    let rest = format!("{sha256}:{model}:{prompt_version}:{detail}:{max_output_tokens}");
    match scope {
        CacheScope::Tenant(t) => format!("t:{t}/{rest}"),
        CacheScope::Shared => format!("shared/{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_parse_names_what_is_wrong_with_a_body() {
        assert!(matches!(
            AnalysisJob::parse("not json"),
            Err(JobParseError::Malformed(_))
        ));
        assert!(matches!(
            AnalysisJob::parse("{}"),
            Err(JobParseError::Malformed(_))
        ));
        let good = AnalysisJob {
            v: 1,
            image_id: "i".into(),
            tenant: "t".into(),
            resized_key: "resized/t/i.jpg".into(),
            sha256: "a".repeat(64),
            width: 1,
            height: 1,
            detail: Some(Detail::Low),
            lane: Some(Lane::Batch),
            check: None,
        };
        let body = serde_json::to_string(&good).unwrap();
        assert_eq!(AnalysisJob::parse(&body).unwrap(), good);
        let v2 = body.replace("\"v\":1", "\"v\":2");
        let err = AnalysisJob::parse(&v2).unwrap_err();
        assert!(matches!(
            err,
            JobParseError::UnsupportedVersion {
                found: 2,
                expected: 1
            }
        ));
        assert!(err.to_string().contains("version 2"), "{err}");
        let no_sha = body.replace(&"a".repeat(64), "abc");
        let err = AnalysisJob::parse(&no_sha).unwrap_err();
        assert!(matches!(err, JobParseError::MissingField(_)));
        assert!(err.to_string().contains("sha256"), "{err}");
        let no_key = body.replace("resized/t/i.jpg", "");
        assert!(AnalysisJob::parse(&no_key)
            .unwrap_err()
            .to_string()
            .contains("resized_key"));
    }

    const V1: AnswerParams<'static> = AnswerParams {
        prompt_version: "v1",
        detail: Detail::High,
        max_output_tokens: 400,
    };

    #[test]
    fn idempotency_keys_are_scoped_by_tenant_unless_shared() {
        let sha = "ab".repeat(32);
        let a = idempotency_key(CacheScope::Tenant("a"), &sha, "m", &V1);
        let b = idempotency_key(CacheScope::Tenant("b"), &sha, "m", &V1);
        let shared = idempotency_key(CacheScope::Shared, &sha, "m", &V1);
        assert_ne!(a, b);
        assert_ne!(a, shared);
        // A tenant literally named "shared" still gets its own key.
        assert_ne!(
            idempotency_key(CacheScope::Tenant("shared"), &sha, "m", &V1),
            shared
        );
    }

    #[test]
    fn every_answer_parameter_changes_the_idempotency_key() {
        let sha = "ab".repeat(32);
        let key = |p: &AnswerParams<'_>| idempotency_key(CacheScope::Shared, &sha, "m", p);
        let base = key(&V1);
        for other in [
            AnswerParams {
                prompt_version: "v2",
                ..V1
            },
            AnswerParams {
                detail: Detail::Low,
                ..V1
            },
            AnswerParams {
                detail: Detail::Auto,
                ..V1
            },
            AnswerParams {
                max_output_tokens: 800,
                ..V1
            },
        ] {
            assert_ne!(key(&other), base, "{other:?}");
        }
        assert_ne!(
            idempotency_key(CacheScope::Shared, &sha, "m2", &V1),
            base,
            "the model"
        );
    }

    #[test]
    fn old_job_messages_without_a_detail_still_parse() {
        let body = format!(
            r#"{{"v":1,"image_id":"i","tenant":"t","resized_key":"k","sha256":"{}","width":2,"height":3}}"#,
            "a".repeat(64)
        );
        assert_eq!(AnalysisJob::parse(&body).unwrap().detail, None);
        assert_eq!(Detail::parse(" LOW "), Some(Detail::Low));
        assert_eq!(Detail::parse("auto"), Some(Detail::Auto));
        assert_eq!(Detail::parse("medium"), None);
    }

    #[test]
    fn status_round_trips() {
        for s in [
            ImageStatus::Pending,
            ImageStatus::Queued,
            ImageStatus::Done,
            ImageStatus::Failed,
        ] {
            assert_eq!(ImageStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(ImageStatus::parse("nope"), None);
    }
}
