//! OpenAI-compatible chat completions (OpenAI, Gemini's OpenAI endpoint, DeepSeek, gateways).

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sightline_core::pricing::Usage;
use sightline_core::retry::{parse_reset, parse_retry_after, FailureKind};

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
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .build()?;
        Ok(OpenAiProvider {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
        })
    }

    fn body(req: &VisionRequest) -> Value {
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

/// A chat completion with a 400-token answer is a few KB; anything near this is not one.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The body as text, refusing to buffer more than `max` bytes of it.
async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<String, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > max {
            // Keep what fits: the caller reports a body that does not parse.
            body.extend_from_slice(&chunk[..max - body.len()]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// x-ratelimit-* headers, as OpenAI sends them.
pub fn rate_info(h: &HeaderMap) -> RateInfo {
    RateInfo {
        remaining_requests: header_str(h, "x-ratelimit-remaining-requests")
            .and_then(|v| v.trim().parse().ok()),
        remaining_tokens: header_str(h, "x-ratelimit-remaining-tokens")
            .and_then(|v| v.trim().parse().ok()),
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

/// A failure before any answer: nothing was billed.
fn err(kind: FailureKind, message: String, rate: RateInfo) -> ProviderError {
    ProviderError {
        kind,
        message,
        rate,
        usage: None,
        billed: false,
    }
}

/// A 200 that is not a usable analysis: billed, with `usage` when the body reported it.
fn bad_answer(message: String, rate: RateInfo, usage: Option<Usage>) -> ProviderError {
    ProviderError {
        kind: FailureKind::InvalidOutput,
        message,
        rate,
        usage,
        billed: true,
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
        let sent = self
            .client
            .post(&url)
            .bearer_auth(&self.api_key)
            .json(&Self::body(req))
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(err(
                    FailureKind::Timeout,
                    format!("provider timed out: {e}"),
                    RateInfo::default(),
                ))
            }
            Err(e) => {
                return Err(err(
                    FailureKind::Connection,
                    format!("provider unreachable: {e}"),
                    RateInfo::default(),
                ))
            }
        };
        let status = resp.status().as_u16();
        let rate = rate_info(resp.headers());
        let retry_after = header_str(resp.headers(), "retry-after").and_then(parse_retry_after);
        let text = match read_capped(resp, MAX_RESPONSE_BYTES).await {
            Ok(t) => t,
            // A 200 cut off while its body was read was still answered, so it is billed.
            Err(e) if status == 200 => {
                return Err(bad_answer(
                    format!("reading the provider's answer failed: {e}"),
                    rate,
                    None,
                ))
            }
            Err(e) if e.is_timeout() => {
                return Err(err(
                    FailureKind::Timeout,
                    format!("provider timed out: {e}"),
                    rate,
                ))
            }
            Err(e) => {
                return Err(err(
                    FailureKind::Connection,
                    format!("reading provider response: {e}"),
                    rate,
                ))
            }
        };
        if status != 200 {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(err(
                FailureKind::Http {
                    status,
                    retry_after,
                },
                format!("provider returned HTTP {status}: {detail}"),
                rate,
            ));
        }
        let body: Value = serde_json::from_str(&text)
            .map_err(|e| bad_answer(format!("provider response is not JSON: {e}"), rate, None))?;
        let usage = usage_of(&body);
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
            .unwrap_or(&req.model)
            .to_string();
        Ok(VisionResponse {
            analysis,
            usage,
            model,
            rate,
        })
    }
}
