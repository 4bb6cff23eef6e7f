//! Bedrock image models through `InvokeModel`: Amazon Nova Canvas (`amazon.nova-canvas-v1:0`)
//! and Titan Image Generator v2 (`amazon.titan-image-generator-v2:0`), which share the
//! `TEXT_IMAGE` request shape:
//!
//! `{taskType: "TEXT_IMAGE", textToImageParams: {text}, imageGenerationConfig: {numberOfImages:
//! 1, width, height, quality: "standard" | "premium", cfgScale, seed}}` → `{images: [<base64
//! PNG>], error?}`.
//!
//! Both answer PNG whatever is asked, so a JPEG or WebP request is re-encoded here. Quality
//! `high` (and `auto`, which Bedrock does not have) asks for `premium`, the others `standard`,
//! as the price table prices them. Bedrock bills per image and reports no usage. Failures are
//! classified as the Converse provider's are ([`super::bedrock::failure`]).

use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_bedrockruntime::primitives::Blob;
use serde_json::{json, Value};
use sightline_core::generate::{OutputFormat, Quality, Size};

use super::bedrock::{failure, request_error, BedrockRuntime};
use super::gen_common::{content_type, encode, generated, AUTO_SIDE};
use super::http::bad_answer;
use crate::ports::{GeneratedImage, GenerationCall, ImageGenerator, ProviderError, RateInfo};

/// The largest seed each model takes (Nova Canvas 858,993,459; Titan 2,147,483,646): ours is
/// folded into it, so the same seed always asks for the same picture.
fn max_seed(model: &str) -> u64 {
    if model.starts_with("amazon.nova") {
        858_993_459
    } else {
        2_147_483_646
    }
}

/// Whether `model` speaks the `TEXT_IMAGE` shape handled here.
pub fn supports(model: &str) -> bool {
    model.starts_with("amazon.nova-canvas") || model.starts_with("amazon.titan-image-generator")
}

/// The request body of one call.
pub fn body(req: &GenerationCall) -> Value {
    let (width, height) = match req.size {
        Size::Auto => (AUTO_SIDE, AUTO_SIDE),
        Size::Pixels { width, height } => (width, height),
    };
    let quality = match req.quality {
        Quality::High | Quality::Auto => "premium",
        Quality::Low | Quality::Medium => "standard",
    };
    let mut config = json!({
        "numberOfImages": 1,
        "width": width,
        "height": height,
        "quality": quality,
        // The models' documented default guidance.
        "cfgScale": 6.5,
    });
    if let Some(seed) = req.seed {
        config["seed"] = json!(seed % (max_seed(&req.model) + 1));
    }
    json!({
        "taskType": "TEXT_IMAGE",
        "textToImageParams": {"text": req.prompt},
        "imageGenerationConfig": config,
    })
}

/// An `InvokeModel` answer as a checked image in the asked format, or the billed invalid output
/// it is.
// The error every provider call returns, unboxed like it.
#[allow(clippy::result_large_err)]
pub fn answer(body: &Value, req: &GenerationCall) -> Result<GeneratedImage, ProviderError> {
    let rate = RateInfo::default();
    let Some(b64) = body.pointer("/images/0").and_then(Value::as_str) else {
        let why = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no images[0]");
        return Err(bad_answer(
            format!("bedrock's image answer is unusable: {why}"),
            rate,
            None,
        ));
    };
    let png = generated(b64, OutputFormat::Png, None, req.model.clone(), rate)?;
    if req.output_format == OutputFormat::Png {
        return Ok(png);
    }
    let rgb = image::load_from_memory(&png.bytes)
        .map_err(|e| bad_answer(format!("re-reading bedrock's PNG: {e}"), rate, None))?
        .to_rgb8();
    let bytes = encode(&rgb, req.output_format).map_err(|e| {
        bad_answer(
            format!("re-encoding bedrock's PNG as {}: {e}", req.output_format),
            rate,
            None,
        )
    })?;
    Ok(GeneratedImage {
        bytes,
        content_type: content_type(req.output_format).to_string(),
        ..png
    })
}

/// Nova Canvas or Titan Image Generator v2 on Bedrock.
#[derive(Debug)]
pub struct BedrockGenerator {
    runtime: BedrockRuntime,
}

impl BedrockGenerator {
    pub fn new(runtime: BedrockRuntime) -> BedrockGenerator {
        BedrockGenerator { runtime }
    }

    /// Through the AWS chain, loaded on the first call.
    pub fn from_env(timeout: Duration) -> BedrockGenerator {
        Self::new(BedrockRuntime::from_env(timeout))
    }

    /// Through a configuration the caller loaded.
    pub fn from_sdk_config(sdk: &SdkConfig, timeout: Duration) -> BedrockGenerator {
        Self::new(BedrockRuntime::from_sdk_config(sdk, timeout))
    }
}

#[async_trait]
impl ImageGenerator for BedrockGenerator {
    fn name(&self) -> &str {
        "bedrock"
    }

    fn is_paid(&self) -> bool {
        true
    }

    async fn generate(&self, req: &GenerationCall) -> Result<GeneratedImage, ProviderError> {
        if !supports(&req.model) {
            return Err(request_error(format!(
                "{} is not a Nova Canvas or Titan Image Generator model",
                req.model
            )));
        }
        let payload = serde_json::to_vec(&body(req)).map_err(|e| request_error(e.to_string()))?;
        let out = self
            .runtime
            .client()
            .await
            .invoke_model()
            .model_id(&req.model)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(payload))
            .send()
            .await
            .map_err(failure)?;
        // A 200 was answered and is billed, whatever its body holds.
        let answer_body: Value = serde_json::from_slice(out.body().as_ref()).map_err(|e| {
            bad_answer(
                format!("bedrock's image answer is not JSON: {e}"),
                RateInfo::default(),
                None,
            )
        })?;
        answer(&answer_body, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use sightline_core::retry::FailureKind;

    fn call(model: &str, quality: Quality, format: OutputFormat) -> GenerationCall {
        GenerationCall {
            model: model.into(),
            prompt: "a harbour at dusk".into(),
            size: Size::Pixels {
                width: 1280,
                height: 720,
            },
            quality,
            output_format: format,
            seed: Some(u64::MAX),
        }
    }

    #[test]
    fn the_body_is_the_text_image_shape_with_the_seed_in_range() {
        let nova = body(&call(
            "amazon.nova-canvas-v1:0",
            Quality::High,
            OutputFormat::Png,
        ));
        assert_eq!(nova["taskType"], "TEXT_IMAGE");
        assert_eq!(nova["textToImageParams"]["text"], "a harbour at dusk");
        let c = &nova["imageGenerationConfig"];
        assert_eq!(
            (c["width"].as_u64(), c["height"].as_u64()),
            (Some(1280), Some(720))
        );
        assert_eq!(c["quality"], "premium");
        assert_eq!(c["numberOfImages"], 1);
        assert!(c["seed"].as_u64().unwrap() <= 858_993_459);
        let titan = body(&call(
            "amazon.titan-image-generator-v2:0",
            Quality::Low,
            OutputFormat::Png,
        ));
        assert_eq!(titan["imageGenerationConfig"]["quality"], "standard");
        assert!(titan["imageGenerationConfig"]["seed"].as_u64().unwrap() <= 2_147_483_646);
        assert!(supports("amazon.titan-image-generator-v2:0"));
        assert!(!supports("amazon.titan-embed-image-v1"));
    }

    #[test]
    fn answers_are_checked_and_re_encoded_to_the_asked_format() {
        let rgb = image::RgbImage::from_pixel(32, 16, image::Rgb([200, 10, 10]));
        let png = encode(&rgb, OutputFormat::Png).unwrap();
        let ok = json!({"images": [base64::engine::general_purpose::STANDARD.encode(&png)]});
        let model = "amazon.nova-canvas-v1:0";
        let img = answer(&ok, &call(model, Quality::Low, OutputFormat::Jpeg)).unwrap();
        assert_eq!(img.content_type, "image/jpeg");
        assert_eq!(
            crate::providers::gen_common::check_bytes(&img.bytes, OutputFormat::Jpeg).unwrap(),
            (32, 16)
        );
        assert_eq!(img.usage, None);
        let same = answer(&ok, &call(model, Quality::Low, OutputFormat::Png)).unwrap();
        assert_eq!(same.bytes, png);

        for bad in [
            json!({"images": [], "error": "blocked by content filters"}),
            json!({"images": ["bm90IGFuIGltYWdl"]}),
        ] {
            let e = answer(&bad, &call(model, Quality::Low, OutputFormat::Png)).unwrap_err();
            assert_eq!(e.kind, FailureKind::InvalidOutput, "{bad}");
            assert!(e.billed);
        }
    }
}
