//! Embeddings: OpenAI-compatible `POST /v1/embeddings` (multimodal input, the shape CLIP
//! gateways take) and Bedrock's `POST /model/{modelId}/invoke` for Titan Multimodal Embeddings
//! G1 and Nova Multimodal Embeddings. One flow with the vision routes' windows and faults
//! (auth → body → poison → faults → rate limits → latency → answer).
//!
//! - **OpenAI-compatible**: `{model, input, dimensions?, encoding_format?: "float"}` where
//!   `input` is a string, a one-string list, or one part `[{type: "image" | "text", data}]`
//!   (`data` base64 for an image). The model must be an `openai` embedding model of the price
//!   table (404 `model_not_found` otherwise). Answer: `{object: "list", data: [{object:
//!   "embedding", index: 0, embedding}], model, usage: {prompt_tokens, total_tokens}}`; an
//!   image counts no prompt tokens.
//! - **Titan** (`amazon.titan-embed-image-*`): `{inputText?, inputImage?,
//!   embeddingConfig?: {outputEmbeddingLength}}` → `{embedding, inputTextTokenCount}`; both
//!   inputs give the normalised mean of the two vectors, as Titan does.
//! - **Nova** (`amazon.nova-*multimodal-embeddings*`): `{taskType: "SINGLE_EMBEDDING",
//!   singleEmbeddingParams: {embeddingPurpose, embeddingDimension?, text: {truncationMode,
//!   value} | image: {format, source: {bytes}}}}` → `{embeddings: [{embeddingType, embedding}]}`.
//!   Bedrock errors as in [`super::bedrock`].
//! - **Checks**: the dimension must be one the price table lists for the model (its default
//!   when not asked); an image over the model's `max_image_edge` is refused (400), as Titan
//!   refuses images over 2048 px.
//! - **Vectors** are deterministic, L2-normalised, of the dimension asked for:
//!   - an image: its colour layout (an 8x8 thumbnail, each channel centred on mid-grey),
//!     through a fixed random projection, so near-identical images get near-identical vectors
//!     and images of other colours or layouts do not;
//!   - a text: per word, a colour word (`red`, `blue`, …) is the vector of an image of that
//!     colour, any other word a hashed random direction; the words' sum, normalised. So
//!     "red" finds red images, and the same words always give the same vector.
//!
//!   The vectors do not depend on the model: the same image has the same vector of a given
//!   dimension on every route.
//! - **Faults**: `bad-content` answers a vector of half the dimension asked for (a valid
//!   envelope, an unusable vector); `malformed` a cut body; the others as on the vision routes.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sightline_core::pricing::{text_tokens, EmbeddingPrice, PriceTable};

use super::bedrock::{source_bytes, validation};
use super::{
    decide_fault, forced_fault, gate, is_poison, json_response, per_request_rng, poison_error,
    set_header, truncate_chars, Api, ApiError, Fault, LimitSnapshot, Shared,
};

/// Side of the thumbnail an image's vector is made from.
pub const GRID: u32 = 8;
/// Length of an image's colour-layout features.
const FEATURES: usize = (GRID * GRID * 3) as usize;
/// Seed of the projection from features to a vector of any dimension.
const PROJECTION_SEED: u64 = 0x5167_6874_6c69_6e65;

/// Counters of the embedding routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedStats {
    /// Every call of either route.
    pub requests: u64,
    /// 200s with a usable vector (no fault injected).
    pub embeddings: u64,
    /// Image and text inputs of those.
    pub images: u64,
    pub texts: u64,
    /// Text tokens of those.
    pub text_tokens: u64,
    /// 401/403s.
    pub unauthorized: u64,
    /// 400/404s (invalid body, model, dimension, image).
    pub bad_requests: u64,
    /// Embeddings answered per model.
    pub per_model: BTreeMap<String, u64>,
}

/// The request format of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    OpenAi,
    Titan,
    Nova,
}

/// A parsed embedding call.
struct Call {
    model: String,
    family: Family,
    dims: u32,
    /// The image: its sha256 (hex) and colour-layout features.
    image: Option<(String, Vec<f64>)>,
    text: Option<String>,
}

impl Call {
    fn text_tokens(&self) -> u64 {
        self.text.as_deref().map(text_tokens).unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Vectors
// ---------------------------------------------------------------------------------------------

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A number in [-1, 1) from a hash.
fn signed_unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An image's colour layout: an 8x8 thumbnail, each channel in [-1, 1] around mid-grey.
pub fn image_features(rgb: &image::RgbImage) -> Vec<f64> {
    let thumb = image::imageops::thumbnail(rgb, GRID, GRID);
    thumb
        .pixels()
        .flat_map(|p| p.0)
        .map(|c| f64::from(c) / 127.5 - 1.0)
        .collect()
}

/// Features into `dims` dimensions by a fixed random projection (angles are roughly kept).
fn project(features: &[f64], dims: u32) -> Vec<f64> {
    (0..u64::from(dims))
        .map(|j| {
            features
                .iter()
                .enumerate()
                .map(|(i, f)| f * signed_unit(splitmix64(PROJECTION_SEED ^ ((i as u64) << 32 | j))))
                .sum()
        })
        .collect()
}

fn normalise(v: Vec<f64>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        v.into_iter().map(|x| (x / norm) as f32).collect()
    } else {
        // No direction at all (a uniformly mid-grey image): a fixed one.
        let mut out = vec![0.0; v.len()];
        if let Some(first) = out.first_mut() {
            *first = 1.0;
        }
        out
    }
}

/// The vector the simulator answers for an image's features.
fn features_vector(features: &[f64], dims: u32) -> Vec<f32> {
    normalise(project(features, dims))
}

/// The vector the simulator answers for an image (None when it does not decode).
pub fn image_vector(bytes: &[u8], dims: u32) -> Option<Vec<f32>> {
    let img = image::load_from_memory(bytes).ok()?;
    Some(features_vector(&image_features(&img.to_rgb8()), dims))
}

/// Colour words, as the colour of an image that is all that colour.
const COLOURS: [(&str, [u8; 3]); 14] = [
    ("red", [220, 30, 30]),
    ("green", [30, 160, 60]),
    ("blue", [30, 60, 220]),
    ("yellow", [240, 220, 40]),
    ("orange", [245, 140, 20]),
    ("purple", [130, 50, 170]),
    ("pink", [240, 130, 180]),
    ("white", [245, 245, 245]),
    ("black", [10, 10, 10]),
    ("gray", [128, 128, 128]),
    ("grey", [128, 128, 128]),
    ("brown", [120, 75, 35]),
    ("cyan", [40, 200, 220]),
    ("magenta", [210, 40, 180]),
];

/// A word's features: a colour word's solid-colour layout, else a hashed random direction.
fn word_features(word: &str) -> Vec<f64> {
    if let Some((_, rgb)) = COLOURS.iter().find(|(w, _)| *w == word) {
        return (0..FEATURES)
            .map(|i| f64::from(rgb[i % 3]) / 127.5 - 1.0)
            .collect();
    }
    let seed = fnv1a(word);
    (0..FEATURES as u64)
        .map(|i| signed_unit(splitmix64(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93))))
        .collect()
}

/// The vector the simulator answers for a text (see the module docs).
pub fn text_vector(text: &str, dims: u32) -> Vec<f32> {
    let mut sum = vec![0.0; FEATURES];
    let lower = text.to_lowercase();
    for word in lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        for (s, f) in sum.iter_mut().zip(word_features(word)) {
            *s += f;
        }
    }
    features_vector(&sum, dims)
}

/// The vector of a call: its image's, its text's, or (Titan with both) their normalised mean.
fn vector_of(call: &Call) -> Vec<f32> {
    let image = call
        .image
        .as_ref()
        .map(|(_, f)| features_vector(f, call.dims));
    let text = call.text.as_deref().map(|t| text_vector(t, call.dims));
    match (image, text) {
        (Some(i), Some(t)) => normalise(
            i.iter()
                .zip(&t)
                .map(|(a, b)| f64::from(*a) + f64::from(*b))
                .collect(),
        ),
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => normalise(vec![0.0; call.dims as usize]),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// An invalid OpenAI-route request, or Bedrock's ValidationException.
fn invalid(api: Api, message: String) -> ApiError {
    match api {
        Api::Bedrock => validation(message),
        _ => ApiError::invalid(message, None),
    }
}

/// Decode an image off the async threads, checking the model's edge limit.
async fn decode(
    api: Api,
    bytes: Vec<u8>,
    max_edge: Option<u32>,
) -> Result<(String, Vec<f64>), ApiError> {
    let sha = hex::encode(Sha256::digest(&bytes));
    let decoded = tokio::task::spawn_blocking(move || {
        image::ImageReader::new(Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?
            .decode()
            .map_err(|e| e.to_string())
            .map(|img| img.to_rgb8())
    })
    .await
    .map_err(|e| invalid(api, format!("image decoding failed: {e}")))?
    .map_err(|e| invalid(api, format!("Unable to process the provided image: {e}")))?;
    let (w, h) = decoded.dimensions();
    if let Some(max) = max_edge {
        if w.max(h) > max {
            return Err(invalid(
                api,
                format!("The image is {w}x{h} pixels; this model takes at most {max}x{max}."),
            ));
        }
    }
    Ok((sha, image_features(&decoded)))
}

/// The dimension asked for, checked against the model's list (its default when absent).
fn dims_of(api: Api, price: &EmbeddingPrice, asked: Option<&Value>) -> Result<u32, ApiError> {
    let dims = match asked {
        None | Some(Value::Null) => return Ok(price.default_dims()),
        Some(v) => v
            .as_u64()
            .and_then(|d| u32::try_from(d).ok())
            .ok_or_else(|| invalid(api, format!("the dimension {v} is not a positive integer")))?,
    };
    if price.dims.contains(&dims) {
        Ok(dims)
    } else {
        Err(invalid(
            api,
            format!(
                "{dims} dimensions are not offered by {}: one of {:?}",
                price.id, price.dims
            ),
        ))
    }
}

fn b64(api: Api, data: &str, what: &str) -> Result<Vec<u8>, ApiError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| invalid(api, format!("{what} is not base64: {e}")))?;
    if bytes.is_empty() {
        return Err(invalid(api, format!("{what} is empty")));
    }
    Ok(bytes)
}

fn non_empty_text(api: Api, text: &str, what: &str) -> Result<String, ApiError> {
    if text.trim().is_empty() {
        return Err(invalid(api, format!("{what} is empty")));
    }
    Ok(text.to_string())
}

async fn parse_openai(body: &[u8]) -> Result<Call, ApiError> {
    let api = Api::OpenAi;
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        invalid(
            api,
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("you must provide a model parameter", Some("model")))?;
    let price = PriceTable::builtin()
        .embedding_model(model)
        .ok()
        .filter(|p| p.provider == "openai")
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: None,
        })?;
    match v.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                format!("The simulator answers encoding_format \"float\" only, not {other:?}."),
                Some("encoding_format"),
            ))
        }
    }
    let dims = dims_of(api, price, v.get("dimensions"))?;
    let one = |items: &Vec<Value>| -> Result<Value, ApiError> {
        match items.as_slice() {
            [item] => Ok(item.clone()),
            _ => Err(ApiError::invalid(
                "The simulator embeds one input per request.",
                Some("input"),
            )),
        }
    };
    let input = match v.get("input") {
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(items)) => one(items)?,
        _ => {
            return Err(ApiError::invalid(
                "Missing required parameter: 'input'.",
                Some("input"),
            ))
        }
    };
    let (mut image, mut text) = (None, None);
    match &input {
        Value::String(s) => text = Some(non_empty_text(api, s, "input")?),
        part => {
            let data = part.get("data").and_then(Value::as_str).unwrap_or("");
            match part.get("type").and_then(Value::as_str) {
                Some("image") => {
                    let bytes = b64(api, data, "input[0].data")?;
                    image = Some(decode(api, bytes, price.max_image_edge).await?);
                }
                Some("text") => text = Some(non_empty_text(api, data, "input[0].data")?),
                _ => {
                    return Err(ApiError::invalid(
                        "input parts are {\"type\": \"image\" | \"text\", \"data\": …}",
                        Some("input"),
                    ))
                }
            }
        }
    }
    Ok(Call {
        model: model.to_string(),
        family: Family::OpenAi,
        dims,
        image,
        text,
    })
}

async fn parse_bedrock(body: &[u8], model: &str) -> Result<Call, ApiError> {
    let api = Api::Bedrock;
    let unknown = || validation("The provided model identifier is invalid.");
    let price = PriceTable::builtin()
        .embedding_model(model)
        .ok()
        .filter(|p| p.provider == "bedrock")
        .ok_or_else(unknown)?;
    let family = if model.starts_with("amazon.titan-embed-image") {
        Family::Titan
    } else if model.starts_with("amazon.nova") && model.contains("multimodal-embeddings") {
        Family::Nova
    } else {
        return Err(unknown());
    };
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| validation(format!("Malformed input request: {e}")))?;
    let (mut image, mut text) = (None, None);
    let dims = match family {
        Family::Titan => {
            if let Some(t) = v.get("inputText") {
                let t = t
                    .as_str()
                    .ok_or_else(|| validation("inputText must be a string"))?;
                text = Some(non_empty_text(api, t, "inputText")?);
            }
            if let Some(i) = v.get("inputImage") {
                let data = i
                    .as_str()
                    .ok_or_else(|| validation("inputImage must be a base64 string"))?;
                let bytes = b64(api, data, "inputImage")?;
                image = Some(decode(api, bytes, price.max_image_edge).await?);
            }
            if image.is_none() && text.is_none() {
                return Err(validation(
                    "Malformed input request: at least one of inputText and inputImage is required",
                ));
            }
            dims_of(
                api,
                price,
                v.pointer("/embeddingConfig/outputEmbeddingLength"),
            )?
        }
        _ => {
            if v.get("taskType").and_then(Value::as_str) != Some("SINGLE_EMBEDDING") {
                return Err(validation(
                    "taskType must be SINGLE_EMBEDDING for a synchronous call",
                ));
            }
            let p = v
                .get("singleEmbeddingParams")
                .ok_or_else(|| validation("singleEmbeddingParams is required"))?;
            const PURPOSES: [&str; 9] = [
                "GENERIC_INDEX",
                "GENERIC_RETRIEVAL",
                "TEXT_RETRIEVAL",
                "IMAGE_RETRIEVAL",
                "VIDEO_RETRIEVAL",
                "DOCUMENT_RETRIEVAL",
                "AUDIO_RETRIEVAL",
                "CLASSIFICATION",
                "CLUSTERING",
            ];
            let purpose = p.get("embeddingPurpose").and_then(Value::as_str);
            if !purpose.is_some_and(|x| PURPOSES.contains(&x)) {
                return Err(validation(format!(
                    "singleEmbeddingParams.embeddingPurpose must be one of {PURPOSES:?}"
                )));
            }
            let dims = dims_of(api, price, p.get("embeddingDimension"))?;
            match (p.get("text"), p.get("image")) {
                (Some(t), None) => {
                    let mode = t.get("truncationMode").and_then(Value::as_str);
                    if !matches!(mode, Some("START" | "END" | "NONE")) {
                        return Err(validation(
                            "text.truncationMode must be START, END or NONE",
                        ));
                    }
                    let value = t.get("value").and_then(Value::as_str).ok_or_else(|| {
                        validation("text.value is required (the simulator takes no source)")
                    })?;
                    text = Some(non_empty_text(api, value, "text.value")?);
                }
                (None, Some(i)) => {
                    let format = i.get("format").and_then(Value::as_str).unwrap_or("");
                    if !matches!(format, "png" | "jpeg" | "gif" | "webp") {
                        return Err(validation(format!(
                            "image.format {format:?} is not one of png, jpeg, gif, webp"
                        )));
                    }
                    let bytes = source_bytes(i.get("source"), "image")?;
                    image = Some(decode(api, bytes, price.max_image_edge).await?);
                }
                _ => {
                    return Err(validation(
                        "exactly one of text and image is required (the simulator embeds no audio or video)",
                    ))
                }
            }
            dims
        }
    };
    Ok(Call {
        model: model.to_string(),
        family,
        dims,
        image,
        text,
    })
}

// ---------------------------------------------------------------------------------------------
// Answers and the flow
// ---------------------------------------------------------------------------------------------

fn answer_body(call: &Call, vector: &[f32]) -> Value {
    let tokens = call.text_tokens();
    match call.family {
        Family::OpenAi => json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
        Family::Titan => json!({
            "embedding": vector,
            "inputTextTokenCount": tokens,
            "message": null,
        }),
        Family::Nova => json!({
            "embeddings": [{
                "embeddingType": if call.image.is_some() { "IMAGE" } else { "TEXT" },
                "embedding": vector,
            }],
        }),
    }
}

/// One embedding call: the vision routes' order of checks (module docs of [`super`]).
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
        g.stats.embeddings.requests += 1;
        g.cfg.clone()
    };
    let key = match api.authenticate(&headers, &cfg.api_key) {
        Ok(k) => k,
        Err(e) => {
            {
                let mut g = sh.lock();
                if matches!(e.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                    g.stats.embeddings.unauthorized += 1;
                } else {
                    g.stats.embeddings.bad_requests += 1;
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
            sh.lock().stats.embeddings.bad_requests += 1;
            return with_limits(e.render(api), &sh.snapshot(&key));
        }
    };
    let parsed = match api {
        Api::Bedrock => parse_bedrock(&body, path_model.as_deref().unwrap_or_default()).await,
        _ => parse_openai(&body).await,
    };
    let call = match parsed {
        Ok(c) => c,
        Err(e) => {
            sh.lock().stats.embeddings.bad_requests += 1;
            return with_limits(e.render(api), &sh.snapshot(&key));
        }
    };

    // Poison images are refused before anything else, as on the vision routes.
    let poison = call
        .image
        .as_ref()
        .map(|(sha, _)| sha.as_str())
        .filter(|sha| is_poison(cfg.seed, sha, cfg.faults.poison_rate));
    let seq = {
        let mut g = sh.lock();
        if let Some(sha) = poison {
            g.stats.poisoned += 1;
            *g.stats
                .poisoned_per_image
                .entry(sha.to_string())
                .or_default() += 1;
            g.stats.poisoned_images = g.stats.poisoned_per_image.len() as u64;
            None
        } else {
            g.valid_seq += 1;
            Some(g.valid_seq)
        }
    };
    let Some(seq) = seq else {
        return with_limits(poison_error().render(api), &sh.snapshot(&key));
    };
    let mut rng = per_request_rng(cfg.seed, seq);
    let fault = match forced {
        Some(f) => f,
        None => decide_fault(&cfg.faults, seq, &mut rng),
    };
    let request_id = format!("req_sime{seq:08}");
    let finish = |mut resp: Response, snap: &LimitSnapshot| {
        api.add_limit_headers(&mut resp, snap);
        api.add_id_headers(&mut resp, &request_id, started);
        resp
    };

    // An embedding call counts its text tokens (at least one) against the TPM window.
    let estimate = call.text_tokens().max(1);
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

    let mut vector = vector_of(&call);
    if fault == Some(Fault::BadContent) {
        vector.truncate(vector.len() / 2);
    }
    let body = answer_body(&call, &vector);
    {
        let mut g = sh.lock();
        match fault {
            Some(f) => g.stats.faults.bump(f),
            None => {
                let e = &mut g.stats.embeddings;
                e.embeddings += 1;
                e.images += u64::from(call.image.is_some());
                e.texts += u64::from(call.text.is_some());
                e.text_tokens += call.text_tokens();
                *e.per_model.entry(call.model.clone()).or_default() += 1;
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
    let mut resp = json_response(StatusCode::OK, &body);
    if api == Api::Bedrock {
        // Bedrock's InvokeModel answers also count the input tokens in a header.
        set_header(
            &mut resp,
            "x-amzn-bedrock-input-token-count",
            &call.text_tokens().to_string(),
        );
    }
    finish(resp, &snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(rgb: [u8; 3], w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
    }

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn vectors_are_unit_of_the_dimension_asked_and_deterministic() {
        for dims in [256, 384, 1024, 3072] {
            let v = features_vector(&image_features(&solid([200, 10, 10], 64, 48)), dims);
            assert_eq!(v.len(), dims as usize);
            let norm: f32 = v.iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-4);
            assert_eq!(
                text_vector("a red car", dims),
                text_vector("A red, car", dims)
            );
        }
        // A uniformly mid-grey image has no direction of its own, still a unit vector.
        let grey = features_vector(&image_features(&solid([128, 128, 128], 8, 8)), 16);
        assert!((cos(&grey, &grey) - 1.0).abs() < 1e-4);
    }

    #[test]
    fn colours_and_colour_words_meet() {
        let red = features_vector(&image_features(&solid([210, 40, 30], 100, 80)), 256);
        let redder = features_vector(&image_features(&solid([225, 25, 35], 640, 480)), 256);
        let blue = features_vector(&image_features(&solid([20, 50, 200], 100, 80)), 256);
        assert!(cos(&red, &redder) > 0.95);
        assert!(cos(&red, &blue) < cos(&red, &redder) - 0.5);
        let word = text_vector("red", 256);
        assert!(cos(&word, &red) > cos(&word, &blue) + 0.5);
    }
}
