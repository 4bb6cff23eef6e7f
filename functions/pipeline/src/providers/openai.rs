//! OpenAI-compatible chat completions (OpenAI, Gemini's OpenAI endpoint, DeepSeek, gateways).

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sightline_core::pricing::Usage;
use sightline_core::retry::parse_reset;

use super::http::{bad_answer, client, exchange, header_str, Reply, Wire};
use super::validate_analysis;
use crate::ports::{ProviderError, RateInfo, VisionProvider, VisionRequest, VisionResponse};

#[derive(Clone)]
pub struct OpenAiProvider {
    client: reqwest::Client,
    base_url: String,
    api_key: String,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("OpenAiProvider")
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl OpenAiProvider {
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> anyhow::Result<OpenAiProvider> {
        Ok(OpenAiProvider {
            client: client(timeout)?,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
        })
    }

    /// The request body; batch lines carry exactly this too.
    pub(crate) fn body(req: &VisionRequest) -> Value {
        let data_url = format!(
            "data:image/jpeg;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(req.jpeg.as_slice())
        );
        json!({
            "model": req.model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": req.prompt},
                    {"type": "image_url", "image_url": {"url": data_url, "detail": req.detail.as_str()}}
                ]
            }],
            "max_tokens": req.max_output_tokens,
            "response_format": {"type": "json_object"},
            "temperature": 0
        })
    }
}

/// x-ratelimit-* headers, as OpenAI sends them.
pub fn rate_info(h: &HeaderMap) -> RateInfo {
    let count = |name: &str| header_str(h, name).and_then(|v| v.trim().parse().ok());
    RateInfo {
        limit_requests: count("x-ratelimit-limit-requests"),
        limit_tokens: count("x-ratelimit-limit-tokens"),
        remaining_requests: count("x-ratelimit-remaining-requests"),
        remaining_tokens: count("x-ratelimit-remaining-tokens"),
        reset_requests: header_str(h, "x-ratelimit-reset-requests").and_then(parse_reset),
        reset_tokens: header_str(h, "x-ratelimit-reset-tokens").and_then(parse_reset),
    }
}

fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    Some(Usage {
        input_tokens: u.get("prompt_tokens")?.as_u64()?,
        output_tokens: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cached_tokens: u
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// OpenAI's header conventions (the shared defaults for errors and Retry-After).
pub(crate) struct OpenAiWire;

impl Wire for OpenAiWire {
    fn rate_info(&self, headers: &HeaderMap) -> RateInfo {
        rate_info(headers)
    }
}

#[async_trait]
impl VisionProvider for OpenAiProvider {
    fn name(&self) -> &str {
        "openai"
    }

    fn is_paid(&self) -> bool {
        true
    }

    async fn analyze(&self, req: &VisionRequest) -> Result<VisionResponse, ProviderError> {
        let url = format!("{}/chat/completions", self.base_url);
        let request = self
            .client
            .post(&url)
            .bearer_auth(&self.api_key)
            .json(&Self::body(req));
        let Reply { body, rate } = exchange(request, &OpenAiWire).await?;
        answer(&body, &req.model, rate)
    }
}

/// A chat completion (an answer, or a batch line's body) as a validated analysis, or the billed
/// invalid-output failure it is. `model` stands in when the body names none.
// The error VisionProvider::analyze returns, unboxed like it.
#[allow(clippy::result_large_err)]
pub(crate) fn answer(
    body: &Value,
    model: &str,
    rate: RateInfo,
) -> Result<VisionResponse, ProviderError> {
    let usage = usage_of(body);
    let content = body
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad_answer(
                "provider response has no message content".into(),
                rate,
                usage,
            )
        })?;
    let analysis =
        validate_analysis(content).map_err(|e| bad_answer(e.to_string(), rate, usage))?;
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
