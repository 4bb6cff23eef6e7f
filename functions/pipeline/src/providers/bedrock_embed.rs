//! Bedrock embeddings through `InvokeModel`: Titan Multimodal Embeddings G1
//! (`amazon.titan-embed-image-v1`) and Nova Multimodal Embeddings
//! (`amazon.nova-2-multimodal-embeddings-v1:0`), images and text in one space.
//!
//! - Titan: `{inputImage: <base64> | inputText, embeddingConfig: {outputEmbeddingLength}}` →
//!   `{embedding, inputTextTokenCount}`; 1024, 384 or 256 dimensions; images up to 2048 px.
//! - Nova: `{taskType: "SINGLE_EMBEDDING", singleEmbeddingParams: {embeddingPurpose,
//!   embeddingDimension, image: {format: "jpeg", source: {bytes}} | text: {truncationMode,
//!   value}}}` → `{embeddings: [{embeddingType, embedding}]}`. Images are indexed with
//!   `GENERIC_INDEX`; text is a search for images, so it is embedded with `IMAGE_RETRIEVAL`,
//!   the purpose Nova's guide gives a query for images. Nova reports no token count.
//!
//! Images over the model's `max_image_edge` (price table) are scaled down first. Failures are
//! classified as the Converse provider's are ([`super::bedrock::failure`]).

use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_bedrockruntime::primitives::Blob;
use base64::Engine;
use serde_json::{json, Value};

use super::bedrock::{failure, request_error, BedrockRuntime};
use super::embed_common::{fit_image, no_text, unit_vector, EmbedSetupError, EmbedSpec};
use super::http::bad_answer;
use crate::ports::{Embedder, Embedding, ProviderError, RateInfo};

/// The request format a model speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedWire {
    Titan,
    Nova,
}

impl EmbedWire {
    /// By the model id's family.
    pub fn of(model: &str) -> Option<EmbedWire> {
        if model.starts_with("amazon.titan-embed-image") {
            Some(EmbedWire::Titan)
        } else if model.starts_with("amazon.nova") && model.contains("multimodal-embeddings") {
            Some(EmbedWire::Nova)
        } else {
            None
        }
    }

    /// The request body for an image (base64 JPEG) or a text.
    pub fn body(self, input: &Input<'_>, dims: u32) -> Value {
        match (self, input) {
            (EmbedWire::Titan, Input::Image(b64)) => json!({
                "inputImage": b64,
                "embeddingConfig": {"outputEmbeddingLength": dims},
            }),
            (EmbedWire::Titan, Input::Text(text)) => json!({
                "inputText": text,
                "embeddingConfig": {"outputEmbeddingLength": dims},
            }),
            (EmbedWire::Nova, Input::Image(b64)) => json!({
                "taskType": "SINGLE_EMBEDDING",
                "singleEmbeddingParams": {
                    "embeddingPurpose": "GENERIC_INDEX",
                    "embeddingDimension": dims,
                    "image": {"format": "jpeg", "source": {"bytes": b64}},
                },
            }),
            (EmbedWire::Nova, Input::Text(text)) => json!({
                "taskType": "SINGLE_EMBEDDING",
                "singleEmbeddingParams": {
                    "embeddingPurpose": "IMAGE_RETRIEVAL",
                    "embeddingDimension": dims,
                    // A query longer than the model takes keeps its start.
                    "text": {"truncationMode": "END", "value": text},
                },
            }),
        }
    }

    /// The vector and billing of an answer.
    // The error every provider call returns, unboxed like it.
    #[allow(clippy::result_large_err)]
    pub fn embedding(
        self,
        body: &Value,
        dims: u32,
        image: bool,
    ) -> Result<Embedding, ProviderError> {
        let rate = RateInfo::default();
        let (values, tokens) = match self {
            EmbedWire::Titan => (
                body.get("embedding"),
                body.get("inputTextTokenCount").and_then(Value::as_u64),
            ),
            EmbedWire::Nova => (body.pointer("/embeddings/0/embedding"), None),
        };
        let vector = unit_vector(values, dims, rate)?;
        Ok(Embedding {
            vector,
            input_tokens: if image { 0 } else { tokens.unwrap_or(0) },
            images: u64::from(image),
        })
    }
}

/// One input of an embedding call.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// Base64 of the JPEG.
    Image(&'a str),
    Text(&'a str),
}

/// Titan or Nova embeddings on Bedrock.
#[derive(Debug)]
pub struct BedrockEmbedder {
    runtime: BedrockRuntime,
    spec: EmbedSpec,
    wire: EmbedWire,
}

impl BedrockEmbedder {
    /// `model` must be a `bedrock` embedding model of the price table with a known request
    /// format, offering `dims`.
    pub fn new(
        runtime: BedrockRuntime,
        model: &str,
        dims: u32,
    ) -> Result<BedrockEmbedder, EmbedSetupError> {
        let spec = EmbedSpec::known("bedrock", model, dims)?;
        let wire =
            EmbedWire::of(model).ok_or_else(|| EmbedSetupError::NoWireFormat(model.into()))?;
        Ok(BedrockEmbedder {
            runtime,
            spec,
            wire,
        })
    }

    /// Through the AWS chain, loaded on the first call.
    pub fn from_env(
        model: &str,
        dims: u32,
        timeout: Duration,
    ) -> Result<BedrockEmbedder, EmbedSetupError> {
        Self::new(BedrockRuntime::from_env(timeout), model, dims)
    }

    /// Through a configuration the caller loaded.
    pub fn from_sdk_config(
        sdk: &SdkConfig,
        model: &str,
        dims: u32,
        timeout: Duration,
    ) -> Result<BedrockEmbedder, EmbedSetupError> {
        Self::new(BedrockRuntime::from_sdk_config(sdk, timeout), model, dims)
    }

    async fn invoke(&self, input: Input<'_>) -> Result<Embedding, ProviderError> {
        let body = serde_json::to_vec(&self.wire.body(&input, self.spec.dims))
            .map_err(|e| request_error(e.to_string()))?;
        let out = self
            .runtime
            .client()
            .await
            .invoke_model()
            .model_id(&self.spec.model)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(body))
            .send()
            .await
            .map_err(failure)?;
        // A 200 was answered and is billed, whatever its body holds.
        let answer: Value = serde_json::from_slice(out.body().as_ref()).map_err(|e| {
            bad_answer(
                format!("bedrock's embedding answer is not JSON: {e}"),
                RateInfo::default(),
                None,
            )
        })?;
        self.wire
            .embedding(&answer, self.spec.dims, matches!(input, Input::Image(_)))
    }
}

#[async_trait]
impl Embedder for BedrockEmbedder {
    fn name(&self) -> &str {
        "bedrock"
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
        let b64 = base64::engine::general_purpose::STANDARD.encode(&jpeg);
        self.invoke(Input::Image(&b64)).await
    }

    async fn embed_text(&self, text: &str) -> Result<Embedding, ProviderError> {
        if !self.spec.understands_text {
            return Err(no_text(&self.spec.model));
        }
        self.invoke(Input::Text(text)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TITAN: &str = "amazon.titan-embed-image-v1";
    const NOVA: &str = "amazon.nova-2-multimodal-embeddings-v1:0";

    #[test]
    fn models_map_to_their_wire_and_are_checked_against_the_table() {
        assert_eq!(EmbedWire::of(TITAN), Some(EmbedWire::Titan));
        assert_eq!(EmbedWire::of(NOVA), Some(EmbedWire::Nova));
        assert_eq!(EmbedWire::of("amazon.nova-lite-v1:0"), None);
        let t = Duration::from_secs(1);
        assert!(BedrockEmbedder::from_env(TITAN, 384, t).is_ok());
        assert!(BedrockEmbedder::from_env(NOVA, 3072, t).is_ok());
        assert!(matches!(
            BedrockEmbedder::from_env(TITAN, 3072, t),
            Err(EmbedSetupError::Dims { .. })
        ));
        assert!(matches!(
            BedrockEmbedder::from_env("clip-vit-b-32", 512, t),
            Err(EmbedSetupError::ForeignModel { .. })
        ));
    }

    #[test]
    fn titan_bodies_and_answers() {
        let b = EmbedWire::Titan.body(&Input::Image("AQID"), 256);
        assert_eq!(
            b,
            json!({"inputImage": "AQID", "embeddingConfig": {"outputEmbeddingLength": 256}})
        );
        let b = EmbedWire::Titan.body(&Input::Text("a red car"), 1024);
        assert_eq!(b["inputText"], "a red car");
        assert!(b.get("inputImage").is_none());
        let answer =
            json!({"embedding": [3.0, 0.0, 4.0], "inputTextTokenCount": 4, "message": null});
        let text = EmbedWire::Titan.embedding(&answer, 3, false).unwrap();
        assert_eq!(text.vector, vec![0.6, 0.0, 0.8]);
        assert_eq!((text.input_tokens, text.images), (4, 0));
        let image = EmbedWire::Titan.embedding(&answer, 3, true).unwrap();
        assert_eq!((image.input_tokens, image.images), (0, 1));
        let wrong = EmbedWire::Titan.embedding(&answer, 256, true).unwrap_err();
        assert!(
            wrong.billed,
            "an answer of the wrong size was still paid for"
        );
    }

    #[test]
    fn nova_bodies_and_answers() {
        let b = EmbedWire::Nova.body(&Input::Image("AQID"), 1024);
        assert_eq!(b["taskType"], "SINGLE_EMBEDDING");
        let p = &b["singleEmbeddingParams"];
        assert_eq!(p["embeddingPurpose"], "GENERIC_INDEX");
        assert_eq!(p["embeddingDimension"], 1024);
        assert_eq!(
            p["image"],
            json!({"format": "jpeg", "source": {"bytes": "AQID"}})
        );
        let b = EmbedWire::Nova.body(&Input::Text("sunset"), 256);
        let p = &b["singleEmbeddingParams"];
        assert_eq!(p["embeddingPurpose"], "IMAGE_RETRIEVAL");
        assert_eq!(
            p["text"],
            json!({"truncationMode": "END", "value": "sunset"})
        );
        let answer = json!({"embeddings": [{"embeddingType": "TEXT", "embedding": [0.0, -2.0]}]});
        let e = EmbedWire::Nova.embedding(&answer, 2, false).unwrap();
        assert_eq!(e.vector, vec![0.0, -1.0]);
        assert_eq!(e.input_tokens, 0, "Nova reports no token count");
        assert!(EmbedWire::Nova
            .embedding(&json!({"embeddings": []}), 2, true)
            .is_err());
    }
}
