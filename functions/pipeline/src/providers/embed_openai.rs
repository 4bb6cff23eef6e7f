//! OpenAI-compatible multimodal embeddings: `POST {base}/embeddings` with
//! `input: [{"type": "image", "data": <base64 JPEG>}]` or `[{"type": "text", "data": …}]`, the
//! shape CLIP-serving gateways take, with the model and dimension configured. The answer is
//! OpenAI's: `{data: [{embedding, index}], model, usage: {prompt_tokens, total_tokens}}`.
//!
//! Failures are classified as the chat path's are (the shared HTTP exchange): 429 with its
//! Retry-After and the `x-ratelimit-*` headers, 5xx and timeouts transient, other 4xx
//! permanent; a 200 without a usable vector is billed invalid output.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use serde_json::{json, Value};
use sightline_core::pricing::PriceTable;

use super::embed_common::{fit_image, no_text, unit_vector, EmbedSetupError, EmbedSpec};
use super::http::{client, exchange, Reply};
use super::openai::OpenAiWire;
use crate::ports::{Embedder, Embedding, ProviderError};

#[derive(Clone)]
pub struct OpenAiEmbedder {
    client: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    spec: EmbedSpec,
}

impl std::fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("OpenAiEmbedder")
            .field("base_url", &self.base_url)
            .field("model", &self.spec.model)
            .field("dims", &self.spec.dims)
            .finish()
    }
}

impl OpenAiEmbedder {
    /// `base_url` as for chat (`https://gateway/v1`: requests go to `{base}/embeddings`);
    /// `api_key` None for a gateway without auth. A model in the price table must be an
    /// `openai` embedding model offering `dims` (its image-edge limit then applies); a model the
    /// table does not know is taken as configured (a gateway's own model: it understands text,
    /// images are sent as they are).
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        model: &str,
        dims: u32,
        timeout: Duration,
    ) -> Result<OpenAiEmbedder, EmbedSetupError> {
        if dims == 0 {
            return Err(EmbedSetupError::ZeroDims);
        }
        let spec = match PriceTable::builtin().embedding_model(model) {
            Ok(_) => EmbedSpec::known("openai", model, dims)?,
            Err(_) => EmbedSpec {
                model: model.to_string(),
                dims,
                understands_text: true,
                max_image_edge: None,
            },
        };
        let base_url = base_url.trim_end_matches('/').to_string();
        let client = client(timeout).map_err(|e| EmbedSetupError::Client {
            base_url: base_url.clone(),
            reason: e.to_string(),
        })?;
        Ok(OpenAiEmbedder {
            client,
            base_url,
            api_key: api_key.filter(|k| !k.trim().is_empty()),
            spec,
        })
    }

    /// The request body for one input part.
    pub(crate) fn body(&self, kind: &str, data: &str) -> Value {
        json!({
            "model": self.spec.model,
            "input": [{"type": kind, "data": data}],
            "dimensions": self.spec.dims,
            "encoding_format": "float",
        })
    }

    async fn embed(&self, body: Value, image: bool) -> Result<Embedding, ProviderError> {
        let url = format!("{}/embeddings", self.base_url);
        let mut request = self.client.post(&url).json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let Reply { body, rate } = exchange(request, &OpenAiWire).await?;
        embedding_of(&body, self.spec.dims, image, rate)
    }
}

/// The first vector of an `/embeddings` answer. Text inputs bill `usage.prompt_tokens`; an
/// image bills as one image (a gateway's token count for it is not a text price).
// The error every provider call returns, unboxed like it.
#[allow(clippy::result_large_err)]
pub(crate) fn embedding_of(
    body: &Value,
    dims: u32,
    image: bool,
    rate: crate::ports::RateInfo,
) -> Result<Embedding, ProviderError> {
    let first = body.get("data").and_then(Value::as_array).and_then(|d| {
        d.iter()
            .find(|e| e.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
    });
    let vector = unit_vector(first.and_then(|e| e.get("embedding")), dims, rate)?;
    let tokens = body
        .pointer("/usage/prompt_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(Embedding {
        vector,
        input_tokens: if image { 0 } else { tokens },
        images: u64::from(image),
    })
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn name(&self) -> &str {
        "openai"
    }

    fn model(&self) -> &str {
        &self.spec.model
    }

    fn dims(&self) -> u32 {
        self.spec.dims
    }

    fn understands_text(&self) -> bool {
        self.spec.understands_text
    }

    async fn embed_image(&self, jpeg: &[u8]) -> Result<Embedding, ProviderError> {
        let jpeg = fit_image(jpeg, self.spec.max_image_edge).await?;
        let data = base64::engine::general_purpose::STANDARD.encode(&jpeg);
        self.embed(self.body("image", &data), true).await
    }

    async fn embed_text(&self, text: &str) -> Result<Embedding, ProviderError> {
        if !self.spec.understands_text {
            return Err(no_text(&self.spec.model));
        }
        self.embed(self.body("text", text), false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::RateInfo;

    #[test]
    fn the_body_is_the_multimodal_input_shape_with_model_and_dimension() {
        let e = OpenAiEmbedder::new(
            "http://gw/v1/",
            Some("  ".into()),
            "my-clip",
            768,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(e.base_url, "http://gw/v1");
        assert!(e.api_key.is_none(), "a blank key is no key");
        assert_eq!(
            e.dims(),
            768,
            "a model the table does not know is taken as configured"
        );
        let b = e.body("image", "AQID");
        assert_eq!(b["input"][0]["type"], "image");
        assert_eq!(b["input"][0]["data"], "AQID");
        assert_eq!(b["dimensions"], 768);
        assert_eq!(b["model"], "my-clip");
        assert!(!format!("{e:?}").contains("key"));
    }

    #[test]
    fn answers_become_unit_vectors_with_their_billing() {
        let body = json!({"data": [{"object": "embedding", "index": 0, "embedding": [0.0, 2.0]}],
            "model": "m", "usage": {"prompt_tokens": 7, "total_tokens": 7}});
        let text = embedding_of(&body, 2, false, RateInfo::default()).unwrap();
        assert_eq!(text.vector, vec![0.0, 1.0]);
        assert_eq!((text.input_tokens, text.images), (7, 0));
        let image = embedding_of(&body, 2, true, RateInfo::default()).unwrap();
        assert_eq!((image.input_tokens, image.images), (0, 1));
        let short = embedding_of(&body, 3, true, RateInfo::default()).unwrap_err();
        assert!(
            short.billed && short.message.contains("2 dimensions"),
            "{short}"
        );
        assert!(embedding_of(&json!({"data": []}), 2, true, RateInfo::default()).is_err());
    }
}
