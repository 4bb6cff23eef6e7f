//! Anthropic's Messages API (`POST {base}/v1/messages`) for Claude models.
//!
//! Failures map onto the shared classification (`sightline_core::retry`): 429
//! `rate_limit_error`, 500 `api_error`, 529 `overloaded_error`, timeouts and connection errors
//! are transient; 400 `invalid_request_error`, 401 `authentication_error`, 403
//! `permission_error`, 404 `not_found_error` and 413 `request_too_large` are permanent.
//! `anthropic-ratelimit-*` headers (reset times in RFC 3339) feed the limiter as OpenAI's
//! `x-ratelimit-*` do. Image `detail` does not exist here and is not sent.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sightline_core::pricing::Usage;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::http::{bad_answer, client, exchange, header_str, Reply, Wire};
use super::validate_analysis;
use crate::ports::{ProviderError, RateInfo, VisionProvider, VisionRequest, VisionResponse};

/// The API version this client speaks (sent as `anthropic-version`).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

#[derive(Clone)]
pub struct AnthropicProvider {
    client: reqwest::Client,
    base_url: String,
    api_key: String,
}

impl std::fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("AnthropicProvider")
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl AnthropicProvider {
    /// `base_url` without the path: `https://api.anthropic.com`.
    pub fn new(
        base_url: &str,
        api_key: &str,
        timeout: Duration,
    ) -> anyhow::Result<AnthropicProvider> {
        Ok(AnthropicProvider {
            client: client(timeout)?,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
        })
    }

    /// The request body; a batch request's `params` are exactly this too.
    pub(crate) fn body(req: &VisionRequest) -> Value {
        let data = base64::engine::general_purpose::STANDARD.encode(req.jpeg.as_slice());
        json!({
            "model": req.model,
            "max_tokens": req.max_output_tokens,
            "temperature": 0,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": data}},
                    {"type": "text", "text": req.prompt}
                ]
            }]
        })
    }
}

/// Time from `now` until an RFC 3339 reset instant (zero when it has passed). None for a value
/// that does not parse or lies a day or more ahead (headers are input).
fn until(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let at = OffsetDateTime::parse(value.trim(), &Rfc3339).ok()?;
    let ms = (at - now).whole_milliseconds();
    if ms >= 86_400_000 {
        return None;
    }
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// `anthropic-ratelimit-*` headers as the limiter's view, with reset times measured from `now`.
///
/// Requests map one to one. Tokens: Anthropic reports the combined `tokens-*` (the most
/// restrictive limit in effect) and `input-tokens-*` / `output-tokens-*`; the limiter has one
/// token bucket, so it gets the smallest remaining count of those sent, with that dimension's
/// reset, so an exhausted dimension blocks until it refills.
pub fn rate_info(h: &HeaderMap, now: OffsetDateTime) -> RateInfo {
    let count = |name: &str| header_str(h, name).and_then(|v| v.trim().parse::<u64>().ok());
    let reset = |name: &str| header_str(h, name).and_then(|v| until(v, now));
    let tightest = ["tokens", "input-tokens", "output-tokens"]
        .into_iter()
        .filter_map(|dim| {
            let remaining = count(&format!("anthropic-ratelimit-{dim}-remaining"))?;
            Some((
                remaining,
                reset(&format!("anthropic-ratelimit-{dim}-reset")),
                count(&format!("anthropic-ratelimit-{dim}-limit")),
            ))
        })
        // Equal counts: the later reset is the one to wait for.
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    RateInfo {
        limit_requests: count("anthropic-ratelimit-requests-limit"),
        remaining_requests: count("anthropic-ratelimit-requests-remaining"),
        reset_requests: reset("anthropic-ratelimit-requests-reset"),
        limit_tokens: tightest.and_then(|t| t.2),
        remaining_tokens: tightest.map(|t| t.0),
        reset_tokens: tightest.and_then(|t| t.1),
    }
}

/// Usage as Anthropic reports it: `input_tokens` excludes cache reads and writes, ours counts
/// all input with the cached part inside. Cache writes (never requested here) are booked at the
/// input price.
fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let count = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let fresh = u.get("input_tokens")?.as_u64()?;
    let read = count("cache_read_input_tokens");
    let written = count("cache_creation_input_tokens");
    Some(Usage {
        input_tokens: fresh + read + written,
        output_tokens: count("output_tokens"),
        cached_tokens: read,
    })
}

/// The answer's text: every `text` block, in order. None when there is none.
fn text_of(v: &Value) -> Option<String> {
    let blocks = v.get("content")?.as_array()?;
    let texts: Vec<&str> = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    (!texts.is_empty()).then(|| texts.concat())
}

pub(crate) struct AnthropicWire;

impl Wire for AnthropicWire {
    fn rate_info(&self, headers: &HeaderMap) -> RateInfo {
        rate_info(headers, OffsetDateTime::now_utc())
    }

    /// `retry-after` (seconds); a 429 without one waits for the latest reset among the
    /// exhausted dimensions, as Anthropic's SDKs do.
    fn retry_after(&self, status: u16, headers: &HeaderMap, rate: &RateInfo) -> Option<Duration> {
        if let Some(d) =
            header_str(headers, "retry-after").and_then(sightline_core::retry::parse_retry_after)
        {
            return Some(d);
        }
        if status != 429 {
            return None;
        }
        let requests = (rate.remaining_requests == Some(0))
            .then_some(rate.reset_requests)
            .flatten();
        let tokens = (rate.remaining_tokens == Some(0))
            .then_some(rate.reset_tokens)
            .flatten();
        requests.max(tokens)
    }

    /// `{"type":"error","error":{"type":"rate_limit_error","message":"…"}}` → "rate_limit_error: …".
    fn error_detail(&self, body: &Value) -> Option<String> {
        let message = body.pointer("/error/message").and_then(Value::as_str)?;
        Some(match body.pointer("/error/type").and_then(Value::as_str) {
            Some(kind) => format!("{kind}: {message}"),
            None => message.to_string(),
        })
    }
}

#[async_trait]
impl VisionProvider for AnthropicProvider {
    fn name(&self) -> &str {
        "anthropic"
    }

    fn is_paid(&self) -> bool {
        true
    }

    async fn analyze(&self, req: &VisionRequest) -> Result<VisionResponse, ProviderError> {
        let url = format!("{}/v1/messages", self.base_url);
        let request = self
            .client
            .post(&url)
            .header("x-api-key", &self.api_key)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&Self::body(req));
        let Reply { body, rate } = exchange(request, &AnthropicWire).await?;
        answer(&body, &req.model, rate)
    }
}

/// A Messages API answer (or a batch's succeeded message) as a validated analysis, or the
/// billed invalid-output failure it is. `model` stands in when the body names none.
// The error VisionProvider::analyze returns, unboxed like it.
#[allow(clippy::result_large_err)]
pub(crate) fn answer(
    body: &Value,
    model: &str,
    rate: RateInfo,
) -> Result<VisionResponse, ProviderError> {
    let usage = usage_of(body);
    let text = text_of(body)
        .ok_or_else(|| bad_answer("provider response has no text content".into(), rate, usage))?;
    let analysis = validate_analysis(&text).map_err(|e| {
        // A cut answer is the usual cause of invalid JSON: say so.
        let cut = body.get("stop_reason").and_then(Value::as_str) == Some("max_tokens");
        let why = if cut {
            format!("{e} (the answer was cut at max_tokens)")
        } else {
            e.to_string()
        };
        bad_answer(why, rate, usage)
    })?;
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(model)
        .to_string();
    Ok(VisionResponse {
        analysis,
        usage,
        model,
        rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &Rfc3339).unwrap()
    }

    #[test]
    fn rate_headers_become_the_limiters_view_with_resets_from_now() {
        let now = at("2025-08-21T12:40:30Z");
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "1000"),
            ("anthropic-ratelimit-requests-remaining", "999"),
            ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:59Z"),
            ("anthropic-ratelimit-tokens-remaining", "96000"),
            ("anthropic-ratelimit-tokens-reset", "2025-08-21T12:40:59Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "80000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-08-21T12:40:59Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2025-08-21T12:41:00.5Z",
            ),
        ]);
        let r = rate_info(&h, now);
        assert_eq!(r.limit_requests, Some(1000));
        assert_eq!(r.remaining_requests, Some(999));
        assert_eq!(r.reset_requests, Some(Duration::from_secs(29)));
        // The exhausted output dimension is the one the limiter must wait for (with its limit:
        // one token refills in reset ÷ limit).
        assert_eq!(r.remaining_tokens, Some(0));
        assert_eq!(r.limit_tokens, Some(8000));
        assert_eq!(r.reset_tokens, Some(Duration::from_millis(30_500)));
        // A 429 without retry-after waits for that reset.
        assert_eq!(
            AnthropicWire.retry_after(429, &h, &r),
            Some(Duration::from_millis(30_500))
        );
        assert_eq!(AnthropicWire.retry_after(529, &h, &r), None);
        let with_header = headers(&[("retry-after", "7")]);
        assert_eq!(
            AnthropicWire.retry_after(429, &with_header, &r),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn past_far_and_garbled_resets_are_handled() {
        let now = at("2025-08-21T12:40:30Z");
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "5"),
            ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:00Z"),
            ("anthropic-ratelimit-tokens-remaining", "lots"),
            ("anthropic-ratelimit-tokens-reset", "2099-01-01T00:00:00Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "100"),
            ("anthropic-ratelimit-input-tokens-reset", "soon"),
        ]);
        let r = rate_info(&h, now);
        assert_eq!(r.reset_requests, Some(Duration::ZERO));
        assert_eq!(r.remaining_tokens, Some(100));
        assert_eq!(r.reset_tokens, None);
        assert_eq!(rate_info(&HeaderMap::new(), now), RateInfo::default());
    }

    #[test]
    fn usage_counts_cache_reads_inside_the_input() {
        let v = json!({"usage": {"input_tokens": 100, "output_tokens": 20,
            "cache_read_input_tokens": 50, "cache_creation_input_tokens": 10}});
        assert_eq!(
            usage_of(&v),
            Some(Usage {
                input_tokens: 160,
                output_tokens: 20,
                cached_tokens: 50
            })
        );
        assert_eq!(usage_of(&json!({"usage": {"output_tokens": 3}})), None);
    }

    #[test]
    fn the_answer_is_every_text_block_and_the_body_sends_no_detail() {
        let v = json!({"content": [{"type": "text", "text": "{\"desc"},
            {"type": "tool_use", "id": "x"}, {"type": "text", "text": "ription\":\"a\"}"}]});
        assert_eq!(text_of(&v).as_deref(), Some("{\"description\":\"a\"}"));
        assert_eq!(text_of(&json!({"content": []})), None);
        let req = VisionRequest {
            model: "claude-haiku-4-5".into(),
            jpeg: std::sync::Arc::new(vec![1, 2, 3]),
            width: 1,
            height: 1,
            prompt: "p".into(),
            max_output_tokens: 400,
            detail: sightline_core::model::Detail::Low,
            check: None,
        };
        let body = AnthropicProvider::body(&req);
        assert_eq!(body["max_tokens"], 400);
        assert_eq!(body["messages"][0]["content"][0]["source"]["data"], "AQID");
        assert!(!body.to_string().contains("detail"));
    }

    #[test]
    fn error_bodies_name_their_type() {
        let v = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        assert_eq!(
            AnthropicWire.error_detail(&v).as_deref(),
            Some("overloaded_error: Overloaded")
        );
    }
}
