//! sightline in the browser: image preparation and token/cost estimates.
//!
//! A thin wasm-bindgen layer over `sightline-core`: every pixel operation and every
//! estimate is the core's own code, so the browser shows exactly what the server computes.
//!
//! Built twice (see `scripts/wasm-build.sh`): the full module (feature `decoders`, the
//! default) and the small first-load module without it, which has no image decoder or encoder.
//!
//! JS API (see `wasm-client/README.md`):
//! - `planImage(bytes, options)` — the server's header refusals, upright and output size,
//!   and whether a browser decoder may prepare the image (both modules).
//! - `estimateImage(width, height, originalWidth, originalHeight, options)` — the estimates
//!   `prepareImage` reports (both modules).
//! - `prepareImage(bytes, {maxEdge?, quality?, models?, maxInputBytes?, maxPixels?, detail?})`
//!   (full module only)
//! - `probeImage(bytes)` — format and upright size from the header only (full module only).
//! - `estimate(width, height, models?, {detail?, promptTokens?, expectedOutputTokens?})`
//! - `models()` — `{version, models: [...]}` from the built-in price table.
//! - `version()` — crate and price-table versions.
//!
//! Errors are thrown as JS `Error`s whose `message` is the core's message and whose `code`
//! property is a stable code (`not_an_image`, `too_many_pixels`, `truncated`, …).
#![deny(clippy::unwrap_used, clippy::expect_used)]

use js_sys::{Array, Object, Reflect};
use sightline_core::pricing::{EstimateParams, PriceTable};
use sightline_core::{Detail, Estimate, PrepareOptions};
use wasm_bindgen::prelude::*;

/// The models estimated when the caller names none.
pub const DEFAULT_MODELS: &[&str] = &["gpt-4.1-mini", "gpt-4o"];

/// A JS `Error` with a `code` property.
fn error(code: &str, message: &str) -> JsValue {
    let e = js_sys::Error::new(message);
    // Setting a property on a fresh Error object cannot fail.
    let _ = Reflect::set(&e, &"code".into(), &code.into());
    e.into()
}

fn set(obj: &Object, key: &str, value: impl Into<JsValue>) {
    // `obj` is always a plain object created here: `Reflect::set` cannot fail on it.
    let _ = Reflect::set(obj, &JsValue::from_str(key), &value.into());
}

fn get(obj: &JsValue, key: &str) -> JsValue {
    Reflect::get(obj, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
}

fn is_absent(v: &JsValue) -> bool {
    v.is_undefined() || v.is_null()
}

/// An optional whole number within `min..=max`.
fn opt_uint(obj: &JsValue, key: &str, min: f64, max: f64) -> Result<Option<f64>, JsValue> {
    let v = get(obj, key);
    if is_absent(&v) {
        return Ok(None);
    }
    match v.as_f64() {
        Some(n) if n.fract() == 0.0 && (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(error(
            "invalid_options",
            &format!("invalid options: {key} must be a whole number in {min}..={max}"),
        )),
    }
}

/// Model ids from `undefined`/`null` (the defaults), an array of strings or a comma list.
fn model_list(v: &JsValue) -> Result<Vec<String>, JsValue> {
    let list: Vec<String> = if is_absent(v) {
        DEFAULT_MODELS.iter().map(|s| s.to_string()).collect()
    } else if let Some(s) = v.as_string() {
        s.split(',').map(|m| m.trim().to_string()).collect()
    } else if Array::is_array(v) {
        let mut out = Vec::new();
        for item in Array::from(v).iter() {
            match item.as_string() {
                Some(s) => out.push(s.trim().to_string()),
                None => {
                    return Err(error(
                        "invalid_options",
                        "invalid options: models must be strings",
                    ))
                }
            }
        }
        out
    } else {
        return Err(error(
            "invalid_options",
            "invalid options: models must be an array of model ids or a comma-separated string",
        ));
    };
    let list: Vec<String> = list.into_iter().filter(|m| !m.is_empty()).collect();
    // Fail early with the table's own message (it lists the known models).
    let table = PriceTable::builtin();
    for m in &list {
        if let Err(e) = table.model(m) {
            return Err(error("unknown_model", &e.to_string()));
        }
    }
    Ok(list)
}

/// Estimate assumptions from `{detail?, promptTokens?, expectedOutputTokens?}`.
fn estimate_params(obj: &JsValue) -> Result<EstimateParams, JsValue> {
    let mut p = EstimateParams::default();
    if is_absent(obj) {
        return Ok(p);
    }
    if let Some(d) = get(obj, "detail").as_string() {
        p.detail = Detail::parse(&d).ok_or_else(|| {
            error(
                "invalid_options",
                &format!(
                    "invalid options: detail must be \"low\", \"high\" or \"auto\", got {d:?}"
                ),
            )
        })?;
    }
    if let Some(n) = opt_uint(obj, "promptTokens", 0.0, 1e9)? {
        p.prompt_tokens = n as u64;
    }
    if let Some(n) = opt_uint(obj, "expectedOutputTokens", 0.0, 1e9)? {
        p.expected_output_tokens = n as u64;
    }
    Ok(p)
}

fn prepare_options(obj: &JsValue) -> Result<PrepareOptions, JsValue> {
    let mut o = PrepareOptions::default();
    if is_absent(obj) {
        return Ok(o);
    }
    if !obj.is_object() {
        return Err(error(
            "invalid_options",
            "invalid options: expected an object",
        ));
    }
    if let Some(n) = opt_uint(obj, "maxEdge", 1.0, 16_384.0)? {
        o.max_edge = n as u32;
    }
    if let Some(n) = opt_uint(obj, "quality", 1.0, 100.0)? {
        o.quality = n as u8;
    }
    if let Some(n) = opt_uint(obj, "maxInputBytes", 1.0, 9_007_199_254_740_991.0)? {
        o.max_input_bytes = n as u64;
    }
    if let Some(n) = opt_uint(obj, "maxPixels", 1.0, 9_007_199_254_740_991.0)? {
        o.max_pixels = n as u64;
    }
    if let Some(n) = opt_uint(obj, "maxAllocBytes", 1.0, 9_007_199_254_740_991.0)? {
        o.max_alloc_bytes = n as u64;
    }
    Ok(o)
}

/// The core's estimate and its batch-API cost (both from the one price table).
fn core_estimate(
    model: &str,
    width: u32,
    height: u32,
    params: &EstimateParams,
) -> Result<(Estimate, f64), JsValue> {
    let table = PriceTable::builtin();
    let unknown = |e: sightline_core::pricing::PricingError| error("unknown_model", &e.to_string());
    let e = table
        .estimate(model, width, height, params)
        .map_err(unknown)?;
    let batch = table.batch_cost_usd(&e).map_err(unknown)?;
    Ok((e, batch))
}

/// `{model, tokens, imageTokens, inputTokens, outputTokens, costUsd, batchCostUsd,
/// priceVersion}`
fn estimate_object(
    model: &str,
    width: u32,
    height: u32,
    params: &EstimateParams,
) -> Result<Object, JsValue> {
    let (e, batch) = core_estimate(model, width, height, params)?;
    let o = Object::new();
    set(&o, "model", e.model.as_str());
    set(&o, "tokens", e.tokens as f64);
    set(&o, "imageTokens", e.image_tokens as f64);
    set(&o, "inputTokens", e.input_tokens as f64);
    set(&o, "outputTokens", e.output_tokens as f64);
    set(&o, "costUsd", e.cost_usd);
    set(&o, "batchCostUsd", batch);
    set(&o, "priceVersion", e.price_version.as_str());
    Ok(o)
}

/// Estimates of the prepared image for each model, with the unresized original's beside them:
/// `[{model, tokens, imageTokens, inputTokens, outputTokens, costUsd, batchCostUsd,
/// priceVersion, originalTokens, originalImageTokens, originalCostUsd, originalBatchCostUsd}]`.
fn prepared_estimates(
    models: &[String],
    (width, height): (u32, u32),
    (original_width, original_height): (u32, u32),
    params: &EstimateParams,
) -> Result<Array, JsValue> {
    let estimates = Array::new();
    for m in models {
        let e = estimate_object(m, width, height, params)?;
        let (orig, orig_batch) = core_estimate(m, original_width, original_height, params)?;
        set(&e, "originalTokens", orig.tokens as f64);
        set(&e, "originalImageTokens", orig.image_tokens as f64);
        set(&e, "originalCostUsd", orig.cost_usd);
        set(&e, "originalBatchCostUsd", orig_batch);
        estimates.push(&e);
    }
    Ok(estimates)
}

/// The models of `options.models` (the defaults when absent or `options` is).
fn option_models(options: &JsValue) -> Result<Vec<String>, JsValue> {
    if is_absent(options) {
        model_list(&JsValue::UNDEFINED)
    } else {
        model_list(&get(options, "models"))
    }
}

/// Decode, orient, resize and re-encode one image, and estimate it for each model.
///
/// Returns `{jpeg, width, height, originalWidth, originalHeight, orientation, format,
/// bytesBefore, bytesAfter, sha256, priceVersion, estimates}` (`estimates` as
/// [`estimate_image`] gives them).
///
/// Estimates assume `EstimateParams::default()` (the server's default prompt, output cap and
/// detail) unless the options override them, so they equal `sightline estimate`'s.
/// Only in the full module (feature `decoders`).
#[cfg(feature = "decoders")]
#[wasm_bindgen(js_name = prepareImage)]
pub fn prepare_image(bytes: &[u8], options: JsValue) -> Result<JsValue, JsValue> {
    let opts = prepare_options(&options)?;
    let models = option_models(&options)?;
    let params = estimate_params(&options)?;
    let p = sightline_core::prepare(bytes, &opts).map_err(|e| error(e.code(), &e.to_string()))?;
    let estimates = prepared_estimates(
        &models,
        (p.width, p.height),
        (p.original_width, p.original_height),
        &params,
    )?;

    let out = Object::new();
    set(&out, "jpeg", js_sys::Uint8Array::from(p.jpeg.as_slice()));
    set(&out, "width", p.width);
    set(&out, "height", p.height);
    set(&out, "originalWidth", p.original_width);
    set(&out, "originalHeight", p.original_height);
    set(&out, "orientation", p.orientation);
    set(&out, "format", p.format.extension());
    set(&out, "bytesBefore", p.original_bytes as f64);
    set(&out, "bytesAfter", p.bytes as f64);
    set(&out, "sha256", p.sha256.as_str());
    set(&out, "priceVersion", PriceTable::builtin().version());
    set(&out, "estimates", estimates);
    Ok(out.into())
}

/// Format, upright size and EXIF orientation from the header alone (no pixel decoding), read
/// by the real decoders. Only in the full module (feature `decoders`).
///
/// Returns `{format, width, height, orientation}`.
#[cfg(feature = "decoders")]
#[wasm_bindgen(js_name = probeImage)]
pub fn probe_image(bytes: &[u8], options: JsValue) -> Result<JsValue, JsValue> {
    let opts = prepare_options(&options)?;
    let info = sightline_core::probe(bytes, &opts).map_err(|e| error(e.code(), &e.to_string()))?;
    let out = Object::new();
    set(&out, "format", info.format.extension());
    set(&out, "width", info.width);
    set(&out, "height", info.height);
    set(&out, "orientation", info.orientation);
    Ok(out.into())
}

/// What `prepareImage` would do with these bytes, from the header alone (no decoder): the
/// server's refusals are thrown as its errors; otherwise either
/// `{route: "platform", format, width, height, orientation, storedWidth, storedHeight,
/// outWidth, outHeight}` (a browser decoder may prepare it: the output must be
/// `outWidth`×`outHeight`, upright) or `{route: "decoder", reason}` (the full module must).
/// Options as `prepareImage`'s (`maxEdge`, `maxInputBytes`, `maxPixels`, `maxAllocBytes`).
#[wasm_bindgen(js_name = planImage)]
pub fn plan_image(bytes: &[u8], options: JsValue) -> Result<JsValue, JsValue> {
    use sightline_core::header::{route, Route};
    let opts = prepare_options(&options)?;
    // Bad models or estimate options fail first, as in `prepareImage`.
    option_models(&options)?;
    estimate_params(&options)?;
    let out = Object::new();
    match route(bytes, &opts).map_err(|e| error(e.code(), &e.to_string()))? {
        Route::Platform(h) => {
            set(&out, "route", "platform");
            set(&out, "format", h.format.extension());
            set(&out, "width", h.width);
            set(&out, "height", h.height);
            set(&out, "orientation", h.orientation);
            set(&out, "storedWidth", h.stored_width);
            set(&out, "storedHeight", h.stored_height);
            set(&out, "outWidth", h.out_width);
            set(&out, "outHeight", h.out_height);
        }
        Route::Decoder(reason) => {
            set(&out, "route", "decoder");
            set(&out, "reason", reason);
        }
    }
    Ok(out.into())
}

/// Estimates of a prepared `width`×`height` image whose upright original was
/// `originalWidth`×`originalHeight`, exactly as `prepareImage` reports them.
/// `options`: `{models?, detail?, promptTokens?, expectedOutputTokens?}`.
#[wasm_bindgen(js_name = estimateImage)]
pub fn estimate_image(
    width: u32,
    height: u32,
    original_width: u32,
    original_height: u32,
    options: JsValue,
) -> Result<Array, JsValue> {
    let models = option_models(&options)?;
    let params = estimate_params(&options)?;
    prepared_estimates(
        &models,
        (width, height),
        (original_width, original_height),
        &params,
    )
}

/// Tokens and cost of one `width`×`height` image for each model (as sent, no resizing).
///
/// `models`: array of ids or comma list (default: `DEFAULT_MODELS`); `params`:
/// `{detail?, promptTokens?, expectedOutputTokens?}`.
/// Returns `[{model, tokens, imageTokens, inputTokens, outputTokens, costUsd, batchCostUsd,
/// priceVersion}]`.
#[wasm_bindgen]
pub fn estimate(
    width: u32,
    height: u32,
    models: JsValue,
    params: JsValue,
) -> Result<Array, JsValue> {
    let models = model_list(&models)?;
    let params = estimate_params(&params)?;
    let out = Array::new();
    for m in &models {
        let e = estimate_object(m, width, height, &params)?;
        out.push(&e);
    }
    Ok(out)
}

/// The built-in price table: `{version, defaultModels, models: [{id, provider, inputPerMtok,
/// cachedInputPerMtok, outputPerMtok, batchInputPerMtok, batchOutputPerMtok, imageRule, source,
/// asOf}]}`.
#[wasm_bindgen]
pub fn models() -> JsValue {
    let table = PriceTable::builtin();
    let list = Array::new();
    for m in table.models() {
        let o = Object::new();
        set(&o, "id", m.id.as_str());
        set(&o, "provider", m.provider.as_str());
        set(&o, "inputPerMtok", m.input_per_mtok);
        set(&o, "cachedInputPerMtok", m.cached_input_per_mtok);
        set(&o, "outputPerMtok", m.output_per_mtok);
        set(&o, "batchInputPerMtok", m.batch_input_per_mtok);
        set(&o, "batchOutputPerMtok", m.batch_output_per_mtok);
        set(&o, "imageRule", m.image.name());
        set(&o, "source", m.source.as_str());
        set(&o, "asOf", m.as_of.as_str());
        list.push(&o);
    }
    let defaults: Array = DEFAULT_MODELS
        .iter()
        .map(|m| JsValue::from_str(m))
        .collect();
    let out = Object::new();
    set(&out, "version", table.version());
    set(&out, "defaultModels", defaults);
    set(&out, "models", list);
    out.into()
}

/// `{crate, priceVersion, simd}`: what this build is.
#[wasm_bindgen]
pub fn version() -> JsValue {
    let out = Object::new();
    set(&out, "crate", env!("CARGO_PKG_VERSION"));
    set(&out, "priceVersion", PriceTable::builtin().version());
    set(&out, "simd", cfg!(target_feature = "simd128"));
    out.into()
}
