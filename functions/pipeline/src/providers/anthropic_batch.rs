//! Anthropic's Message Batches: `POST {base}/v1/messages/batches` with
//! `{"requests":[{custom_id, params}]}` (each `params` exactly the real-time Messages body),
//! polled by `processing_status`, and once `ended` its results (JSONL) matched by `custom_id`.
//! A succeeded line's message is read by the real-time code ([`super::anthropic::answer`]).
//!
//! Anthropic keeps no metadata on a batch, so [`BatchProvider::find`] cannot tell ours apart
//! and answers None: a crash between the create and our record of it leaves that batch to run
//! unrecorded (its lines are then submitted again).

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sightline_core::batch::{anthropic_phase, BatchLimits, ANTHROPIC_BATCH_LIMITS};
use sightline_core::retry::FailureKind;

use super::anthropic::{answer, AnthropicProvider, AnthropicWire, ANTHROPIC_VERSION};
use super::http::{client, control, download_lines, err, MAX_RESULTS_BYTES};
use super::openai_batch::download_timeout;
use crate::ports::{
    BatchLine, BatchProvider, BatchRequest, LineOutcome, ProviderBatch, ProviderError, RateInfo,
};

#[derive(Clone)]
pub struct AnthropicBatchProvider {
    client: reqwest::Client,
    downloads: reqwest::Client,
    base_url: String,
    api_key: String,
}

impl std::fmt::Debug for AnthropicBatchProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("AnthropicBatchProvider")
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl AnthropicBatchProvider {
    /// `base_url` as the real-time client takes it (no path: `https://api.anthropic.com`).
    pub fn new(
        base_url: &str,
        api_key: &str,
        timeout: Duration,
    ) -> anyhow::Result<AnthropicBatchProvider> {
        Ok(AnthropicBatchProvider {
            client: client(timeout)?,
            downloads: client(download_timeout(timeout))?,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
        })
    }

    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request
            .header("x-api-key", &self.api_key)
            .header("anthropic-version", ANTHROPIC_VERSION)
    }
}

fn local(message: String) -> ProviderError {
    err(FailureKind::InvalidOutput, message, RateInfo::default())
}

/// The HTTP status Anthropic answers an error type with (its documented classes).
fn status_of(error_type: &str) -> u16 {
    match error_type {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        // api_error and anything new: a server-side failure, retryable.
        _ => 500,
    }
}

/// One results line; None (with a warning) when it cannot be read.
pub(crate) fn parse_line(bytes: &[u8]) -> Option<BatchLine> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "skipping an Anthropic batch results line that is not JSON");
            return None;
        }
    };
    let Some(custom_id) = v.get("custom_id").and_then(Value::as_str) else {
        tracing::warn!("skipping an Anthropic batch results line without a custom_id");
        return None;
    };
    let result = v.get("result").unwrap_or(&Value::Null);
    let outcome = match result.get("type").and_then(Value::as_str) {
        Some("succeeded") => {
            let message = result.get("message").unwrap_or(&Value::Null);
            match answer(message, "", RateInfo::default()) {
                Ok(r) => LineOutcome::Answered(r),
                Err(e) => LineOutcome::Failed(e),
            }
        }
        Some("errored") => {
            // {"type":"error","error":{"type":"invalid_request_error","message":"…"}}
            let inner = result.pointer("/error/error").unwrap_or(&Value::Null);
            let kind = inner
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("api_error");
            let message = inner
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            let status = status_of(kind);
            LineOutcome::Failed(err(
                FailureKind::Http {
                    status,
                    retry_after: None,
                },
                format!("provider returned HTTP {status}: {kind}: {message}"),
                RateInfo::default(),
            ))
        }
        Some(why @ ("canceled" | "expired")) => LineOutcome::Unprocessed(why.to_string()),
        other => {
            tracing::warn!(custom_id, result = ?other, "skipping an Anthropic batch line of unknown type");
            return None;
        }
    };
    Some(BatchLine {
        custom_id: custom_id.to_string(),
        outcome,
    })
}

#[async_trait]
impl BatchProvider for AnthropicBatchProvider {
    fn name(&self) -> &str {
        "anthropic"
    }

    fn limits(&self) -> BatchLimits {
        ANTHROPIC_BATCH_LIMITS
    }

    fn encode(&self, request: &BatchRequest) -> Result<Vec<u8>, ProviderError> {
        let element = serde_json::json!({
            "custom_id": request.custom_id,
            "params": AnthropicProvider::body(&request.request),
        });
        serde_json::to_vec(&element).map_err(|e| local(format!("encoding a batch request: {e}")))
    }

    /// Anthropic keeps no metadata: `batch_id` is not sent.
    async fn submit(
        &self,
        _batch_id: &str,
        encoded: Vec<Vec<u8>>,
    ) -> Result<String, ProviderError> {
        if encoded.is_empty() {
            return Err(local("a batch needs at least one request".into()));
        }
        // The elements are JSON already: join them into the envelope without re-parsing.
        let size = encoded.iter().map(|e| e.len() + 1).sum::<usize>() + 16;
        let mut body = Vec::with_capacity(size);
        body.extend_from_slice(b"{\"requests\":[");
        for (i, e) in encoded.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(e);
        }
        body.extend_from_slice(b"]}");
        let request = self.authed(
            self.downloads
                .post(format!("{}/v1/messages/batches", self.base_url))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
        );
        let batch = control(request, &AnthropicWire).await?;
        batch
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| local("the batch create's answer has no id".into()))
    }

    async fn status(&self, provider_batch_id: &str) -> Result<ProviderBatch, ProviderError> {
        let request = self.authed(self.client.get(format!(
            "{}/v1/messages/batches/{provider_batch_id}",
            self.base_url
        )));
        let batch = control(request, &AnthropicWire).await?;
        let status = batch
            .get("processing_status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        Ok(ProviderBatch {
            provider_batch_id: provider_batch_id.to_string(),
            phase: anthropic_phase(&status),
            status,
            // A refused batch is refused at create; an ended one reports per line.
            error: None,
        })
    }

    /// Reads `{base}/v1/messages/batches/{id}/results`, the path `results_url` names, so the key
    /// is only ever sent to the configured base.
    async fn results(&self, provider_batch_id: &str) -> Result<Vec<BatchLine>, ProviderError> {
        let request = self.authed(self.downloads.get(format!(
            "{}/v1/messages/batches/{provider_batch_id}/results",
            self.base_url
        )));
        let mut lines = Vec::new();
        download_lines(request, &AnthropicWire, MAX_RESULTS_BYTES, &mut |bytes| {
            if let Some(line) = parse_line(bytes) {
                lines.push(line);
            }
        })
        .await?;
        Ok(lines)
    }

    /// Always None: Anthropic keeps no metadata to find our batch by.
    async fn find(&self, _batch_id: &str, _since_ms: u64) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sightline_core::pricing::Usage;

    fn line(v: Value) -> Option<BatchLine> {
        parse_line(v.to_string().as_bytes())
    }

    fn message(model: &str, text: &str) -> Value {
        json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 200, "output_tokens": 40, "cache_read_input_tokens": 0}})
    }

    #[test]
    fn a_succeeded_line_is_an_answer_with_the_dated_model_and_usage() {
        let l = line(json!({"custom_id": "abc", "result": {"type": "succeeded",
            "message": message("claude-haiku-4-5-20251001", r#"{"description":"a dog"}"#)}}))
        .unwrap();
        assert_eq!(l.custom_id, "abc");
        let LineOutcome::Answered(r) = l.outcome else {
            panic!("{:?}", l.outcome)
        };
        assert_eq!(r.model, "claude-haiku-4-5-20251001");
        assert_eq!(
            r.usage,
            Some(Usage {
                input_tokens: 200,
                output_tokens: 40,
                cached_tokens: 0
            })
        );
    }

    #[test]
    fn a_succeeded_line_with_invalid_output_is_billed() {
        let l = line(json!({"custom_id": "a", "result": {"type": "succeeded",
            "message": message("claude-haiku-4-5", "Sorry, no.")}}))
        .unwrap();
        let LineOutcome::Failed(e) = l.outcome else {
            panic!()
        };
        assert_eq!(e.kind, FailureKind::InvalidOutput);
        assert!(e.billed);
        assert_eq!(e.usage.map(|u| u.output_tokens), Some(40));
        // Without usage it is billed all the same.
        let mut m = message("claude-haiku-4-5", "Sorry, no.");
        m.as_object_mut().unwrap().remove("usage");
        let l =
            line(json!({"custom_id": "a", "result": {"type": "succeeded", "message": m}})).unwrap();
        let LineOutcome::Failed(e) = l.outcome else {
            panic!()
        };
        assert!(e.billed && e.usage.is_none());
    }

    #[test]
    fn errored_lines_map_their_error_type_to_the_status() {
        for (kind, status) in [
            ("invalid_request_error", 400u16),
            ("authentication_error", 401),
            ("permission_error", 403),
            ("not_found_error", 404),
            ("request_too_large", 413),
            ("rate_limit_error", 429),
            ("api_error", 500),
            ("overloaded_error", 529),
        ] {
            let l = line(json!({"custom_id": "a", "result": {"type": "errored",
                "error": {"type": "error", "error": {"type": kind, "message": "why"}}}}))
            .unwrap();
            let LineOutcome::Failed(e) = l.outcome else {
                panic!()
            };
            assert_eq!(
                e.kind,
                FailureKind::Http {
                    status,
                    retry_after: None
                },
                "{kind}"
            );
            assert!(!e.billed);
            assert!(e.message.contains(kind) && e.message.contains("why"));
        }
    }

    #[test]
    fn canceled_and_expired_lines_are_unprocessed_and_junk_is_skipped() {
        for t in ["canceled", "expired"] {
            let l = line(json!({"custom_id": "a", "result": {"type": t}})).unwrap();
            assert!(matches!(l.outcome, LineOutcome::Unprocessed(ref w) if w == t));
        }
        assert!(parse_line(b"not json").is_none());
        assert!(line(json!({"result": {"type": "expired"}})).is_none());
        assert!(line(json!({"custom_id": "a", "result": {"type": "new_kind"}})).is_none());
    }
}
