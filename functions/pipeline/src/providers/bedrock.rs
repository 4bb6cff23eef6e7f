//! Amazon Bedrock through `aws-sdk-bedrockruntime`: the Converse API for analysis
//! ([`BedrockProvider`], Claude and Nova models: the image goes as bytes, usage comes from the
//! answer) and the runtime client the Bedrock embedders share ([`BedrockRuntime`]).
//!
//! Credentials, region and endpoint come from the usual AWS chain (environment, profile, the
//! Lambda's role; `AWS_ENDPOINT_URL_BEDROCK_RUNTIME` points it elsewhere, e.g. at the
//! simulator), loaded on the first call, so building a provider never touches the network.
//! No key of ours, none in SSM.
//!
//! The SDK's own retries are off: a retry is the pipeline's decision (the same rate-limit,
//! retry and fallback rules as every provider), and a retry hidden in the SDK would hold a
//! worker and the limiter's slot through its backoff. Failures map onto the shared
//! classification ([`failure`]): `ThrottlingException`, `ServiceQuotaExceededException` and
//! `ModelNotReadyException` are 429s (with the Retry-After of the response, when it has one:
//! Bedrock does not document sending one), `ServiceUnavailableException` 503,
//! `InternalServerException` 500, `ModelTimeoutException` 408, timeouts and connection errors
//! transient; `ValidationException` (400), `AccessDeniedException` (403),
//! `ResourceNotFoundException` (404) and `ModelErrorException` (424) permanent. Bedrock sends
//! no rate-limit headers: the limiter works from the settings' RPM and TPM alone.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_bedrockruntime::config::http::HttpResponse;
use aws_sdk_bedrockruntime::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::operation::converse::ConverseOutput;
use aws_sdk_bedrockruntime::primitives::Blob;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ConversationRole, ConverseOutput as Reply, ImageBlock, ImageFormat, ImageSource,
    InferenceConfiguration, Message, StopReason, TokenUsage,
};
use aws_sdk_bedrockruntime::Client;
use sightline_core::pricing::Usage;
use sightline_core::retry::{parse_retry_after, FailureKind};
use tokio::sync::OnceCell;

use super::http::{bad_answer, err};
use super::validate_analysis;
use crate::ports::{ProviderError, RateInfo, VisionProvider, VisionRequest, VisionResponse};

/// The region used when the AWS chain names none (Bedrock's widest model catalogue).
pub const DEFAULT_REGION: &str = "us-east-1";

/// Where the client's configuration comes from.
#[derive(Clone)]
enum Source {
    /// The AWS chain, read on the first call.
    Chain,
    /// A configuration loaded by the caller (tests, a Lambda that loaded one already).
    Config(Box<SdkConfig>),
}

/// A Bedrock runtime client, built once on first use.
pub struct BedrockRuntime {
    source: Source,
    timeout: Duration,
    client: OnceCell<Client>,
}

impl std::fmt::Debug for BedrockRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            Source::Chain => "aws chain".to_string(),
            Source::Config(sdk) => format!(
                "sdk config (region {:?}, endpoint {:?})",
                sdk.region().map(|r| r.as_ref().to_string()),
                sdk.endpoint_url()
            ),
        };
        f.debug_struct("BedrockRuntime")
            .field("source", &source)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl BedrockRuntime {
    /// Credentials, region and endpoint from the AWS chain, loaded on the first call.
    /// `timeout` bounds one call (connect included).
    pub fn from_env(timeout: Duration) -> BedrockRuntime {
        BedrockRuntime {
            source: Source::Chain,
            timeout,
            client: OnceCell::new(),
        }
    }

    /// From a configuration the caller loaded (its region, credentials and endpoint).
    pub fn from_sdk_config(sdk: &SdkConfig, timeout: Duration) -> BedrockRuntime {
        BedrockRuntime {
            source: Source::Config(Box::new(sdk.clone())),
            timeout,
            client: OnceCell::new(),
        }
    }

    pub(crate) async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                match &self.source {
                    Source::Config(sdk) => client_for(sdk, self.timeout),
                    Source::Chain => {
                        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
                        client_for(&sdk, self.timeout)
                    }
                }
            })
            .await
    }
}

/// The client for `sdk`: no SDK retries (see the module docs), `timeout` per call.
fn client_for(sdk: &SdkConfig, timeout: Duration) -> Client {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .operation_attempt_timeout(timeout)
        .operation_timeout(timeout)
        .build();
    let mut config = aws_sdk_bedrockruntime::config::Builder::from(sdk)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(timeouts);
    if sdk.region().is_none() {
        tracing::warn!(
            region = DEFAULT_REGION,
            "no AWS region configured (AWS_REGION, a profile); calling Bedrock in the default"
        );
        config = config.region(Region::new(DEFAULT_REGION));
    }
    Client::from_conf(config.build())
}

/// The HTTP status a Bedrock error code stands for (AWS's documented ones), so the class
/// does not hang on what a proxy or gateway in between answered; `status` for other codes.
pub(crate) fn status_of(code: Option<&str>, status: u16) -> u16 {
    match code {
        Some("ThrottlingException")
        | Some("ServiceQuotaExceededException")
        | Some("ModelNotReadyException") => 429,
        Some("ServiceUnavailableException") => 503,
        Some("InternalServerException") => 500,
        Some("ModelTimeoutException") => 408,
        Some("ValidationException") => 400,
        Some("AccessDeniedException") => 403,
        Some("ResourceNotFoundException") => 404,
        Some("ModelErrorException") => 424,
        _ => status,
    }
}

/// A failed Bedrock call as the pipeline classifies failures (see the module docs).
pub(crate) fn failure<E>(e: SdkError<E, HttpResponse>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let rate = RateInfo::default();
    let why = DisplayErrorContext(&e).to_string();
    match &e {
        // A 200 the SDK could not read (it reports some as an unhandled service error, some as
        // a response error) was answered, so it is billed.
        SdkError::ServiceError(se) if se.raw().status().is_success() => {
            bad_answer(format!("bedrock's answer is unreadable: {why}"), rate, None)
        }
        SdkError::ResponseError(r) if r.raw().status().is_success() => {
            bad_answer(format!("bedrock's answer is unreadable: {why}"), rate, None)
        }
        SdkError::ServiceError(se) => {
            let raw = se.raw();
            let code = se.err().code();
            let status = status_of(code, raw.status().as_u16());
            let retry_after = raw.headers().get("retry-after").and_then(parse_retry_after);
            let detail = se.err().message().unwrap_or("no message");
            err(
                FailureKind::Http {
                    status,
                    retry_after,
                },
                format!(
                    "bedrock returned HTTP {status} {}: {detail}",
                    code.unwrap_or("(no error code)")
                ),
                rate,
            )
        }
        SdkError::TimeoutError(_) => err(
            FailureKind::Timeout,
            format!("bedrock timed out: {why}"),
            rate,
        ),
        SdkError::DispatchFailure(d) if d.is_timeout() => err(
            FailureKind::Timeout,
            format!("bedrock timed out: {why}"),
            rate,
        ),
        // Connection errors, and credentials the chain could not load (they surface here too):
        // transient, the message says which.
        SdkError::DispatchFailure(_) => err(
            FailureKind::Connection,
            format!("bedrock unreachable: {why}"),
            rate,
        ),
        SdkError::ResponseError(r) => {
            let status = r.raw().status().as_u16();
            let retry_after = r
                .raw()
                .headers()
                .get("retry-after")
                .and_then(parse_retry_after);
            err(
                FailureKind::Http {
                    status,
                    retry_after,
                },
                format!("bedrock returned HTTP {status}: {why}"),
                rate,
            )
        }
        // The request could not be built: nothing was sent, and it would not build next time
        // either; a 400 is the permanent class it belongs to.
        SdkError::ConstructionFailure(_) => request_error(why),
        _ => err(
            FailureKind::Connection,
            format!("bedrock call failed: {why}"),
            rate,
        ),
    }
}

/// A request we could not build (never sent): permanent, as a 400 would be.
pub(crate) fn request_error(why: String) -> ProviderError {
    err(
        FailureKind::Http {
            status: 400,
            retry_after: None,
        },
        format!("bedrock request could not be built: {why}"),
        RateInfo::default(),
    )
}

/// Converse's usage in ours: `inputTokens` leaves cache reads and writes out, ours counts them
/// in (sightline asks for no caching; a write is booked at the input price).
fn usage_of(u: &TokenUsage) -> Usage {
    let count = |n: i32| u64::try_from(n).unwrap_or(0);
    let read = u.cache_read_input_tokens().map(count).unwrap_or(0);
    let written = u.cache_write_input_tokens().map(count).unwrap_or(0);
    Usage {
        input_tokens: count(u.input_tokens()) + read + written,
        output_tokens: count(u.output_tokens()),
        cached_tokens: read,
    }
}

/// The answer's text: every text block of the message, in order.
fn text_of(out: &ConverseOutput) -> Option<String> {
    let Some(Reply::Message(message)) = out.output() else {
        return None;
    };
    let texts: Vec<&str> = message
        .content()
        .iter()
        .filter_map(|b| b.as_text().ok())
        .map(String::as_str)
        .collect();
    (!texts.is_empty()).then(|| texts.concat())
}

/// A Converse answer as a validated analysis, or the billed invalid output it is.
// The error VisionProvider::analyze returns, unboxed like it.
#[allow(clippy::result_large_err)]
fn answer(out: &ConverseOutput, model: &str) -> Result<VisionResponse, ProviderError> {
    let rate = RateInfo::default();
    let usage = out.usage().map(usage_of);
    let text = text_of(out)
        .ok_or_else(|| bad_answer("bedrock's answer has no text content".into(), rate, usage))?;
    let analysis = validate_analysis(&text).map_err(|e| {
        let why = if out.stop_reason() == &StopReason::MaxTokens {
            format!("{e} (the answer was cut at maxTokens)")
        } else {
            e.to_string()
        };
        bad_answer(why, rate, usage)
    })?;
    Ok(VisionResponse {
        analysis,
        usage,
        // Converse does not name the model that answered: it is the one asked for.
        model: model.to_string(),
        rate,
    })
}

/// Claude and Nova models through Converse.
#[derive(Debug)]
pub struct BedrockProvider {
    runtime: BedrockRuntime,
}

impl BedrockProvider {
    /// Through the AWS chain (see [`BedrockRuntime::from_env`]).
    pub fn from_env(timeout: Duration) -> BedrockProvider {
        BedrockProvider {
            runtime: BedrockRuntime::from_env(timeout),
        }
    }

    /// Through a configuration the caller loaded.
    pub fn from_sdk_config(sdk: &SdkConfig, timeout: Duration) -> BedrockProvider {
        BedrockProvider {
            runtime: BedrockRuntime::from_sdk_config(sdk, timeout),
        }
    }

    /// The user message: the image as bytes, then the prompt. Converse has no `detail`.
    // The error VisionProvider::analyze returns, unboxed like it.
    #[allow(clippy::result_large_err)]
    fn message(req: &VisionRequest) -> Result<Message, ProviderError> {
        let image = ImageBlock::builder()
            .format(ImageFormat::Jpeg)
            .source(ImageSource::Bytes(Blob::new(req.jpeg.as_slice())))
            .build()
            .map_err(|e| request_error(e.to_string()))?;
        Message::builder()
            .role(ConversationRole::User)
            .content(ContentBlock::Image(image))
            .content(ContentBlock::Text(req.prompt.clone()))
            .build()
            .map_err(|e| request_error(e.to_string()))
    }
}

#[async_trait]
impl VisionProvider for BedrockProvider {
    fn name(&self) -> &str {
        "bedrock"
    }

    fn is_paid(&self) -> bool {
        true
    }

    async fn analyze(&self, req: &VisionRequest) -> Result<VisionResponse, ProviderError> {
        let message = Self::message(req)?;
        let config = InferenceConfiguration::builder()
            .max_tokens(i32::try_from(req.max_output_tokens).unwrap_or(i32::MAX))
            .temperature(0.0)
            .build();
        let out = self
            .runtime
            .client()
            .await
            .converse()
            .model_id(&req.model)
            .messages(message)
            .inference_config(config)
            .send()
            .await
            .map_err(failure)?;
        answer(&out, &req.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_bedrockruntime::operation::converse::ConverseError;
    use aws_sdk_bedrockruntime::types::error::{ThrottlingException, ValidationException};
    use aws_smithy_runtime_api::http::StatusCode;
    use sightline_core::retry::{classify, RetryClass};

    fn response(status: u16, headers: &[(&str, &str)]) -> HttpResponse {
        let mut r = HttpResponse::new(
            StatusCode::try_from(status).unwrap(),
            aws_smithy_types::body::SdkBody::empty(),
        );
        for (k, v) in headers {
            r.headers_mut().insert(k.to_string(), v.to_string());
        }
        r
    }

    fn throttled(headers: &[(&str, &str)]) -> SdkError<ConverseError, HttpResponse> {
        let meta = aws_sdk_bedrockruntime::error::ErrorMetadata::builder()
            .code("ThrottlingException")
            .message("Too many requests, please wait before trying again.")
            .build();
        let e = ThrottlingException::builder()
            .message("Too many requests, please wait before trying again.")
            .meta(meta)
            .build();
        SdkError::service_error(
            ConverseError::ThrottlingException(e),
            response(429, headers),
        )
    }

    #[test]
    fn error_codes_map_to_their_documented_status_and_class() {
        for (code, status, class) in [
            ("ThrottlingException", 429, RetryClass::Transient),
            ("ServiceQuotaExceededException", 429, RetryClass::Transient),
            ("ModelNotReadyException", 429, RetryClass::Transient),
            ("ServiceUnavailableException", 503, RetryClass::Transient),
            ("InternalServerException", 500, RetryClass::Transient),
            ("ModelTimeoutException", 408, RetryClass::Transient),
            ("ValidationException", 400, RetryClass::Permanent),
            ("AccessDeniedException", 403, RetryClass::Permanent),
            ("ResourceNotFoundException", 404, RetryClass::Permanent),
            ("ModelErrorException", 424, RetryClass::Permanent),
        ] {
            // Whatever a proxy in between answered, the code decides.
            let s = status_of(Some(code), 502);
            assert_eq!(s, status, "{code}");
            let kind = FailureKind::Http {
                status: s,
                retry_after: None,
            };
            assert_eq!(classify(&kind), class, "{code}");
        }
        assert_eq!(status_of(None, 502), 502);
        assert_eq!(status_of(Some("SomethingNew"), 418), 418);
    }

    #[test]
    fn throttling_keeps_its_retry_after_and_names_the_code() {
        let e = failure(throttled(&[("retry-after", "3")]));
        assert_eq!(
            e.kind,
            FailureKind::Http {
                status: 429,
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert!(e.message.contains("ThrottlingException"), "{}", e.message);
        assert!(!e.billed);
        // Without a header, backoff decides.
        let e = failure(throttled(&[]));
        assert_eq!(
            e.kind,
            FailureKind::Http {
                status: 429,
                retry_after: None
            }
        );
    }

    #[test]
    fn validation_errors_are_permanent() {
        let meta = aws_sdk_bedrockruntime::error::ErrorMetadata::builder()
            .code("ValidationException")
            .message("The provided model identifier is invalid.")
            .build();
        let v = ValidationException::builder().meta(meta).build();
        let e = failure(SdkError::service_error(
            ConverseError::ValidationException(v),
            response(400, &[]),
        ));
        assert_eq!(classify(&e.kind), RetryClass::Permanent);
        assert!(e.message.contains("model identifier"), "{}", e.message);
    }

    #[test]
    fn unreadable_answers_are_billed_and_transport_failures_are_not() {
        let cut: SdkError<ConverseError, HttpResponse> =
            SdkError::response_error("unexpected EOF", response(200, &[]));
        let e = failure(cut);
        assert!(e.billed);
        assert_eq!(e.kind, FailureKind::InvalidOutput);
        // The SDK reports some unreadable 200s as an unhandled service error: billed too.
        let meta = aws_sdk_bedrockruntime::error::ErrorMetadata::builder().build();
        let e = failure(SdkError::service_error(
            ConverseError::generic(meta),
            response(200, &[]),
        ));
        assert!(e.billed);
        assert_eq!(e.kind, FailureKind::InvalidOutput);
        let bad_gateway: SdkError<ConverseError, HttpResponse> =
            SdkError::response_error("not json", response(502, &[]));
        let e = failure(bad_gateway);
        assert!(!e.billed);
        assert_eq!(classify(&e.kind), RetryClass::Transient);
        let timeout: SdkError<ConverseError, HttpResponse> = SdkError::timeout_error("slow");
        assert_eq!(failure(timeout).kind, FailureKind::Timeout);
        let built: SdkError<ConverseError, HttpResponse> =
            SdkError::construction_failure("missing field");
        assert_eq!(classify(&failure(built).kind), RetryClass::Permanent);
    }

    fn converse_output(text: &str, stop: StopReason, usage: Option<TokenUsage>) -> ConverseOutput {
        let message = Message::builder()
            .role(ConversationRole::Assistant)
            .content(ContentBlock::Text(text.into()))
            .build()
            .unwrap();
        let mut b = ConverseOutput::builder()
            .output(Reply::Message(message))
            .stop_reason(stop);
        if let Some(u) = usage {
            b = b.usage(u);
        }
        b.build().unwrap()
    }

    #[test]
    fn answers_read_usage_and_validate_the_analysis() {
        let usage = TokenUsage::builder()
            .input_tokens(1500)
            .output_tokens(80)
            .total_tokens(1580)
            .cache_read_input_tokens(100)
            .build()
            .unwrap();
        let out = converse_output(
            "```json\n{\"description\":\"a red square\",\"tags\":[\"red\"]}\n```",
            StopReason::EndTurn,
            Some(usage),
        );
        let r = answer(&out, "amazon.nova-lite-v1:0").unwrap();
        assert_eq!(r.analysis["tags"][0], "red");
        assert_eq!(r.model, "amazon.nova-lite-v1:0");
        assert_eq!(
            r.usage,
            Some(Usage {
                input_tokens: 1600,
                output_tokens: 80,
                cached_tokens: 100
            })
        );
        // A cut answer is billed invalid output that says it was cut; usage stays known.
        let out = converse_output("{\"description\":\"a re", StopReason::MaxTokens, None);
        let e = answer(&out, "m").unwrap_err();
        assert!(e.billed && e.message.contains("maxTokens"), "{}", e.message);
        assert_eq!(e.usage, None);
    }

    #[test]
    fn the_message_carries_the_image_bytes_then_the_prompt() {
        let req = VisionRequest {
            model: "amazon.nova-lite-v1:0".into(),
            jpeg: std::sync::Arc::new(vec![1, 2, 3]),
            width: 1,
            height: 1,
            prompt: "describe".into(),
            max_output_tokens: 400,
            detail: sightline_core::model::Detail::Low,
            check: None,
        };
        let m = BedrockProvider::message(&req).unwrap();
        let image = m.content()[0].as_image().unwrap();
        assert_eq!(image.format(), &ImageFormat::Jpeg);
        match image.source() {
            Some(ImageSource::Bytes(b)) => assert_eq!(b.as_ref(), &[1, 2, 3]),
            other => panic!("{other:?}"),
        }
        assert_eq!(m.content()[1].as_text().unwrap(), "describe");
    }
}
