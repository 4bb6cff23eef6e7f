//! Configuration: defaults < `sightline.toml` < `SIGHTLINE_*` environment < command-line flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use sightline_pipeline::providers::openai::DEFAULT_BASE_URL;
use sightline_pipeline::Settings;

/// Options shared by every subcommand (flags win over env, env over the file).
#[derive(Debug, Clone, Default, Args)]
pub struct CommonOpts {
    /// Data directory for the SQLite database and images.
    #[arg(long, global = true, env = "SIGHTLINE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file (default: ./sightline.toml when present).
    #[arg(long, global = true, env = "SIGHTLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Provider: `local` (offline analyzer, $0) or `openai` (any OpenAI-compatible API).
    #[arg(long, global = true, env = "SIGHTLINE_PROVIDER")]
    pub provider: Option<String>,
    /// Model to estimate and (with a paid provider) call.
    #[arg(long, global = true, env = "SIGHTLINE_MODEL")]
    pub model: Option<String>,
    /// Fallback models, comma-separated, tried when the model is throttled or down.
    #[arg(
        long,
        global = true,
        env = "SIGHTLINE_FALLBACK_MODELS",
        value_delimiter = ','
    )]
    pub fallback_models: Option<Vec<String>>,
    /// Provider requests per minute (0 = unlimited).
    #[arg(long, global = true, env = "SIGHTLINE_RPM")]
    pub rpm: Option<u64>,
    /// Provider tokens per minute (0 = unlimited).
    #[arg(long, global = true, env = "SIGHTLINE_TPM")]
    pub tpm: Option<u64>,
    /// Longest output edge in pixels.
    #[arg(long, global = true, env = "SIGHTLINE_MAX_EDGE")]
    pub max_edge: Option<u32>,
    /// Prompt version (part of the cache key).
    #[arg(long, global = true, env = "SIGHTLINE_PROMPT_VERSION")]
    pub prompt_version: Option<String>,
    /// Concurrent analysis workers.
    #[arg(long, global = true, env = "SIGHTLINE_WORKERS")]
    pub workers: Option<usize>,
    /// Provider request timeout in seconds.
    #[arg(long, global = true, env = "SIGHTLINE_TIMEOUT_SECS")]
    pub timeout_secs: Option<u64>,
}

/// `sightline.toml`: the same keys as the flags, snake_case.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub fallback_models: Option<Vec<String>>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_edge: Option<u32>,
    pub quality: Option<u8>,
    pub prompt_version: Option<String>,
    pub prompt: Option<String>,
    pub workers: Option<usize>,
    pub timeout_secs: Option<u64>,
    pub openai_base_url: Option<String>,
    pub max_input_bytes: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Reuse answers across tenants for identical images (default false).
    pub share_cache_across_tenants: Option<bool>,
    pub reconcile_after_secs: Option<u64>,
    pub stuck_after_secs: Option<u64>,
    pub reconcile_every_secs: Option<u64>,
    pub pending_ttl_secs: Option<u64>,
    pub resize_memory_mb: Option<u64>,
    pub max_concurrent_resizes: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Local,
    OpenAi,
}

/// Everything a command needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub provider: ProviderKind,
    pub settings: Settings,
    pub workers: usize,
    pub timeout: Duration,
    pub openai_base_url: String,
    pub openai_api_key: Option<String>,
}

impl Config {
    pub fn resolve(opts: &CommonOpts) -> anyhow::Result<Config> {
        let file = match &opts.config {
            Some(p) => Some(load_file(p)?),
            None if Path::new("sightline.toml").exists() => {
                Some(load_file(Path::new("sightline.toml"))?)
            }
            None => None,
        }
        .unwrap_or_default();
        let api_key = std::env::var("OPENAI_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty());
        let provider = match opts.provider.clone().or(file.provider.clone()).as_deref() {
            Some("local") => ProviderKind::Local,
            Some("openai") => ProviderKind::OpenAi,
            Some(other) => bail!("unknown provider {other:?}; use `local` or `openai`"),
            None if api_key.is_some() => ProviderKind::OpenAi,
            None => ProviderKind::Local,
        };
        if provider == ProviderKind::OpenAi && api_key.is_none() {
            bail!("provider `openai` needs OPENAI_API_KEY in the environment");
        }
        let mut settings = Settings::default();
        // Keys only the file and the environment set: the file first, the environment over it.
        file.apply_to(&mut settings);
        settings
            .apply_env(&|k| std::env::var(k).ok())
            .map_err(anyhow::Error::msg)?;
        // Keys with flags (clap already put their environment values into `opts`).
        if let Some(m) = opts.model.clone().or(file.model.clone()) {
            settings.model = m;
        }
        if let Some(f) = opts
            .fallback_models
            .clone()
            .or(file.fallback_models.clone())
        {
            settings.fallback_models = f
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = opts.rpm.or(file.rpm) {
            settings.rpm = v;
        }
        if let Some(v) = opts.tpm.or(file.tpm) {
            settings.tpm = v;
        }
        if let Some(v) = opts.max_edge.or(file.max_edge) {
            settings.prepare.max_edge = v;
        }
        if let Some(v) = opts.prompt_version.clone().or(file.prompt_version.clone()) {
            settings.prompt_version = v;
        }
        if let Some(p) = file.prompt.clone() {
            settings.prompt = p;
        }
        // Locally a worker may wait for the limiter: sleeping costs nothing here.
        settings.max_inline_wait = Duration::from_secs(60);
        if settings.prepare.max_edge == 0 || settings.prepare.max_edge > 16_384 {
            bail!("--max-edge must be 1..=16384");
        }
        settings.validate().map_err(anyhow::Error::msg)?;
        let timeout =
            Duration::from_secs(opts.timeout_secs.or(file.timeout_secs).unwrap_or(60).max(1));
        Ok(Config {
            data_dir: opts
                .data_dir
                .clone()
                .or(file.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from(".sightline")),
            provider,
            settings,
            workers: opts.workers.or(file.workers).unwrap_or(4).clamp(1, 64),
            timeout,
            openai_base_url: std::env::var("OPENAI_BASE_URL")
                .ok()
                .filter(|s| !s.is_empty())
                .or(file.openai_base_url.clone())
                .unwrap_or_else(|| DEFAULT_BASE_URL.to_string()),
            openai_api_key: api_key,
        })
    }
}

impl FileConfig {
    /// The keys that have no command-line flag.
    fn apply_to(&self, s: &mut Settings) {
        if let Some(v) = self.quality {
            s.prepare.quality = v;
        }
        if let Some(v) = self.max_input_bytes {
            s.prepare.max_input_bytes = v;
        }
        if let Some(v) = self.max_pixels {
            s.prepare.max_pixels = v;
        }
        if let Some(v) = self.share_cache_across_tenants {
            s.share_cache_across_tenants = v;
        }
        let secs = |v: Option<u64>| v.map(Duration::from_secs);
        if let Some(v) = secs(self.reconcile_after_secs) {
            s.reconcile_after = v;
        }
        if let Some(v) = secs(self.stuck_after_secs) {
            s.stuck_after = v;
        }
        if let Some(v) = secs(self.reconcile_every_secs) {
            s.reconcile_every = v.max(Duration::from_secs(1));
        }
        if let Some(v) = secs(self.pending_ttl_secs) {
            s.pending_ttl = v;
        }
        if let Some(v) = self.resize_memory_mb {
            s.resize_memory_budget = v.saturating_mul(1 << 20);
        }
        if let Some(v) = self.max_concurrent_resizes {
            s.max_concurrent_resizes = v.max(1);
        }
    }
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_config_rejects_unknown_keys() {
        assert!(toml::from_str::<FileConfig>("modle = \"x\"").is_err());
        let f: FileConfig = toml::from_str("model = \"gpt-4o\"\nrpm = 5").unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn flags_win_and_bad_values_are_clear() {
        let opts = CommonOpts {
            provider: Some("local".into()),
            model: Some("gpt-4o".into()),
            rpm: Some(7),
            ..Default::default()
        };
        let c = Config::resolve(&opts).unwrap();
        assert_eq!(c.settings.model, "gpt-4o");
        assert_eq!(c.settings.rpm, 7);
        assert_eq!(c.provider, ProviderKind::Local);
        let bad = CommonOpts {
            provider: Some("local".into()),
            model: Some("gpt-99".into()),
            ..Default::default()
        };
        assert!(Config::resolve(&bad)
            .unwrap_err()
            .to_string()
            .contains("gpt-99"));
        let bad = CommonOpts {
            provider: Some("smoke-signals".into()),
            ..Default::default()
        };
        assert!(Config::resolve(&bad).is_err());
    }
}
