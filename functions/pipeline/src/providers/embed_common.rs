//! What the remote embedders share: the model's entry in the price table, images scaled to
//! what the model takes, and vectors checked and L2-normalised before anyone stores them.

use std::borrow::Cow;

use serde_json::Value;
use sightline_core::pricing::{PriceTable, PricingError};
use sightline_core::retry::FailureKind;
use sightline_core::PrepareOptions;

use super::http::{bad_answer, err};
use crate::ports::{ProviderError, RateInfo};

/// Why an embedder cannot be built (checked at start, so no image fails for it later).
#[derive(Debug, thiserror::Error)]
pub enum EmbedSetupError {
    #[error(transparent)]
    UnknownModel(#[from] PricingError),
    #[error("embedding model `{model}` returns {allowed:?} dimensions, not {dims}")]
    Dims {
        model: String,
        dims: u32,
        allowed: Vec<u32>,
    },
    #[error("embedding model `{model}` is a `{provider}` model, not a `{wanted}` one")]
    ForeignModel {
        model: String,
        provider: String,
        wanted: &'static str,
    },
    #[error("no request format is known for embedding model `{0}` (Titan Multimodal Embeddings G1 and Nova Multimodal Embeddings are)")]
    NoWireFormat(String),
    #[error("no remote embedder for provider `{0}`: `openai` or `bedrock` (the offline embedder is built elsewhere)")]
    NoRemoteEmbedder(String),
    #[error("a dimension of 0 is not one")]
    ZeroDims,
    #[error("building the HTTP client for {base_url}: {reason}")]
    Client { base_url: String, reason: String },
}

/// What an embedder needs to know of its model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EmbedSpec {
    pub model: String,
    pub dims: u32,
    pub understands_text: bool,
    /// Longest image edge the model takes; larger images are scaled down first.
    pub max_image_edge: Option<u32>,
}

impl EmbedSpec {
    /// The model's entry in the built-in table: it must belong to `provider` and offer `dims`.
    pub fn known(
        provider: &'static str,
        model: &str,
        dims: u32,
    ) -> Result<EmbedSpec, EmbedSetupError> {
        let price = PriceTable::builtin().embedding_model(model)?;
        if price.provider != provider {
            return Err(EmbedSetupError::ForeignModel {
                model: model.to_string(),
                provider: price.provider.clone(),
                wanted: provider,
            });
        }
        if !price.dims.contains(&dims) {
            return Err(EmbedSetupError::Dims {
                model: model.to_string(),
                dims,
                allowed: price.dims.clone(),
            });
        }
        Ok(EmbedSpec {
            model: model.to_string(),
            dims,
            understands_text: price.understands_text,
            max_image_edge: price.max_image_edge,
        })
    }
}

/// Decoding or scaling our own resized JPEG failed: nothing was sent, nothing billed, and
/// trying again will not help.
fn invalid_image(message: String) -> ProviderError {
    err(FailureKind::InvalidImage, message, RateInfo::default())
}

/// The JPEG as the model takes it: unchanged when its long edge is within `max_edge` (the
/// usual case: resized images are far smaller), else scaled down to it, off the async threads.
pub(crate) async fn fit_image(
    jpeg: &[u8],
    max_edge: Option<u32>,
) -> Result<Cow<'_, [u8]>, ProviderError> {
    let Some(max_edge) = max_edge else {
        return Ok(Cow::Borrowed(jpeg));
    };
    let opts = PrepareOptions {
        max_edge,
        ..PrepareOptions::default()
    };
    let info = sightline_core::probe(jpeg, &opts)
        .map_err(|e| invalid_image(format!("the image to embed cannot be read: {e}")))?;
    if info.width.max(info.height) <= max_edge {
        return Ok(Cow::Borrowed(jpeg));
    }
    let bytes = jpeg.to_vec();
    let prepared = tokio::task::spawn_blocking(move || sightline_core::prepare(&bytes, &opts))
        .await
        .map_err(|e| invalid_image(format!("scaling the image to embed failed: {e}")))?
        .map_err(|e| {
            invalid_image(format!(
                "scaling the image to embed to {max_edge} px failed: {e}"
            ))
        })?;
    Ok(Cow::Owned(prepared.jpeg))
}

/// A JSON array of numbers as an L2-normalised vector of `dims` values. Anything else (a
/// wrong length, a value that is not a finite number, the zero vector) is an answer we cannot
/// store: the provider answered, so it is billed.
// The error every provider call returns, unboxed like it.
#[allow(clippy::result_large_err)]
pub(crate) fn unit_vector(
    values: Option<&Value>,
    dims: u32,
    rate: RateInfo,
) -> Result<Vec<f32>, ProviderError> {
    let bad = |why: String| bad_answer(why, rate, None);
    let items = values
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the provider's answer has no embedding array".into()))?;
    if items.len() != dims as usize {
        return Err(bad(format!(
            "the provider returned {} dimensions, not the {dims} asked for",
            items.len()
        )));
    }
    let mut vector = Vec::with_capacity(items.len());
    for v in items {
        match v.as_f64() {
            Some(x) if x.is_finite() => vector.push(x),
            _ => return Err(bad(format!("the embedding holds {v}, not a number"))),
        }
    }
    normalise(vector).ok_or_else(|| bad("the provider returned a zero vector".into()))
}

/// `v / |v|` as f32; None for the zero vector (it has no direction to compare).
pub(crate) fn normalise(v: Vec<f64>) -> Option<Vec<f32>> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return None;
    }
    Some(v.into_iter().map(|x| (x / norm) as f32).collect())
}

/// The refusal `embed_text` gives for a model whose text lands elsewhere than its images.
pub(crate) fn no_text(model: &str) -> ProviderError {
    err(
        FailureKind::InvalidOutput,
        format!("embedding model `{model}` does not embed text into its image space"),
        RateInfo::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sightline_core::retry::{classify, RetryClass};

    #[test]
    fn vectors_are_checked_and_normalised() {
        let v = unit_vector(Some(&json!([3.0, 4.0])), 2, RateInfo::default()).unwrap();
        assert_eq!(v, vec![0.6, 0.8]);
        for (body, dims) in [
            (json!([1.0, 2.0, 3.0]), 2),
            (json!([0.0, 0.0]), 2),
            (json!([1.0, "x"]), 2),
            (json!({"a": 1}), 2),
        ] {
            let e = unit_vector(Some(&body), dims, RateInfo::default()).unwrap_err();
            assert!(e.billed, "{body}: an answer was paid for");
            assert_eq!(classify(&e.kind), RetryClass::Permanent, "{body}");
        }
        assert!(unit_vector(None, 2, RateInfo::default()).is_err());
    }

    #[test]
    fn specs_come_from_the_price_table() {
        let titan = EmbedSpec::known("bedrock", "amazon.titan-embed-image-v1", 256).unwrap();
        assert_eq!(titan.max_image_edge, Some(2048));
        assert!(titan.understands_text);
        assert!(matches!(
            EmbedSpec::known("bedrock", "amazon.titan-embed-image-v1", 512),
            Err(EmbedSetupError::Dims { .. })
        ));
        assert!(matches!(
            EmbedSpec::known("openai", "amazon.titan-embed-image-v1", 256),
            Err(EmbedSetupError::ForeignModel { .. })
        ));
        assert!(matches!(
            EmbedSpec::known("bedrock", "amazon.titan-embed-text-v2:0", 256),
            Err(EmbedSetupError::UnknownModel(_))
        ));
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut out, image::ImageFormat::Jpeg)
            .unwrap();
        out.into_inner()
    }

    #[tokio::test]
    async fn images_over_the_models_edge_are_scaled_down_and_others_left_alone() {
        let small = jpeg(300, 200);
        assert!(matches!(
            fit_image(&small, Some(2048)).await.unwrap(),
            Cow::Borrowed(_)
        ));
        assert!(matches!(
            fit_image(&small, None).await.unwrap(),
            Cow::Borrowed(_)
        ));
        let big = jpeg(640, 320);
        let fitted = fit_image(&big, Some(256)).await.unwrap();
        let info = sightline_core::probe(&fitted, &PrepareOptions::default()).unwrap();
        assert_eq!((info.width, info.height), (256, 128));
        let e = fit_image(b"not a jpeg", Some(256)).await.unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidImage);
        assert!(!e.billed);
    }
}
