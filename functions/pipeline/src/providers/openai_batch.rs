//! OpenAI's Batch API: the requests go up as a JSONL file (`POST {base}/files`,
//! `purpose=batch`), a batch is created over it (`POST {base}/batches`, 24 h window, our batch
//! id in `metadata.sightline_batch`), and once it has ended its output file (200 lines) and
//! error file (the rest) are downloaded and matched by `custom_id`. Each line's body is exactly
//! the real-time chat completion and is read by the same code ([`super::openai::answer`]).
//!
//! A `failed` batch's `errors.data` codes and messages become [`ProviderBatch::error`], so the
//! enqueued-token limit (`token_limit_exceeded`, reported only on a later GET after a create
//! that succeeded) is visible to the caller.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use sightline_core::batch::{openai_phase, BatchLimits, OPENAI_BATCH_LIMITS};
use sightline_core::retry::FailureKind;

use super::http::{client, control, download_lines, err, MAX_RESULTS_BYTES};
use super::openai::{answer, OpenAiProvider, OpenAiWire};
use crate::ports::{
    BatchLine, BatchProvider, BatchRequest, LineOutcome, ProviderBatch, ProviderError, RateInfo,
};

/// The endpoint every line calls.
const CHAT_URL: &str = "/v1/chat/completions";
/// The metadata key our batch id is kept under.
pub const METADATA_KEY: &str = "sightline_batch";
/// Batches per page when looking for ours (the API's maximum).
const LIST_PAGE: usize = 100;
/// Pages looked through at most: `since_ms` normally stops the walk long before.
const MAX_LIST_PAGES: usize = 50;

#[derive(Clone)]
pub struct OpenAiBatchProvider {
    /// Control calls (upload, create, status, list).
    client: reqwest::Client,
    /// Results downloads, which may take long.
    downloads: reqwest::Client,
    base_url: String,
    api_key: String,
}

impl std::fmt::Debug for OpenAiBatchProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("OpenAiBatchProvider")
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// How long a results download may take at most.
pub(crate) fn download_timeout(timeout: Duration) -> Duration {
    timeout.max(Duration::from_secs(600))
}

impl OpenAiBatchProvider {
    /// `base_url` as the real-time client takes it (ending in `/v1`).
    pub fn new(
        base_url: &str,
        api_key: &str,
        timeout: Duration,
    ) -> anyhow::Result<OpenAiBatchProvider> {
        Ok(OpenAiBatchProvider {
            client: client(timeout)?,
            downloads: client(download_timeout(timeout))?,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
        })
    }

    async fn get(&self, path: &str) -> Result<Value, ProviderError> {
        let request = self
            .client
            .get(format!("{}{path}", self.base_url))
            .bearer_auth(&self.api_key);
        control(request, &OpenAiWire).await
    }

    async fn download_into(
        &self,
        file_id: &str,
        out: &mut Vec<BatchLine>,
    ) -> Result<(), ProviderError> {
        let request = self
            .downloads
            .get(format!("{}/files/{file_id}/content", self.base_url))
            .bearer_auth(&self.api_key);
        download_lines(request, &OpenAiWire, MAX_RESULTS_BYTES, &mut |bytes| {
            if let Some(line) = parse_line(bytes) {
                out.push(line);
            }
        })
        .await
    }
}

/// An error that is ours, not the provider's (nothing sent, nothing billed).
fn local(message: String) -> ProviderError {
    err(FailureKind::InvalidOutput, message, RateInfo::default())
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// One line of an output or error file; None (with a warning) when it cannot be read.
pub(crate) fn parse_line(bytes: &[u8]) -> Option<BatchLine> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "skipping an OpenAI batch results line that is not JSON");
            return None;
        }
    };
    let Some(custom_id) = str_at(&v, "/custom_id") else {
        tracing::warn!("skipping an OpenAI batch results line without a custom_id");
        return None;
    };
    let outcome = match v.get("response").filter(|r| !r.is_null()) {
        Some(response) => {
            let Some(status) = response
                .get("status_code")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
            else {
                tracing::warn!(
                    custom_id,
                    "skipping an OpenAI batch line without a status code"
                );
                return None;
            };
            let body = response.get("body").unwrap_or(&Value::Null);
            if status == 200 {
                // The model stands in empty when the body names none: the caller knows it.
                match answer(body, "", RateInfo::default()) {
                    Ok(r) => LineOutcome::Answered(r),
                    Err(e) => LineOutcome::Failed(e),
                }
            } else {
                let detail = str_at(body, "/error/message").unwrap_or("no message");
                LineOutcome::Failed(err(
                    FailureKind::Http {
                        status,
                        retry_after: None,
                    },
                    format!("provider returned HTTP {status}: {detail}"),
                    RateInfo::default(),
                ))
            }
        }
        None => {
            let code = str_at(&v, "/error/code").unwrap_or("");
            let message = str_at(&v, "/error/message").unwrap_or("no message");
            match code {
                "batch_expired" | "batch_cancelled" => {
                    LineOutcome::Unprocessed(format!("{code}: {message}"))
                }
                // Any other line-level error ran nowhere: retryable like a server error.
                _ => LineOutcome::Failed(err(
                    FailureKind::Http {
                        status: 500,
                        retry_after: None,
                    },
                    format!("batch line failed ({code}): {message}"),
                    RateInfo::default(),
                )),
            }
        }
    };
    Some(BatchLine {
        custom_id: custom_id.to_string(),
        outcome,
    })
}

/// `errors.data` of a failed batch as one readable string (`code: message; …`).
fn errors_of(batch: &Value) -> Option<String> {
    let data = batch.pointer("/errors/data")?.as_array()?;
    let parts: Vec<String> = data
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                str_at(e, "/code").unwrap_or("error"),
                str_at(e, "/message").unwrap_or("no message")
            )
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[async_trait]
impl BatchProvider for OpenAiBatchProvider {
    fn name(&self) -> &str {
        "openai"
    }

    fn limits(&self) -> BatchLimits {
        OPENAI_BATCH_LIMITS
    }

    fn encode(&self, request: &BatchRequest) -> Result<Vec<u8>, ProviderError> {
        let line = json!({
            "custom_id": request.custom_id,
            "method": "POST",
            "url": CHAT_URL,
            "body": OpenAiProvider::body(&request.request),
        });
        serde_json::to_vec(&line).map_err(|e| local(format!("encoding a batch line: {e}")))
    }

    async fn submit(&self, batch_id: &str, encoded: Vec<Vec<u8>>) -> Result<String, ProviderError> {
        if encoded.is_empty() {
            return Err(local("a batch needs at least one request".into()));
        }
        let size = encoded.iter().map(|l| l.len() + 1).sum();
        let mut jsonl = Vec::with_capacity(size);
        for line in encoded {
            jsonl.extend_from_slice(&line);
            jsonl.push(b'\n');
        }
        let file = reqwest::multipart::Part::bytes(jsonl)
            .file_name(format!("{batch_id}.jsonl"))
            .mime_str("application/jsonl")
            .map_err(|e| local(format!("building the upload: {e}")))?;
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", file);
        let upload = self
            .downloads
            .post(format!("{}/files", self.base_url))
            .bearer_auth(&self.api_key)
            .multipart(form);
        let uploaded = control(upload, &OpenAiWire).await?;
        let file_id = str_at(&uploaded, "/id")
            .ok_or_else(|| local("the file upload's answer has no id".into()))?;
        let create = self
            .client
            .post(format!("{}/batches", self.base_url))
            .bearer_auth(&self.api_key)
            .json(&json!({
                "input_file_id": file_id,
                "endpoint": CHAT_URL,
                "completion_window": "24h",
                "metadata": {METADATA_KEY: batch_id},
            }));
        let batch = control(create, &OpenAiWire).await?;
        str_at(&batch, "/id")
            .map(str::to_string)
            .ok_or_else(|| local("the batch create's answer has no id".into()))
    }

    async fn status(&self, provider_batch_id: &str) -> Result<ProviderBatch, ProviderError> {
        let batch = self.get(&format!("/batches/{provider_batch_id}")).await?;
        let status = str_at(&batch, "/status").unwrap_or("unknown").to_string();
        let phase = openai_phase(&status);
        let error = (status == "failed")
            .then(|| errors_of(&batch).unwrap_or_else(|| "failed without errors".into()));
        Ok(ProviderBatch {
            provider_batch_id: provider_batch_id.to_string(),
            status,
            phase,
            error,
        })
    }

    async fn results(&self, provider_batch_id: &str) -> Result<Vec<BatchLine>, ProviderError> {
        let batch = self.get(&format!("/batches/{provider_batch_id}")).await?;
        let mut lines = Vec::new();
        for key in ["/output_file_id", "/error_file_id"] {
            if let Some(file_id) = str_at(&batch, key).filter(|s| !s.is_empty()) {
                self.download_into(file_id, &mut lines).await?;
            }
        }
        Ok(lines)
    }

    /// Walks the batch list (newest first) until batches older than `since_ms`.
    async fn find(&self, batch_id: &str, since_ms: u64) -> Result<Option<String>, ProviderError> {
        let mut after: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut path = format!("/batches?limit={LIST_PAGE}");
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let page = self.get(&path).await?;
            let data = page
                .get("data")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for b in data {
                let created_ms = b
                    .get("created_at")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX / 2_000)
                    .saturating_mul(1000);
                // created_at is in whole seconds: a batch of the same second may still be ours.
                if created_ms.saturating_add(999) < since_ms {
                    return Ok(None);
                }
                if str_at(b, &format!("/metadata/{METADATA_KEY}")) == Some(batch_id) {
                    return Ok(str_at(b, "/id").map(str::to_string));
                }
            }
            let more = page.get("has_more").and_then(Value::as_bool) == Some(true);
            after = match (more, data.last().and_then(|b| str_at(b, "/id"))) {
                (true, Some(last)) => Some(last.to_string()),
                _ => return Ok(None),
            };
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sightline_core::pricing::Usage;

    fn completion(model: &str, content: &str, usage: Option<Value>) -> Value {
        let mut body = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                "finish_reason": "stop"}],
        });
        if let Some(u) = usage {
            body["usage"] = u;
        }
        body
    }

    fn line(v: Value) -> Option<BatchLine> {
        parse_line(v.to_string().as_bytes())
    }

    #[test]
    fn a_200_line_is_an_answer_with_the_dated_model_and_its_usage() {
        let body = completion(
            "gpt-4.1-mini-2025-04-14",
            r#"{"description":"a cat"}"#,
            Some(json!({"prompt_tokens": 120, "completion_tokens": 30})),
        );
        let l = line(json!({"id": "batch_req_1", "custom_id": "abc",
            "response": {"status_code": 200, "request_id": "req_1", "body": body}, "error": null}))
        .unwrap();
        assert_eq!(l.custom_id, "abc");
        let LineOutcome::Answered(r) = l.outcome else {
            panic!("{:?}", l.outcome)
        };
        assert_eq!(r.model, "gpt-4.1-mini-2025-04-14");
        assert_eq!(
            r.usage,
            Some(Usage {
                input_tokens: 120,
                output_tokens: 30,
                cached_tokens: 0
            })
        );
        assert_eq!(r.analysis["description"], "a cat");
    }

    #[test]
    fn an_answer_without_usage_is_still_an_answer() {
        let body = completion("gpt-4o", r#"{"description":"x"}"#, None);
        let l = line(json!({"custom_id": "a", "response": {"status_code": 200, "body": body}}))
            .unwrap();
        let LineOutcome::Answered(r) = l.outcome else {
            panic!()
        };
        assert_eq!(r.usage, None);
    }

    #[test]
    fn invalid_output_is_a_billed_failure_with_its_usage() {
        let body = completion(
            "gpt-4o",
            "I cannot describe this.",
            Some(json!({"prompt_tokens": 50, "completion_tokens": 7})),
        );
        let l = line(json!({"custom_id": "a", "response": {"status_code": 200, "body": body}}))
            .unwrap();
        let LineOutcome::Failed(e) = l.outcome else {
            panic!()
        };
        assert_eq!(e.kind, FailureKind::InvalidOutput);
        assert!(e.billed);
        assert_eq!(e.usage.map(|u| u.input_tokens), Some(50));
    }

    #[test]
    fn error_statuses_are_http_failures_with_the_providers_message() {
        for status in [400u16, 429, 500] {
            let l = line(json!({"custom_id": "a", "response": {"status_code": status,
                "body": {"error": {"message": "nope", "type": "x", "code": null}}}, "error": null}))
            .unwrap();
            let LineOutcome::Failed(e) = l.outcome else {
                panic!()
            };
            assert_eq!(
                e.kind,
                FailureKind::Http {
                    status,
                    retry_after: None
                }
            );
            assert!(!e.billed);
            assert!(e.message.contains("nope"), "{}", e.message);
        }
    }

    #[test]
    fn expired_and_cancelled_lines_are_unprocessed() {
        for code in ["batch_expired", "batch_cancelled"] {
            let l = line(json!({"custom_id": "a", "response": null,
                "error": {"code": code, "message": "too late"}}))
            .unwrap();
            match l.outcome {
                LineOutcome::Unprocessed(why) => assert!(why.contains(code), "{why}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn unreadable_lines_are_skipped_not_fatal() {
        assert!(parse_line(b"{not json").is_none());
        assert!(parse_line(b"   ").is_none());
        assert!(line(json!({"response": {"status_code": 200}})).is_none());
        assert!(line(json!({"custom_id": "a", "response": {"body": {}}})).is_none());
    }

    #[test]
    fn failed_batches_name_their_error_codes() {
        let b = json!({"status": "failed", "errors": {"object": "list", "data": [
            {"code": "token_limit_exceeded", "message": "Enqueued token limit reached"}]}});
        let e = errors_of(&b).unwrap();
        assert!(e.starts_with("token_limit_exceeded: Enqueued"), "{e}");
        assert_eq!(errors_of(&json!({"errors": null})), None);
    }
}
