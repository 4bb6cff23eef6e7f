//! Image generation: OpenAI's `POST /v1/images/generations` and Bedrock's `POST
//! /model/{modelId}/invoke` for Nova Canvas and Titan Image Generator v2. One flow with the
//! other routes' windows and faults (auth → body → refusal → faults → rate limits → latency →
//! answer); one image per request, so the RPM window is an images-per-minute limit.
//!
//! - **OpenAI**: `{model, prompt, n?: 1, size?: "auto" | WxH, quality?: low | medium | high |
//!   auto, output_format?: png | jpeg | webp}`. The model must be an `openai` image model of the
//!   price table (404 `model_not_found`), the size `auto` or one the table prices for it (400
//!   `invalid_value`, as OpenAI refuses other sizes for the GPT image models). Answer:
//!   `{created, data: [{b64_json}], output_format, quality, size, usage: {input_tokens,
//!   input_tokens_details: {text_tokens, image_tokens: 0}, output_tokens, total_tokens}}`.
//!   Input tokens are the prompt's text tokens; output tokens follow OpenAI's published table
//!   for gpt-image-1 (272 / 1056 / 4160 for a square low / medium / high image, 408 / 1584 /
//!   6240 portrait, 400 / 1568 / 6208 landscape; `auto` is high, square).
//! - **Bedrock** (`amazon.nova-canvas*`, `amazon.titan-image-generator*`): `{taskType:
//!   "TEXT_IMAGE", textToImageParams: {text}, imageGenerationConfig: {numberOfImages?: 1,
//!   width, height, quality?, seed?, cfgScale?}}` → `{images: [<base64 PNG>]}` (Titan also
//!   sends `error: null`). Sides must be multiples of 16 in 256..=4096 (ValidationException).
//! - **Images** are real but small: the longest side [`PICTURE_SIDE`] pixels, the asked aspect,
//!   a colour of the prompt's hash, in the asked format (Bedrock: always PNG, as there).
//! - **Refusal**: a prompt containing [`REFUSE_MARKER`] is what the safety system refuses:
//!   OpenAI's 400 `moderation_blocked`, Bedrock's 400 ValidationException "blocked by our
//!   content filters". Not billed.
//! - **Faults**: `bad-content` answers base64 that is no image (a valid envelope, an
//!   undecodable picture); `malformed` a cut body; the others as on the vision routes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sightline_core::generate::{OutputFormat, Quality, Size};
use sightline_core::pricing::{text_tokens, ImagePrice, PriceTable};

use super::bedrock::validation;
use super::{
    decide_fault, forced_fault, gate, json_response, per_request_rng, truncate_chars, Api,
    ApiError, Fault, LimitSnapshot, Shared,
};

/// Longest side of a simulated picture: real pixels, cheap to make.
pub const PICTURE_SIDE: u32 = 64;
/// A prompt containing this is refused by the simulated safety system.
pub const REFUSE_MARKER: &str = "REFUSE";

/// Counters of the image routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStats {
    /// Every call of either route.
    pub requests: u64,
    /// 200s with a usable image (no fault injected).
    pub images: u64,
    /// Prompts refused by the safety system.
    pub refused: u64,
    /// 401/403s.
    pub unauthorized: u64,
    /// 400/404s (invalid body, model, size, quality, format).
    pub bad_requests: u64,
    /// Tokens of every 200 on the OpenAI route (usable or not: a 200 is billed).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Images answered per model.
    pub per_model: BTreeMap<String, u64>,
    /// Every 200 on either route, usable or not (a cut body or a picture that does not
    /// decode is paid all the same): what the provider bills for.
    #[serde(default)]
    pub billed: u64,
    /// Usable images answered per prompt: how often a request was paid for in full.
    #[serde(default)]
    pub usable_per_prompt: BTreeMap<String, u64>,
}

/// Whether a Bedrock model id is an image model this module answers.
pub fn is_image_model(model: &str) -> bool {
    model.starts_with("amazon.nova-canvas") || model.starts_with("amazon.titan-image-generator")
}

/// A parsed generation call.
struct Call {
    model: String,
    prompt: String,
    width: u32,
    height: u32,
    quality: Quality,
    format: OutputFormat,
    /// The size as asked ("auto" or WxH), echoed by OpenAI.
    size: String,
}

impl Call {
    /// Output tokens by OpenAI's published table for gpt-image-1 (by aspect and quality).
    fn output_tokens(&self) -> u64 {
        let [low, medium, high] = match self.width.cmp(&self.height) {
            std::cmp::Ordering::Equal => [272, 1056, 4160],
            std::cmp::Ordering::Less => [408, 1584, 6240],
            std::cmp::Ordering::Greater => [400, 1568, 6208],
        };
        match self.quality {
            Quality::Low => low,
            Quality::Medium => medium,
            Quality::High | Quality::Auto => high,
        }
    }
}

fn invalid(api: Api, message: String, param: &'static str) -> ApiError {
    match api {
        Api::Bedrock => validation(message),
        _ => ApiError::invalid(message, Some(param)).with_code("invalid_value"),
    }
}

fn price_of(api: Api, model: &str) -> Result<ImagePrice, ApiError> {
    let provider = if api == Api::Bedrock {
        "bedrock"
    } else {
        "openai"
    };
    match PriceTable::builtin().image_model(model) {
        Ok(p) if p.provider == provider => Ok(p.clone()),
        _ if api == Api::Bedrock => Err(validation(format!(
            "The provided model identifier is invalid: {model}"
        ))),
        _ => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: None,
        }),
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn parse_openai(body: &[u8]) -> Result<Call, ApiError> {
    let api = Api::OpenAi;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("We could not parse the JSON body: {e}"), None))?;
    let model = str_field(&v, "model")
        .ok_or_else(|| invalid(api, "model is required".into(), "model"))?
        .to_string();
    let price = price_of(api, &model)?;
    let prompt = str_field(&v, "prompt")
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| invalid(api, "prompt is required".into(), "prompt"))?
        .to_string();
    if v.get("n").is_some_and(|n| n.as_u64() != Some(1)) {
        return Err(invalid(
            api,
            "the simulator makes one image per request (n = 1)".into(),
            "n",
        ));
    }
    let size_s = str_field(&v, "size").unwrap_or("auto").to_string();
    let size = Size::parse(&size_s).map_err(|e| invalid(api, e, "size"))?;
    let (width, height) = match size {
        Size::Auto => (1024, 1024),
        Size::Pixels { width, height } => {
            let listed = price
                .prices
                .keys()
                .any(|k| k.split(':').next() == Some(size_s.as_str()));
            if !listed {
                return Err(invalid(
                    api,
                    format!("Invalid size '{size_s}'. Supported sizes are 1024x1024, 1024x1536, 1536x1024, and auto."),
                    "size",
                ));
            }
            (width, height)
        }
    };
    let quality = Quality::parse(str_field(&v, "quality").unwrap_or("auto"))
        .map_err(|e| invalid(api, e, "quality"))?;
    let format = OutputFormat::parse(str_field(&v, "output_format").unwrap_or("png"))
        .map_err(|e| invalid(api, e, "output_format"))?;
    Ok(Call {
        model,
        prompt,
        width,
        height,
        quality,
        format,
        size: size_s,
    })
}

fn parse_bedrock(body: &[u8], model: &str) -> Result<Call, ApiError> {
    let api = Api::Bedrock;
    price_of(api, model)?;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| validation(format!("Malformed input request: {e}")))?;
    if str_field(&v, "taskType") != Some("TEXT_IMAGE") {
        return Err(validation("the simulator answers taskType TEXT_IMAGE only"));
    }
    let prompt = v
        .pointer("/textToImageParams/text")
        .and_then(Value::as_str)
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| validation("textToImageParams.text is required"))?
        .to_string();
    let config = v.get("imageGenerationConfig").cloned().unwrap_or(json!({}));
    if config
        .get("numberOfImages")
        .is_some_and(|n| n.as_u64() != Some(1))
    {
        return Err(validation("the simulator makes one image per request"));
    }
    let side = |key: &str| -> Result<u32, ApiError> {
        let n = config.get(key).and_then(Value::as_u64).unwrap_or(1024);
        if (256..=4096).contains(&n) && n % 16 == 0 {
            Ok(n as u32)
        } else {
            Err(validation(format!(
                "imageGenerationConfig.{key} must be a multiple of 16 from 256 to 4096, got {n}"
            )))
        }
    };
    let (width, height) = (side("width")?, side("height")?);
    let quality = match str_field(&config, "quality").unwrap_or("standard") {
        "standard" => Quality::Medium,
        "premium" => Quality::High,
        q => {
            return Err(validation(format!(
                "quality must be standard or premium, got {q}"
            )))
        }
    };
    Ok(Call {
        model: model.to_string(),
        prompt,
        width,
        height,
        quality,
        format: OutputFormat::Png,
        size: format!("{width}x{height}"),
    })
}

/// The picture: one colour of the prompt's hash, a diagonal of its inverse, of the call's
/// aspect with the longest side [`PICTURE_SIDE`].
fn picture(call: &Call) -> Result<Vec<u8>, image::ImageError> {
    let d = Sha256::digest(call.prompt.as_bytes());
    let long = call.width.max(call.height).max(1);
    let w = (call.width * PICTURE_SIDE / long).max(1);
    let h = (call.height * PICTURE_SIDE / long).max(1);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        if x * h / w == y {
            image::Rgb([255 - d[0], 255 - d[1], 255 - d[2]])
        } else {
            image::Rgb([d[0], d[1], d[2]])
        }
    });
    let format = match call.format {
        OutputFormat::Png => image::ImageFormat::Png,
        OutputFormat::Jpeg => image::ImageFormat::Jpeg,
        OutputFormat::Webp => image::ImageFormat::WebP,
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format)?;
    Ok(out.into_inner())
}

fn refusal(api: Api) -> ApiError {
    match api {
        Api::Bedrock => validation("This request has been blocked by our content filters."),
        _ => ApiError {
            status: StatusCode::BAD_REQUEST,
            message: "Your request was rejected as a result of our safety system. Your request may contain content that is not allowed by our safety system.".into(),
            kind: "image_generation_user_error",
            code: Some("moderation_blocked"),
            param: None,
        },
    }
}

fn answer_body(api: Api, call: &Call, b64: String) -> Value {
    match api {
        Api::Bedrock if call.model.starts_with("amazon.titan") => {
            json!({"images": [b64], "error": null})
        }
        Api::Bedrock => json!({"images": [b64]}),
        _ => {
            let input = text_tokens(&call.prompt);
            let output = call.output_tokens();
            let created = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            json!({
                "created": created,
                "data": [{"b64_json": b64}],
                "background": "opaque",
                "output_format": call.format.as_str(),
                "quality": call.quality.as_str(),
                "size": call.size,
                "usage": {
                    "input_tokens": input,
                    "input_tokens_details": {"text_tokens": input, "image_tokens": 0},
                    "output_tokens": output,
                    "total_tokens": input + output,
                },
            })
        }
    }
}

/// One image-generation call: the vision routes' order of checks (module docs of [`super`]).
pub(super) async fn handle(
    api: Api,
    path_model: Option<String>,
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let cfg = {
        let mut g = sh.lock();
        g.stats.images.requests += 1;
        g.cfg.clone()
    };
    let key = match api.authenticate(&headers, &cfg.api_key) {
        Ok(k) => k,
        Err(e) => {
            {
                let mut g = sh.lock();
                if matches!(e.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                    g.stats.images.unauthorized += 1;
                } else {
                    g.stats.images.bad_requests += 1;
                }
            }
            return e.render(api);
        }
    };
    let with_limits = |mut resp: Response, snap: &LimitSnapshot| {
        api.add_limit_headers(&mut resp, snap);
        resp
    };
    let forced = match forced_fault(&headers) {
        Ok(f) => f,
        Err(e) => {
            sh.lock().stats.images.bad_requests += 1;
            return with_limits(e.render(api), &sh.snapshot(&key));
        }
    };
    let parsed = match api {
        Api::Bedrock => parse_bedrock(&body, path_model.as_deref().unwrap_or_default()),
        _ => parse_openai(&body),
    };
    let call = match parsed {
        Ok(c) => c,
        Err(e) => {
            sh.lock().stats.images.bad_requests += 1;
            return with_limits(e.render(api), &sh.snapshot(&key));
        }
    };
    // The safety system answers before any fault or limit, as poison images do elsewhere.
    if call.prompt.contains(REFUSE_MARKER) {
        sh.lock().stats.images.refused += 1;
        return with_limits(refusal(api).render(api), &sh.snapshot(&key));
    }
    let seq = {
        let mut g = sh.lock();
        g.valid_seq += 1;
        g.valid_seq
    };
    let mut rng = per_request_rng(cfg.seed, seq);
    let fault = match forced {
        Some(f) => f,
        None => decide_fault(&cfg.faults, seq, &mut rng),
    };
    let request_id = format!("req_simi{seq:08}");
    let finish = |mut resp: Response, snap: &LimitSnapshot| {
        api.add_limit_headers(&mut resp, snap);
        api.add_id_headers(&mut resp, &request_id, started);
        resp
    };
    let billed_tokens = if api == Api::Bedrock {
        (0, 0)
    } else {
        (text_tokens(&call.prompt), call.output_tokens())
    };
    let estimate = (billed_tokens.0 + billed_tokens.1).max(1);
    let snap = match gate(
        &sh,
        &cfg,
        api,
        &key,
        &call.model,
        estimate,
        fault,
        &mut rng,
        &finish,
    )
    .await
    {
        Ok(snap) => snap,
        Err(resp) => return resp,
    };

    let bytes = if fault == Some(Fault::BadContent) {
        b"this is not an image".to_vec()
    } else {
        match picture(&call) {
            Ok(b) => b,
            Err(e) => {
                let resp = (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("simulator could not encode its picture: {e}"),
                )
                    .into_response();
                return finish(resp, &snap);
            }
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let body = answer_body(api, &call, b64);
    {
        let mut g = sh.lock();
        let s = &mut g.stats.images;
        s.input_tokens += billed_tokens.0;
        s.output_tokens += billed_tokens.1;
        s.billed += 1;
        match fault {
            Some(f) => g.stats.faults.bump(f),
            None => {
                s.images += 1;
                *s.per_model.entry(call.model.clone()).or_default() += 1;
                *s.usable_per_prompt.entry(call.prompt.clone()).or_default() += 1;
            }
        }
    }
    if fault == Some(Fault::Malformed) {
        let text = body.to_string();
        let cut = truncate_chars(&text, text.chars().count() / 2);
        let mut resp = (StatusCode::OK, cut).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return finish(resp, &snap);
    }
    finish(json_response(StatusCode::OK, &body), &snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pictures_are_real_images_of_the_asked_aspect_and_format() {
        for (format, guess) in [
            (OutputFormat::Png, image::ImageFormat::Png),
            (OutputFormat::Jpeg, image::ImageFormat::Jpeg),
            (OutputFormat::Webp, image::ImageFormat::WebP),
        ] {
            let call = Call {
                model: "gpt-image-1".into(),
                prompt: "a kite".into(),
                width: 1536,
                height: 1024,
                quality: Quality::Low,
                format,
                size: "1536x1024".into(),
            };
            let bytes = picture(&call).unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), guess);
            let img = image::load_from_memory(&bytes).unwrap();
            assert_eq!((img.width(), img.height()), (64, 42));
            assert_eq!(call.output_tokens(), 400);
        }
    }
}
