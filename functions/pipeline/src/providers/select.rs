//! The one provider factory: which provider the settings and the configured key ask for.

use std::sync::Arc;

use super::local::LocalAnalyzer;
use super::openai::OpenAiProvider;
use crate::ports::VisionProvider;
use crate::settings::{ProviderKind, Settings};

#[derive(Debug, thiserror::Error)]
pub enum ProviderSetupError {
    #[error("provider `openai` needs an API key: set OPENAI_API_KEY (on Lambda, or SIGHTLINE_OPENAI_KEY_PARAM naming an SSM parameter)")]
    NeedsKey,
    #[error("building the HTTP client for {base_url}: {reason}")]
    Client { base_url: String, reason: String },
}

/// The provider kind the settings resolve to with or without a key: the setting when given,
/// else `openai` when a key is configured, else the offline analyzer.
pub fn provider_kind(settings: &Settings, has_key: bool) -> ProviderKind {
    match settings.provider {
        Some(kind) => kind,
        None if has_key => ProviderKind::OpenAi,
        None => ProviderKind::Local,
    }
}

/// Build the provider for these settings. `api_key` is the OpenAI-compatible key, if any
/// (read by the caller from the environment, or from SSM on Lambda).
pub fn build_provider(
    settings: &Settings,
    api_key: Option<&str>,
) -> Result<Arc<dyn VisionProvider>, ProviderSetupError> {
    let api_key = api_key.map(str::trim).filter(|k| !k.is_empty());
    match (provider_kind(settings, api_key.is_some()), api_key) {
        (ProviderKind::Local, _) => Ok(Arc::new(LocalAnalyzer)),
        (ProviderKind::OpenAi, None) => Err(ProviderSetupError::NeedsKey),
        (ProviderKind::OpenAi, Some(key)) => Ok(Arc::new(
            OpenAiProvider::new(&settings.openai_base_url, key, settings.provider_timeout)
                .map_err(|e| ProviderSetupError::Client {
                    base_url: settings.openai_base_url.clone(),
                    reason: e.to_string(),
                })?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_follows_the_setting_else_the_key() {
        let mut s = Settings::default();
        assert!(!build_provider(&s, None).unwrap().is_paid());
        assert!(build_provider(&s, Some("sk-x")).unwrap().is_paid());
        assert!(!build_provider(&s, Some("  ")).unwrap().is_paid());
        s.provider = Some(ProviderKind::Local);
        assert!(!build_provider(&s, Some("sk-x")).unwrap().is_paid());
        s.provider = Some(ProviderKind::OpenAi);
        assert!(matches!(
            build_provider(&s, None),
            Err(ProviderSetupError::NeedsKey)
        ));
    }
}
