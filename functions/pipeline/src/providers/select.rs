//! The one provider factory: which provider the settings and the configured keys ask for.

use std::sync::Arc;
use std::time::Duration;

use sightline_core::pricing::PriceTable;

use super::anthropic::AnthropicProvider;
use super::anthropic_batch::AnthropicBatchProvider;
use super::embed_openai::OpenAiEmbedder;
use super::gen_local::LocalGenerator;
use super::gen_openai::OpenAiGenerator;
use super::local::LocalAnalyzer;
use super::local_embed::LocalEmbedder;
use super::openai::OpenAiProvider;
use super::openai_batch::OpenAiBatchProvider;
use crate::ports::{BatchProvider, Embedder, ImageGenerator, VisionProvider};
use crate::settings::{EmbedderKind, ProviderKind, Settings};

#[derive(Debug, thiserror::Error)]
pub enum ProviderSetupError {
    #[error("provider `{}` needs an API key: set {} (on Lambda, or {} naming an SSM parameter)", .0.as_str(), key_variable(*.0).unwrap_or("its key"), key_param_variable(*.0).unwrap_or("a variable"))]
    NeedsKey(ProviderKind),
    /// The Messages API serves Claude models only, Bedrock the ids of its catalogue; a chain
    /// that leaves the provider would fail image by image, so it fails at start.
    #[error("provider `{provider}` cannot call model `{model}` (a `{model_provider}` model): fallback chains stay within one provider")]
    ForeignModel {
        provider: &'static str,
        model: String,
        model_provider: String,
    },
    #[error("building the HTTP client for {base_url}: {reason}")]
    Client { base_url: String, reason: String },
    #[error("embedder: {0}")]
    Embedding(String),
    /// This build left the provider's client out (a Cargo feature).
    #[error("provider `{provider}` is not in this build (enable the `{feature}` feature of sightline-pipeline)")]
    NotBuilt {
        provider: &'static str,
        feature: &'static str,
    },
    #[error("embedder: {0}")]
    Embedder(#[from] super::embed_common::EmbedSetupError),
    #[error("image generation: {0}")]
    Generation(String),
}

/// The variable that holds a paid provider's key, locally and on Lambda; None for the
/// providers that take none (the local analyzer; Bedrock, which uses the AWS credential chain).
pub fn key_variable(kind: ProviderKind) -> Option<&'static str> {
    match kind {
        ProviderKind::Anthropic => Some("ANTHROPIC_API_KEY"),
        ProviderKind::OpenAi => Some("OPENAI_API_KEY"),
        ProviderKind::Local | ProviderKind::Bedrock => None,
    }
}

/// On Lambda: the variable naming the SSM parameter that holds a paid provider's key (None
/// for the providers that take no key).
pub fn key_param_variable(kind: ProviderKind) -> Option<&'static str> {
    match kind {
        ProviderKind::Anthropic => Some("SIGHTLINE_ANTHROPIC_KEY_PARAM"),
        ProviderKind::OpenAi => Some("SIGHTLINE_OPENAI_KEY_PARAM"),
        ProviderKind::Local | ProviderKind::Bedrock => None,
    }
}

/// Whether the provider is called with a key of ours.
fn takes_key(kind: ProviderKind) -> bool {
    key_variable(kind).is_some()
}

/// The paid providers' keys, as configured (never printed).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProviderKeys {
    pub openai: Option<String>,
    pub anthropic: Option<String>,
}

impl std::fmt::Debug for ProviderKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderKeys")
            .field("openai", &self.openai.is_some())
            .field("anthropic", &self.anthropic.is_some())
            .finish()
    }
}

impl ProviderKeys {
    /// `OPENAI_API_KEY` and `ANTHROPIC_API_KEY` as `get` finds them (blank = unset).
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> ProviderKeys {
        let mut keys = ProviderKeys::default();
        for kind in ProviderKind::ALL {
            if let Some(variable) = key_variable(kind) {
                keys.set(kind, get(variable));
            }
        }
        keys
    }

    /// Record a key (trimmed; blank = unset). The local analyzer and Bedrock have none.
    pub fn set(&mut self, kind: ProviderKind, key: Option<String>) {
        let key = key.map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
        match kind {
            ProviderKind::OpenAi => self.openai = key,
            ProviderKind::Anthropic => self.anthropic = key,
            ProviderKind::Local | ProviderKind::Bedrock => {}
        }
    }

    pub fn get(&self, kind: ProviderKind) -> Option<&str> {
        match kind {
            ProviderKind::OpenAi => self.openai.as_deref(),
            ProviderKind::Anthropic => self.anthropic.as_deref(),
            ProviderKind::Local | ProviderKind::Bedrock => None,
        }
    }
}

/// The paid providers the settings may use, in order of preference: the setting when given;
/// unset, the configured model's own provider (from the price table) when we have a client for
/// it, then OpenAI-compatible (gateways serve any model). A Bedrock model id names Bedrock
/// alone (no gateway takes it). A caller reading keys from a slow store (SSM) reads them in
/// this order and stops at the first it finds.
pub fn paid_candidates(settings: &Settings) -> Vec<ProviderKind> {
    match settings.provider {
        Some(ProviderKind::Local) => Vec::new(),
        Some(kind) => vec![kind],
        None => {
            let own = PriceTable::builtin()
                .model(&settings.model)
                .ok()
                .and_then(|m| ProviderKind::parse(&m.provider));
            match own {
                Some(ProviderKind::Anthropic) => {
                    vec![ProviderKind::Anthropic, ProviderKind::OpenAi]
                }
                Some(ProviderKind::Bedrock) => vec![ProviderKind::Bedrock],
                _ => vec![ProviderKind::OpenAi],
            }
        }
    }
}

/// The provider kind the settings resolve to with these keys: the setting when given, else the
/// first of [`paid_candidates`] whose key is set (or that takes none: Bedrock's credentials come
/// from the AWS chain when it is called), else the offline analyzer.
pub fn provider_kind(settings: &Settings, keys: &ProviderKeys) -> ProviderKind {
    if let Some(kind) = settings.provider {
        return kind;
    }
    paid_candidates(settings)
        .into_iter()
        .find(|k| !takes_key(*k) || keys.get(*k).is_some())
        .unwrap_or(ProviderKind::Local)
}

/// The kind [`build_provider`] will build, or why it cannot (a chosen paid provider whose key
/// is missing, a model the provider cannot serve).
pub fn resolve(
    settings: &Settings,
    keys: &ProviderKeys,
) -> Result<ProviderKind, ProviderSetupError> {
    let kind = provider_kind(settings, keys);
    if takes_key(kind) && keys.get(kind).is_none() {
        return Err(ProviderSetupError::NeedsKey(kind));
    }
    if matches!(kind, ProviderKind::Anthropic | ProviderKind::Bedrock) {
        let table = PriceTable::builtin();
        for model in settings.model_chain() {
            // Unknown models are refused by the settings' validation already.
            if let Ok(price) = table.model(&model) {
                if price.provider != kind.as_str() {
                    return Err(ProviderSetupError::ForeignModel {
                        provider: kind.as_str(),
                        model,
                        model_provider: price.provider.clone(),
                    });
                }
            }
        }
    }
    Ok(kind)
}

/// Build the provider for these settings and keys (read by the caller from the environment,
/// or from SSM on Lambda).
pub fn build_provider(
    settings: &Settings,
    keys: &ProviderKeys,
) -> Result<Arc<dyn VisionProvider>, ProviderSetupError> {
    let kind = resolve(settings, keys)?;
    let client_err = |base_url: &str, e: anyhow::Error| ProviderSetupError::Client {
        base_url: base_url.to_string(),
        reason: e.to_string(),
    };
    let key = keys.get(kind).unwrap_or_default();
    Ok(match kind {
        ProviderKind::Local => Arc::new(LocalAnalyzer),
        ProviderKind::OpenAi => Arc::new(
            OpenAiProvider::new(&settings.openai_base_url, key, settings.provider_timeout)
                .map_err(|e| client_err(&settings.openai_base_url, e))?,
        ),
        ProviderKind::Anthropic => Arc::new(
            AnthropicProvider::new(&settings.anthropic_base_url, key, settings.provider_timeout)
                .map_err(|e| client_err(&settings.anthropic_base_url, e))?,
        ),
        ProviderKind::Bedrock => bedrock_provider(settings)?,
    })
}

/// Bedrock's Converse client: credentials, region and endpoint from the AWS chain
/// (`AWS_REGION`, `AWS_PROFILE`, the Lambda role, `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`), read
/// when the first image is analysed.
#[cfg(feature = "bedrock")]
fn bedrock_provider(settings: &Settings) -> Result<Arc<dyn VisionProvider>, ProviderSetupError> {
    Ok(Arc::new(super::bedrock::BedrockProvider::from_env(
        settings.provider_timeout,
    )))
}

#[cfg(not(feature = "bedrock"))]
fn bedrock_provider(_: &Settings) -> Result<Arc<dyn VisionProvider>, ProviderSetupError> {
    Err(ProviderSetupError::NotBuilt {
        provider: "bedrock",
        feature: "bedrock",
    })
}

/// A remote embedder: `openai` (an OpenAI-compatible `/embeddings`, a CLIP gateway; `api_key`
/// optional) or `bedrock` (Titan or Nova Multimodal Embeddings through the AWS chain;
/// `base_url` and `api_key` unused). The offline embedder is not built here. Fails for a model
/// or dimension the price table refuses.
pub fn build_embedder_for(
    provider: &str,
    model: &str,
    dims: u32,
    base_url: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> Result<Arc<dyn Embedder>, ProviderSetupError> {
    match ProviderKind::parse(provider) {
        Some(ProviderKind::OpenAi) => Ok(Arc::new(OpenAiEmbedder::new(
            base_url,
            api_key.map(str::to_string),
            model,
            dims,
            timeout,
        )?)),
        Some(ProviderKind::Bedrock) => bedrock_embedder(model, dims, timeout),
        _ => {
            Err(super::embed_common::EmbedSetupError::NoRemoteEmbedder(provider.to_string()).into())
        }
    }
}

#[cfg(feature = "bedrock")]
fn bedrock_embedder(
    model: &str,
    dims: u32,
    timeout: Duration,
) -> Result<Arc<dyn Embedder>, ProviderSetupError> {
    Ok(Arc::new(super::bedrock_embed::BedrockEmbedder::from_env(
        model, dims, timeout,
    )?))
}

#[cfg(not(feature = "bedrock"))]
fn bedrock_embedder(_: &str, _: u32, _: Duration) -> Result<Arc<dyn Embedder>, ProviderSetupError> {
    Err(ProviderSetupError::NotBuilt {
        provider: "bedrock",
        feature: "bedrock",
    })
}

/// The batch API of the provider [`build_provider`] would build for these settings and keys
/// (same resolution, base URL, key and timeout); None for the local analyzer, which has none,
/// and for Bedrock, whose images are analysed in real time.
pub fn build_batch_provider(
    settings: &Settings,
    keys: &ProviderKeys,
) -> Result<Option<Arc<dyn BatchProvider>>, ProviderSetupError> {
    let kind = resolve(settings, keys)?;
    let client_err = |base_url: &str, e: anyhow::Error| ProviderSetupError::Client {
        base_url: base_url.to_string(),
        reason: e.to_string(),
    };
    let key = keys.get(kind).unwrap_or_default();
    Ok(match kind {
        // Bedrock's batch inference (S3 manifests and jobs) is not implemented: real time only.
        ProviderKind::Local | ProviderKind::Bedrock => None,
        ProviderKind::OpenAi => Some(Arc::new(
            OpenAiBatchProvider::new(&settings.openai_base_url, key, settings.provider_timeout)
                .map_err(|e| client_err(&settings.openai_base_url, e))?,
        )),
        ProviderKind::Anthropic => Some(Arc::new(
            AnthropicBatchProvider::new(
                &settings.anthropic_base_url,
                key,
                settings.provider_timeout,
            )
            .map_err(|e| client_err(&settings.anthropic_base_url, e))?,
        )),
    })
}

/// The generator for an image model, by its provider in the price table's `[[image_models]]`:
/// `local` (offline, $0), `openai` (the Images API at `openai_base_url`, needs the OpenAI key)
/// or `bedrock` (Nova Canvas, Titan Image Generator v2; the AWS chain). A model the table does
/// not price is refused, so nothing is generated that the ledger could not book.
pub fn build_generator(
    settings: &Settings,
    keys: &ProviderKeys,
    prices: &PriceTable,
    model: &str,
) -> Result<Arc<dyn ImageGenerator>, ProviderSetupError> {
    let price = prices
        .image_model(model)
        .map_err(|e| ProviderSetupError::Generation(e.to_string()))?;
    let timeout = settings.generation_timeout();
    Ok(match price.provider.as_str() {
        "local" => Arc::new(LocalGenerator),
        "openai" => {
            let key = keys
                .get(ProviderKind::OpenAi)
                .ok_or(ProviderSetupError::NeedsKey(ProviderKind::OpenAi))?;
            Arc::new(
                OpenAiGenerator::new(&settings.openai_base_url, key, timeout).map_err(|e| {
                    ProviderSetupError::Client {
                        base_url: settings.openai_base_url.clone(),
                        reason: e.to_string(),
                    }
                })?,
            )
        }
        "bedrock" => bedrock_generator(model, timeout)?,
        other => {
            return Err(ProviderSetupError::Generation(format!(
                "image model {model:?} is priced for provider {other:?}, which has no generator"
            )))
        }
    })
}

#[cfg(feature = "bedrock")]
fn bedrock_generator(
    model: &str,
    timeout: Duration,
) -> Result<Arc<dyn ImageGenerator>, ProviderSetupError> {
    if !super::gen_bedrock::supports(model) {
        return Err(ProviderSetupError::Generation(format!(
            "{model} is not a Nova Canvas or Titan Image Generator model"
        )));
    }
    Ok(Arc::new(super::gen_bedrock::BedrockGenerator::from_env(
        timeout,
    )))
}

#[cfg(not(feature = "bedrock"))]
fn bedrock_generator(_: &str, _: Duration) -> Result<Arc<dyn ImageGenerator>, ProviderSetupError> {
    Err(ProviderSetupError::NotBuilt {
        provider: "bedrock",
        feature: "bedrock",
    })
}

/// The embedder the settings ask for (None when it is off).
pub fn build_embedder(
    settings: &Settings,
    keys: &ProviderKeys,
) -> Result<Option<Arc<dyn Embedder>>, ProviderSetupError> {
    let embedding = settings
        .embedding()
        .map_err(|e| ProviderSetupError::Embedding(e.to_string()))?;
    let Some((model, dims)) = embedding else {
        return Ok(None);
    };
    let base_url = settings
        .embedding_base_url
        .as_deref()
        .unwrap_or(&settings.openai_base_url);
    Ok(Some(match settings.embedder {
        EmbedderKind::Off => return Ok(None),
        EmbedderKind::Local => Arc::new(LocalEmbedder),
        EmbedderKind::OpenAi => build_embedder_for(
            "openai",
            &model,
            dims,
            base_url,
            keys.get(ProviderKind::OpenAi),
            settings.provider_timeout,
        )?,
        EmbedderKind::Bedrock => build_embedder_for(
            "bedrock",
            &model,
            dims,
            base_url,
            None,
            settings.provider_timeout,
        )?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(openai: Option<&str>, anthropic: Option<&str>) -> ProviderKeys {
        let mut k = ProviderKeys::default();
        k.set(ProviderKind::OpenAi, openai.map(str::to_string));
        k.set(ProviderKind::Anthropic, anthropic.map(str::to_string));
        k
    }

    #[test]
    fn the_generator_follows_the_image_models_provider() {
        let s = Settings::default();
        let prices = PriceTable::builtin();
        let local = build_generator(&s, &keys(None, None), prices, "local-canvas").unwrap();
        assert_eq!(local.name(), "local");
        assert!(!local.is_paid());
        assert!(matches!(
            build_generator(&s, &keys(None, None), prices, "gpt-image-1"),
            Err(ProviderSetupError::NeedsKey(ProviderKind::OpenAi))
        ));
        let openai = build_generator(&s, &keys(Some("k"), None), prices, "gpt-image-1").unwrap();
        assert_eq!(openai.name(), "openai");
        assert!(openai.is_paid());
        // Not an image model: refused at start, not image by image.
        assert!(matches!(
            build_generator(&s, &keys(Some("k"), None), prices, "gpt-4.1"),
            Err(ProviderSetupError::Generation(_))
        ));
    }

    #[test]
    fn the_provider_follows_the_setting_else_the_key() {
        let mut s = Settings::default();
        assert!(!build_provider(&s, &keys(None, None)).unwrap().is_paid());
        assert!(build_provider(&s, &keys(Some("sk-x"), None))
            .unwrap()
            .is_paid());
        assert!(!build_provider(&s, &keys(Some("  "), None))
            .unwrap()
            .is_paid());
        s.provider = Some(ProviderKind::Local);
        assert!(!build_provider(&s, &keys(Some("sk-x"), Some("sk-ant")))
            .unwrap()
            .is_paid());
        s.provider = Some(ProviderKind::OpenAi);
        assert!(matches!(
            build_provider(&s, &keys(None, Some("sk-ant"))),
            Err(ProviderSetupError::NeedsKey(ProviderKind::OpenAi))
        ));
    }

    #[test]
    fn unset_provider_picks_the_models_own_provider_when_its_key_is_set() {
        let gpt = Settings::default();
        let claude = Settings {
            model: "claude-haiku-4-5".into(),
            ..Settings::default()
        };
        let both = keys(Some("sk-x"), Some("sk-ant"));
        assert_eq!(provider_kind(&claude, &both), ProviderKind::Anthropic);
        assert_eq!(provider_kind(&gpt, &both), ProviderKind::OpenAi);
        // Without the model's own key: an OpenAI-compatible gateway may still serve it.
        let openai_only = keys(Some("sk-x"), None);
        assert_eq!(provider_kind(&claude, &openai_only), ProviderKind::OpenAi);
        // An Anthropic key does not make a GPT model callable.
        let anthropic_only = keys(None, Some("sk-ant"));
        assert_eq!(provider_kind(&gpt, &anthropic_only), ProviderKind::Local);
        assert_eq!(
            provider_kind(&claude, &anthropic_only),
            ProviderKind::Anthropic
        );
        assert_eq!(
            build_provider(&claude, &anthropic_only).unwrap().name(),
            "anthropic"
        );
        assert_eq!(
            paid_candidates(&claude),
            vec![ProviderKind::Anthropic, ProviderKind::OpenAi]
        );
        assert_eq!(paid_candidates(&gpt), vec![ProviderKind::OpenAi]);
    }

    #[test]
    fn explicit_anthropic_without_its_key_names_the_variable() {
        let s = Settings {
            provider: Some(ProviderKind::Anthropic),
            model: "claude-haiku-4-5".into(),
            ..Settings::default()
        };
        let err = build_provider(&s, &keys(Some("sk-x"), None))
            .err()
            .expect("no key");
        assert!(matches!(
            err,
            ProviderSetupError::NeedsKey(ProviderKind::Anthropic)
        ));
        let msg = err.to_string();
        assert!(msg.contains("ANTHROPIC_API_KEY"), "{msg}");
        assert!(msg.contains("SIGHTLINE_ANTHROPIC_KEY_PARAM"), "{msg}");
    }

    #[test]
    fn an_anthropic_chain_with_a_model_of_another_provider_is_refused() {
        let s = Settings {
            provider: Some(ProviderKind::Anthropic),
            model: "claude-haiku-4-5".into(),
            fallback_models: vec!["claude-sonnet-4-5".into(), "gpt-4o".into()],
            ..Settings::default()
        };
        let err = build_provider(&s, &keys(None, Some("sk-ant")))
            .err()
            .expect("foreign fallback");
        assert!(
            matches!(&err, ProviderSetupError::ForeignModel { model, .. } if model == "gpt-4o"),
            "{err}"
        );
    }

    #[test]
    fn the_batch_provider_is_the_real_time_providers_and_local_has_none() {
        let s = Settings::default();
        assert!(build_batch_provider(&s, &keys(None, None))
            .unwrap()
            .is_none());
        let openai = build_batch_provider(&s, &keys(Some("sk-x"), None))
            .unwrap()
            .expect("a batch api");
        assert_eq!(openai.name(), "openai");
        let claude = Settings {
            model: "claude-haiku-4-5".into(),
            ..Settings::default()
        };
        let anthropic = build_batch_provider(&claude, &keys(None, Some("sk-ant")))
            .unwrap()
            .expect("a batch api");
        assert_eq!(anthropic.name(), "anthropic");
        assert_eq!(
            anthropic.limits(),
            sightline_core::batch::ANTHROPIC_BATCH_LIMITS
        );
        let explicit = Settings {
            provider: Some(ProviderKind::OpenAi),
            ..Settings::default()
        };
        assert!(matches!(
            build_batch_provider(&explicit, &keys(None, None)),
            Err(ProviderSetupError::NeedsKey(ProviderKind::OpenAi))
        ));
    }

    const BEDROCK_CLAUDE: &str = "global.anthropic.claude-haiku-4-5-20251001-v1:0";

    #[test]
    fn bedrock_takes_no_key_and_a_bedrock_model_picks_it() {
        let explicit = Settings {
            provider: Some(ProviderKind::Bedrock),
            model: "amazon.nova-lite-v1:0".into(),
            ..Settings::default()
        };
        assert_eq!(
            resolve(&explicit, &keys(None, None)).unwrap(),
            ProviderKind::Bedrock
        );
        // A Bedrock id names Bedrock: no key is looked for, no gateway is tried.
        let by_model = Settings {
            model: BEDROCK_CLAUDE.into(),
            ..Settings::default()
        };
        assert_eq!(paid_candidates(&by_model), vec![ProviderKind::Bedrock]);
        assert_eq!(
            provider_kind(&by_model, &keys(Some("sk-x"), Some("sk-ant"))),
            ProviderKind::Bedrock
        );
        assert_eq!(key_variable(ProviderKind::Bedrock), None);
        assert_eq!(key_param_variable(ProviderKind::Bedrock), None);
        // Real time only.
        assert!(build_batch_provider(&by_model, &keys(None, None))
            .unwrap()
            .is_none());
        let built = build_provider(&by_model, &keys(None, None));
        #[cfg(feature = "bedrock")]
        {
            let p = built.unwrap();
            assert_eq!(p.name(), "bedrock");
            assert!(p.is_paid());
        }
        #[cfg(not(feature = "bedrock"))]
        assert!(matches!(
            built,
            Err(ProviderSetupError::NotBuilt {
                provider: "bedrock",
                ..
            })
        ));
    }

    #[test]
    fn bedrock_chains_stay_on_bedrock_and_anthropic_refuses_bedrock_ids() {
        let mixed = Settings {
            provider: Some(ProviderKind::Bedrock),
            model: BEDROCK_CLAUDE.into(),
            fallback_models: vec!["amazon.nova-pro-v1:0".into(), "claude-haiku-4-5".into()],
            ..Settings::default()
        };
        let err = resolve(&mixed, &keys(None, None)).unwrap_err();
        assert!(
            matches!(&err, ProviderSetupError::ForeignModel { model, .. } if model == "claude-haiku-4-5"),
            "{err}"
        );
        let anthropic = Settings {
            provider: Some(ProviderKind::Anthropic),
            model: BEDROCK_CLAUDE.into(),
            ..Settings::default()
        };
        assert!(matches!(
            resolve(&anthropic, &keys(None, Some("sk-ant"))),
            Err(ProviderSetupError::ForeignModel { .. })
        ));
    }

    #[test]
    fn embedders_are_built_for_remote_providers_only() {
        let timeout = Duration::from_secs(5);
        let clip = build_embedder_for(
            "openai",
            "clip-vit-b-32",
            512,
            "http://127.0.0.1:9/v1",
            None,
            timeout,
        )
        .unwrap();
        assert_eq!(
            (clip.name(), clip.model(), clip.dims()),
            ("openai", "clip-vit-b-32", 512)
        );
        assert!(clip.understands_text());
        // A dimension the table does not list for the model is refused at start.
        assert!(
            build_embedder_for("openai", "clip-vit-b-32", 768, "http://x", None, timeout).is_err()
        );
        assert!(matches!(
            build_embedder_for("local", "sightline-visual-v1", 256, "", None, timeout),
            Err(ProviderSetupError::Embedder(_))
        ));
        let titan = build_embedder_for(
            "bedrock",
            "amazon.titan-embed-image-v1",
            384,
            "",
            None,
            timeout,
        );
        #[cfg(feature = "bedrock")]
        assert_eq!(titan.unwrap().dims(), 384);
        #[cfg(not(feature = "bedrock"))]
        assert!(matches!(titan, Err(ProviderSetupError::NotBuilt { .. })));
    }

    #[test]
    fn keys_are_read_trimmed_and_never_printed() {
        let k = ProviderKeys::from_lookup(&|name| match name {
            "OPENAI_API_KEY" => Some(" sk-secret ".into()),
            "ANTHROPIC_API_KEY" => Some("  ".into()),
            _ => None,
        });
        assert_eq!(k.get(ProviderKind::OpenAi), Some("sk-secret"));
        assert_eq!(k.get(ProviderKind::Anthropic), None);
        assert!(!format!("{k:?}").contains("secret"));
    }
}
