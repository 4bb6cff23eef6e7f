//! The HTTP exchange every paid provider shares: send, classify transport failures and
//! statuses, read the body within a cap, and say which failures were billed. Each provider
//! supplies only what its wire format differs in ([`Wire`]).

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::Value;
use sightline_core::pricing::Usage;
use sightline_core::retry::{parse_retry_after, FailureKind};

use crate::ports::{ProviderError, RateInfo};

/// An answer of a vision call is a few KB; anything near this is not one.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// What differs between providers' HTTP conventions.
pub(crate) trait Wire: Sync {
    /// Rate-limit state from the response headers.
    fn rate_info(&self, headers: &HeaderMap) -> RateInfo;

    /// How long the provider asks us to wait before the next call (a 429's `retry-after`).
    fn retry_after(&self, _status: u16, headers: &HeaderMap, _rate: &RateInfo) -> Option<Duration> {
        header_str(headers, "retry-after").and_then(parse_retry_after)
    }

    /// The readable part of an error body (`error.message` in both OpenAI's and Anthropic's).
    fn error_detail(&self, body: &Value) -> Option<String> {
        body.pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// A 200 whose body is JSON, with the rate-limit state it came with.
pub(crate) struct Reply {
    pub body: Value,
    pub rate: RateInfo,
}

/// The HTTP client of a provider: one call's timeout, and a connect timeout within it.
pub(crate) fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .build()
}

pub(crate) fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A failure before any answer: nothing was billed.
pub(crate) fn err(kind: FailureKind, message: String, rate: RateInfo) -> ProviderError {
    ProviderError {
        kind,
        message,
        rate,
        usage: None,
        billed: false,
    }
}

/// A 200 that is not a usable analysis: billed, with `usage` when the body reported it.
pub(crate) fn bad_answer(message: String, rate: RateInfo, usage: Option<Usage>) -> ProviderError {
    ProviderError {
        kind: FailureKind::InvalidOutput,
        message,
        rate,
        usage,
        billed: true,
    }
}

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

/// Send `request` and read its answer. Timeouts and connection errors are transient and not
/// billed; a non-200 is `FailureKind::Http` with the provider's Retry-After; a 200 cut off or not
/// JSON is billed invalid output.
pub(crate) async fn exchange(
    request: reqwest::RequestBuilder,
    wire: &dyn Wire,
) -> Result<Reply, ProviderError> {
    let resp = match request.send().await {
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
    let rate = wire.rate_info(resp.headers());
    let retry_after = wire.retry_after(status, resp.headers(), &rate);
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
            .and_then(|v| wire.error_detail(&v))
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
    Ok(Reply { body, rate })
}
