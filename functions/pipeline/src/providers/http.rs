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

/// Send `request`: timeouts and connection errors are transient and not billed.
async fn send(request: reqwest::RequestBuilder) -> Result<reqwest::Response, ProviderError> {
    match request.send().await {
        Ok(r) => Ok(r),
        Err(e) if e.is_timeout() => Err(err(
            FailureKind::Timeout,
            format!("provider timed out: {e}"),
            RateInfo::default(),
        )),
        Err(e) => Err(err(
            FailureKind::Connection,
            format!("provider unreachable: {e}"),
            RateInfo::default(),
        )),
    }
}

/// A non-200 with the provider's own words for it.
fn status_error(
    status: u16,
    text: &str,
    retry_after: Option<Duration>,
    rate: RateInfo,
    wire: &dyn Wire,
) -> ProviderError {
    let detail = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| wire.error_detail(&v))
        .unwrap_or_else(|| text.chars().take(200).collect());
    err(
        FailureKind::Http {
            status,
            retry_after,
        },
        format!("provider returned HTTP {status}: {detail}"),
        rate,
    )
}

/// A call that manages a batch (upload, create, status, list): like [`exchange`], but nothing
/// in it is billed, so a 200 that is not JSON is an unbilled failure.
pub(crate) async fn control(
    request: reqwest::RequestBuilder,
    wire: &dyn Wire,
) -> Result<Value, ProviderError> {
    match exchange(request, wire).await {
        Ok(reply) => Ok(reply.body),
        Err(e) => Err(ProviderError { billed: false, ..e }),
    }
}

/// Largest batch results download accepted (an output file of 50,000 answers is far smaller).
pub(crate) const MAX_RESULTS_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Longest results line kept; an answer or error line is a few KB.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Download a JSONL body and hand each line to `line` as it arrives, so only one line is
/// buffered. Lines longer than [`MAX_LINE_BYTES`] are skipped with a warning; a body over
/// `max_bytes` is refused.
pub(crate) async fn download_lines(
    request: reqwest::RequestBuilder,
    wire: &dyn Wire,
    max_bytes: u64,
    line: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<(), ProviderError> {
    let mut resp = send(request).await?;
    let status = resp.status().as_u16();
    let rate = wire.rate_info(resp.headers());
    let too_large = |n: u64| {
        err(
            FailureKind::InvalidOutput,
            format!("batch results of {n} bytes exceed the {max_bytes}-byte limit"),
            rate,
        )
    };
    if status != 200 {
        let retry_after = wire.retry_after(status, resp.headers(), &rate);
        let text = read_capped(resp, 64 * 1024).await.unwrap_or_default();
        return Err(status_error(status, &text, retry_after, rate, wire));
    }
    if let Some(n) = resp.content_length().filter(|n| *n > max_bytes) {
        return Err(too_large(n));
    }
    let mut total = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    let mut skipping = false;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) if e.is_timeout() => {
                return Err(err(
                    FailureKind::Timeout,
                    format!("batch results download timed out: {e}"),
                    rate,
                ))
            }
            Err(e) => {
                return Err(err(
                    FailureKind::Connection,
                    format!("reading batch results: {e}"),
                    rate,
                ))
            }
        };
        total += chunk.len() as u64;
        if total > max_bytes {
            return Err(too_large(total));
        }
        let mut rest: &[u8] = &chunk;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            if !skipping {
                pending.extend_from_slice(&rest[..i]);
                line(&pending);
            }
            pending.clear();
            skipping = false;
            rest = &rest[i + 1..];
        }
        if !skipping {
            if pending.len() + rest.len() > MAX_LINE_BYTES {
                tracing::warn!(
                    max = MAX_LINE_BYTES,
                    "skipping a batch results line over the length limit"
                );
                pending.clear();
                skipping = true;
            } else {
                pending.extend_from_slice(rest);
            }
        }
    }
    if !skipping && !pending.is_empty() {
        line(&pending);
    }
    Ok(())
}

/// Send `request` and read its answer. Timeouts and connection errors are transient and not
/// billed; a non-200 is `FailureKind::Http` with the provider's Retry-After; a 200 cut off or not
/// JSON is billed invalid output.
pub(crate) async fn exchange(
    request: reqwest::RequestBuilder,
    wire: &dyn Wire,
) -> Result<Reply, ProviderError> {
    exchange_capped(request, wire, MAX_RESPONSE_BYTES).await
}

/// [`exchange`] with a body cap of `max_bytes` (generated images are answered as base64 in the
/// JSON, far larger than an analysis). A body over it is cut, so it is billed invalid output.
pub(crate) async fn exchange_capped(
    request: reqwest::RequestBuilder,
    wire: &dyn Wire,
    max_bytes: usize,
) -> Result<Reply, ProviderError> {
    let resp = send(request).await?;
    let status = resp.status().as_u16();
    let rate = wire.rate_info(resp.headers());
    let retry_after = wire.retry_after(status, resp.headers(), &rate);
    let text = match read_capped(resp, max_bytes).await {
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
        return Err(status_error(status, &text, retry_after, rate, wire));
    }
    let body: Value = serde_json::from_str(&text)
        .map_err(|e| bad_answer(format!("provider response is not JSON: {e}"), rate, None))?;
    Ok(Reply { body, rate })
}
