//! OpenAI-compatible Images API: `POST {base}/images/generations` (gpt-image-1,
//! gpt-image-1-mini and successors).
//!
//! Request: `{model, prompt, n: 1, size, quality, output_format}`. The GPT image models always
//! answer base64 (`data[0].b64_json`) and take no `response_format` or seed. Usage, as OpenAI
//! documents it for these models: `{input_tokens, output_tokens, total_tokens,
//! input_tokens_details: {text_tokens, image_tokens}}`; output tokens are image tokens. A
//! prompt the safety system refuses is a 400 (`moderation_blocked`): permanent, not billed.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use sightline_core::pricing::Usage;

use super::gen_common::{generated, MAX_IMAGE_B64_BYTES};
use super::http::{bad_answer, client, exchange_capped, Reply};
use super::openai::OpenAiWire;
use crate::ports::{GeneratedImage, GenerationCall, ImageGenerator, ProviderError, RateInfo};

/// The answer carries the base64 image plus a little JSON around it.
const MAX_ANSWER_BYTES: usize = MAX_IMAGE_B64_BYTES + 64 * 1024;

#[derive(Clone)]
pub struct OpenAiGenerator {
    client: reqwest::Client,
    base_url: String,
    api_key: String,
}

impl std::fmt::Debug for OpenAiGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("OpenAiGenerator")
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl OpenAiGenerator {
    /// `timeout` covers the whole call: high-quality images take a minute or more.
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> anyhow::Result<Self> {
        Ok(OpenAiGenerator {
            client: client(timeout)?,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
        })
    }

    pub fn body(req: &GenerationCall) -> Value {
        json!({
            "model": req.model,
            "prompt": req.prompt,
            "n": 1,
            "size": req.size.to_string(),
            "quality": req.quality.as_str(),
            "output_format": req.output_format.as_str(),
        })
    }
}

/// The usage of an Images API answer (input tokens are the prompt's text tokens for a
/// generation; output tokens the image's).
pub fn usage_of(body: &Value) -> Option<Usage> {
    let u = body.get("usage")?;
    Some(Usage {
        input_tokens: u.get("input_tokens")?.as_u64()?,
        output_tokens: u.get("output_tokens").and_then(Value::as_u64).unwrap_or(0),
        cached_tokens: u
            .pointer("/input_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// An Images API answer as a checked image, or the billed invalid output it is.
// The error every provider call returns, unboxed like it.
#[allow(clippy::result_large_err)]
pub fn answer(
    body: &Value,
    req: &GenerationCall,
    rate: RateInfo,
) -> Result<GeneratedImage, ProviderError> {
    let usage = usage_of(body);
    let b64 = body
        .pointer("/data/0/b64_json")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_answer("the answer has no data[0].b64_json".into(), rate, usage))?;
    generated(b64, req.output_format, usage, req.model.clone(), rate)
}

#[async_trait]
impl ImageGenerator for OpenAiGenerator {
    fn name(&self) -> &str {
        "openai"
    }

    fn is_paid(&self) -> bool {
        true
    }

    async fn generate(&self, req: &GenerationCall) -> Result<GeneratedImage, ProviderError> {
        let url = format!("{}/images/generations", self.base_url);
        let request = self
            .client
            .post(&url)
            .bearer_auth(&self.api_key)
            .json(&Self::body(req));
        let Reply { body, rate } = exchange_capped(request, &OpenAiWire, MAX_ANSWER_BYTES).await?;
        answer(&body, req, rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::gen_common::encode;
    use base64::Engine;
    use sightline_core::generate::{OutputFormat, Quality, Size};
    use sightline_core::retry::FailureKind;

    fn call(format: OutputFormat) -> GenerationCall {
        GenerationCall {
            model: "gpt-image-1".into(),
            prompt: "a lighthouse".into(),
            size: Size::Pixels {
                width: 1024,
                height: 1536,
            },
            quality: Quality::Low,
            output_format: format,
            seed: Some(7),
        }
    }

    #[test]
    fn the_body_asks_for_one_image_of_the_size_quality_and_format() {
        let b = OpenAiGenerator::body(&call(OutputFormat::Jpeg));
        assert_eq!(b["size"], "1024x1536");
        assert_eq!(b["quality"], "low");
        assert_eq!(b["output_format"], "jpeg");
        assert_eq!(b["n"], 1);
        assert!(b.get("seed").is_none() && b.get("response_format").is_none());
    }

    #[test]
    fn answers_are_checked_and_read_their_usage() {
        let rgb = image::RgbImage::from_pixel(16, 24, image::Rgb([1, 2, 3]));
        let png = encode(&rgb, OutputFormat::Png).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let body = json!({
            "created": 1,
            "data": [{"b64_json": b64}],
            "usage": {"input_tokens": 9, "output_tokens": 408, "total_tokens": 417,
                      "input_tokens_details": {"text_tokens": 9, "image_tokens": 0}}
        });
        let img = answer(&body, &call(OutputFormat::Png), RateInfo::default()).unwrap();
        assert_eq!((img.width, img.height), (16, 24));
        assert_eq!(img.bytes, png);
        assert_eq!(img.content_type, "image/png");
        let usage = img.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (9, 408));

        // The wrong format, or no image: billed invalid output, usage kept.
        let e = answer(&body, &call(OutputFormat::Jpeg), RateInfo::default()).unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidOutput);
        assert!(e.billed && e.usage == Some(usage));
        let e = answer(
            &json!({"data": [], "usage": body["usage"]}),
            &call(OutputFormat::Png),
            RateInfo::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidOutput);
        assert!(e.billed && e.usage == Some(usage));
    }
}
