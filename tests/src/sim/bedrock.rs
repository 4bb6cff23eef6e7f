//! Amazon Bedrock runtime's wire format: `POST /model/{modelId}/converse` (analysis, on the
//! shared flow of [`super::handle`] as [`Api::Bedrock`]) and the pieces `POST
//! /model/{modelId}/invoke` (embeddings, [`super::embed`]; image models, [`super::images`])
//! shares with it.
//!
//! - **Auth**: a SigV4 `Authorization` header (`AWS4-HMAC-SHA256 Credential=<access key
//!   id>/…`) or a Bedrock API key (`Authorization: Bearer …`); the signature is not checked.
//!   The access key id (or token) is the key whose rate-limit windows the call counts in;
//!   [`super::SimConfig::api_key`] does not apply. A call without either is a 403
//!   `UnrecognizedClientException`.
//! - **Converse**: `{messages: [{role, content: [{text} | {image: {format, source: {bytes:
//!   <base64>}}}]}], system?: [{text}], inferenceConfig?: {maxTokens, temperature}}`; the model
//!   comes from the path and must be a `bedrock` model of the price table (else 400
//!   `ValidationException`, as Bedrock answers an unknown model id). Input tokens: the system
//!   text + Σ per message ([`super::MESSAGE_OVERHEAD_TOKENS`] + text + image tokens by the
//!   model's rule). The answer: `{output: {message: {role: "assistant", content: [{text}]}},
//!   stopReason: "end_turn" | "max_tokens", usage: {inputTokens, outputTokens, totalTokens},
//!   metrics: {latencyMs}}`, the text being the analysis JSON of the other routes.
//! - **Errors**: the status, `x-amzn-ErrorType: <code>` and `{"message": …}`, as Bedrock's
//!   REST-JSON protocol has them. 400 `ValidationException`, 403 `AccessDeniedException`, 404
//!   `ResourceNotFoundException`, 408 `ModelTimeoutException` (the injected 504), 429
//!   `ThrottlingException`, 500 `InternalServerException`, 503 `ServiceUnavailableException`;
//!   an injected 502 is a gateway's HTML page with no error type.
//! - **Rate limits**: the shared RPM/TPM windows; Bedrock sends no rate-limit headers. A 429
//!   carries `retry-after` in whole seconds: Bedrock documents none, the simulator sends one so
//!   a client's reading of it is tested (clients must also cope without: backoff).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use sightline_core::model::Detail;
use sightline_core::pricing::{text_tokens, PriceTable};
use std::sync::Arc;

use super::{
    detached, server_error_response, tokenize, Api, ApiError, Fault, Parsed, RawImage, Shared,
    MESSAGE_OVERHEAD_TOKENS,
};

/// Bedrock's words for a throttled call.
pub(super) const THROTTLED: &str = "Too many requests, please wait before trying again.";

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/model/{model_id}/converse",
            post(
                |state, Path(model): Path<String>, headers, body| async move {
                    detached(super::handle(
                        Api::Bedrock,
                        Some(model),
                        state,
                        headers,
                        body,
                    ))
                    .await
                },
            ),
        )
        .route(
            "/model/{model_id}/invoke",
            post(
                |state: State<Arc<Shared>>,
                 Path(model): Path<String>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    // One InvokeModel path serves embedding and image models alike.
                    if super::images::is_image_model(&model) {
                        detached(super::images::handle(
                            Api::Bedrock,
                            Some(model),
                            state,
                            headers,
                            body,
                        ))
                        .await
                    } else {
                        detached(super::embed::handle(
                            Api::Bedrock,
                            Some(model),
                            state,
                            headers,
                            body,
                        ))
                        .await
                    }
                },
            ),
        )
}

/// The access key id of a SigV4 `Authorization` header, or a Bedrock API key.
pub(super) fn authenticate(headers: &HeaderMap) -> Result<String, ApiError> {
    let raw = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim();
    let key = if let Some(rest) = raw.strip_prefix("AWS4-HMAC-SHA256") {
        rest.split("Credential=")
            .nth(1)
            .and_then(|c| c.split('/').next())
            .map(str::trim)
            .unwrap_or("")
    } else {
        raw.strip_prefix("Bearer ").map(str::trim).unwrap_or("")
    };
    if key.is_empty() {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: "The security token included in the request is invalid.".into(),
            kind: "UnrecognizedClientException",
            code: None,
            param: None,
        });
    }
    Ok(key.to_string())
}

/// A validation error in Bedrock's words.
pub(super) fn validation(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
        kind: "ValidationException",
        code: None,
        param: None,
    }
}

/// The error code Bedrock sends for an error: its own when the simulator gave one, else the
/// code of the status.
fn error_type(e: &ApiError) -> &'static str {
    if e.kind.ends_with("Exception") {
        return e.kind;
    }
    match e.status.as_u16() {
        401 | 403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        408 => "ModelTimeoutException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        500..=599 => "InternalServerException",
        _ => "ValidationException",
    }
}

/// An error response: status, `x-amzn-ErrorType` and `{"message"}`.
pub(super) fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let mut resp = (status, axum::Json(json!({ "message": message }))).into_response();
    if let Ok(v) = HeaderValue::from_str(code) {
        resp.headers_mut().insert("x-amzn-errortype", v);
    }
    resp
}

pub(super) fn render(e: ApiError) -> Response {
    let code = error_type(&e);
    error_response(e.status, code, &e.message)
}

/// An injected server fault.
pub(super) fn server_error(f: Fault) -> Response {
    match f {
        // Bedrock's front door answers a bad gateway with no error type.
        Fault::Http502 => server_error_response(f),
        Fault::Http503 => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            "The service is temporarily unable to handle the request. Try again later.",
        ),
        Fault::Http504 => error_response(
            StatusCode::REQUEST_TIMEOUT,
            "ModelTimeoutException",
            "The request took too long to process. Processing time exceeded the model timeout length.",
        ),
        _ => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            "The server encountered an error processing the request. Try your request again.",
        ),
    }
}

/// A Converse answer.
pub(super) fn converse_body(
    content: &str,
    cut: bool,
    input_tokens: u64,
    output_tokens: u64,
) -> Value {
    json!({
        "output": {"message": {"role": "assistant", "content": [{"text": content}]}},
        "stopReason": if cut { "max_tokens" } else { "end_turn" },
        "usage": {
            "inputTokens": input_tokens,
            "outputTokens": output_tokens,
            "totalTokens": input_tokens + output_tokens,
        },
        "metrics": {"latencyMs": 0},
    })
}

/// The bytes of a Bedrock `source: {bytes: <base64>}` (`at` names it in errors).
pub(super) fn source_bytes(source: Option<&Value>, at: &str) -> Result<Vec<u8>, ApiError> {
    let data = source
        .and_then(|s| s.get("bytes"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            validation(format!(
                "{at}.source.bytes is required (the simulator takes no s3Location)"
            ))
        })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| validation(format!("{at}.source.bytes is not base64: {e}")))?;
    if bytes.is_empty() {
        return Err(validation(format!("{at}.source.bytes is empty")));
    }
    Ok(bytes)
}

/// Validate a Converse body and tokenize it (see the module docs).
pub(super) async fn parse_converse(body: &[u8], model: Option<&str>) -> Result<Parsed, ApiError> {
    let model = model.unwrap_or_default().to_string();
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| validation(format!("The request body is not valid JSON: {e}")))?;
    let price = PriceTable::builtin()
        .model(&model)
        .ok()
        .filter(|p| p.provider == "bedrock")
        .ok_or_else(|| validation("The provided model identifier is invalid."))?;
    let messages = value
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| validation("messages: at least one message is required"))?;
    let max_tokens = match value.pointer("/inferenceConfig/maxTokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n),
            _ => return Err(validation("inferenceConfig.maxTokens must be at least 1")),
        },
    };
    if let Some(t) = value.pointer("/inferenceConfig/temperature") {
        match t.as_f64() {
            Some(t) if (0.0..=1.0).contains(&t) => {}
            _ => return Err(validation("inferenceConfig.temperature must be in [0, 1]")),
        }
    }
    let mut text_tok = 0;
    if let Some(system) = value.get("system") {
        let blocks = system
            .as_array()
            .ok_or_else(|| validation("system must be a list of {text} blocks"))?;
        for b in blocks {
            let t = b
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| validation("system blocks must be {text}"))?;
            text_tok += text_tokens(t);
        }
    }
    let mut raw_images = Vec::new();
    let mut all_text = String::new();
    for (i, msg) in messages.iter().enumerate() {
        let role = msg.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "user" | "assistant") {
            return Err(validation(format!(
                "messages.{i}.role must be user or assistant"
            )));
        }
        let content = msg
            .get("content")
            .and_then(Value::as_array)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| validation(format!("messages.{i}.content must be a non-empty list")))?;
        text_tok += MESSAGE_OVERHEAD_TOKENS;
        for (j, block) in content.iter().enumerate() {
            if let Some(t) = block.get("text") {
                let t = t.as_str().ok_or_else(|| {
                    validation(format!("messages.{i}.content.{j}.text must be a string"))
                })?;
                text_tok += text_tokens(t);
                all_text.push_str(t);
            } else if let Some(image) = block.get("image") {
                if role != "user" {
                    return Err(validation(format!(
                        "messages.{i}.content.{j}: images are only allowed in user messages"
                    )));
                }
                let format = image.get("format").and_then(Value::as_str).unwrap_or("");
                if !matches!(format, "jpeg" | "png" | "gif" | "webp") {
                    return Err(validation(format!(
                        "messages.{i}.content.{j}.image.format {format:?} is not one of jpeg, png, gif, webp"
                    )));
                }
                let bytes = source_bytes(
                    image.get("source"),
                    &format!("messages.{i}.content.{j}.image"),
                )?;
                // Converse has no detail parameter; the Claude and Nova rules ignore it.
                raw_images.push(RawImage {
                    bytes,
                    detail: Detail::High,
                });
            } else {
                return Err(validation(format!(
                    "messages.{i}.content.{j}: the simulator takes text and image blocks"
                )));
            }
        }
    }
    let check = sightline_core::genjob::request_of_check_prompt(&all_text).map(str::to_string);
    tokenize(model, price, text_tok, max_tokens, raw_images, check)
        .await
        // An image that does not decode is Bedrock's ValidationException.
        .map_err(|e| {
            if e.status == StatusCode::BAD_REQUEST {
                validation(e.message)
            } else {
                e
            }
        })
}
