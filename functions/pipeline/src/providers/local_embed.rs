//! The offline embedder: sightline's visual embedding of the resized JPEG ($0, no network).
//! It knows no words: text search over it ranks by the analysis text instead.

use async_trait::async_trait;
use sightline_core::embed::{visual_embedding, LOCAL_EMBED_DIMS, LOCAL_EMBED_MODEL};
use sightline_core::limiter::ProviderView;
use sightline_core::retry::FailureKind;

use crate::ports::{Embedder, Embedding, ProviderError};

#[derive(Debug, Clone, Copy, Default)]
pub struct LocalEmbedder;

fn permanent(message: String) -> ProviderError {
    ProviderError {
        kind: FailureKind::InvalidImage,
        message,
        rate: ProviderView::default(),
        usage: None,
        billed: false,
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn name(&self) -> &str {
        "local"
    }

    fn model(&self) -> &str {
        LOCAL_EMBED_MODEL
    }

    fn dims(&self) -> u32 {
        LOCAL_EMBED_DIMS as u32
    }

    fn understands_text(&self) -> bool {
        false
    }

    fn is_paid(&self) -> bool {
        false
    }

    async fn embed_image(&self, jpeg: &[u8]) -> Result<Embedding, ProviderError> {
        let bytes = jpeg.to_vec();
        let vector = tokio::task::spawn_blocking(move || visual_embedding(&bytes))
            .await
            .map_err(|e| permanent(format!("visual embedding task: {e}")))?
            .map_err(|e| permanent(format!("visual embedding: {e}")))?;
        Ok(Embedding {
            vector,
            input_tokens: 0,
            images: 1,
        })
    }

    async fn embed_text(&self, _text: &str) -> Result<Embedding, ProviderError> {
        Err(permanent(format!(
            "{LOCAL_EMBED_MODEL} embeds images only; text search uses keywords"
        )))
    }
}
