//! Configuration of the CLI: defaults < `sightline.toml` < `SIGHTLINE_*` environment <
//! command-line flags, all applied through the pipeline's one list of settings
//! (`sightline_pipeline::settings::SETTINGS`), then validated once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use sightline_pipeline::providers::select::{resolve, ProviderKeys};
use sightline_pipeline::settings::{ProviderKind, Runtime};
use sightline_pipeline::Settings;

/// Options shared by every subcommand. Each sets the setting of the same name (see the
/// README's settings table); its `SIGHTLINE_*` variable is read with the others, under flags.
#[derive(Debug, Clone, Default, Args)]
pub struct CommonOpts {
    /// Config file (default: ./sightline.toml when present).
    #[arg(long, global = true, env = "SIGHTLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory for the SQLite database and images.
    #[arg(long, global = true)]
    pub data_dir: Option<String>,
    /// Provider: `local` (offline analyzer, $0), `openai` (any OpenAI-compatible API),
    /// `anthropic` (Messages API, Claude models) or `bedrock` (Amazon Bedrock, AWS credentials);
    /// unset: by the model and the keys set.
    #[arg(long, global = true)]
    pub provider: Option<String>,
    /// Model to estimate and (with a paid provider) call.
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// Fallback models, comma-separated, tried when the model is throttled or down.
    #[arg(long, global = true)]
    pub fallback_models: Option<String>,
    /// Image detail: low, high or auto (part of the cache key; low is far cheaper).
    #[arg(long, global = true)]
    pub detail: Option<String>,
    /// Provider requests per minute (0 = unlimited).
    #[arg(long, global = true)]
    pub rpm: Option<String>,
    /// Provider tokens per minute (0 = unlimited).
    #[arg(long, global = true)]
    pub tpm: Option<String>,
    /// Longest output edge in pixels.
    #[arg(long, global = true)]
    pub max_edge: Option<String>,
    /// Prompt version (part of the cache key).
    #[arg(long, global = true)]
    pub prompt_version: Option<String>,
    /// Concurrent analysis workers.
    #[arg(long, global = true)]
    pub workers: Option<String>,
    /// Provider request timeout in seconds.
    #[arg(long, global = true)]
    pub timeout_secs: Option<String>,
    /// `realtime` (one call per image, now) or `batch` (the provider's batch API: half
    /// price, answered within 24 h).
    #[arg(long, global = true)]
    pub lane: Option<String>,
    /// Vectors for `similar` and search: `local` (offline, $0), `openai`, `bedrock` or `off`.
    #[arg(long, global = true)]
    pub embedder: Option<String>,
    /// `near`: near-duplicates of analysed images reuse their analysis at $0; `off`.
    #[arg(long, global = true)]
    pub dedupe: Option<String>,
}

impl CommonOpts {
    /// The flags given, as (setting key, value).
    fn given(&self) -> Vec<(&'static str, &str)> {
        [
            ("data_dir", &self.data_dir),
            ("provider", &self.provider),
            ("model", &self.model),
            ("fallback_models", &self.fallback_models),
            ("detail", &self.detail),
            ("rpm", &self.rpm),
            ("tpm", &self.tpm),
            ("max_edge", &self.max_edge),
            ("prompt_version", &self.prompt_version),
            ("workers", &self.workers),
            ("timeout_secs", &self.timeout_secs),
            ("lane", &self.lane),
            ("embedder", &self.embedder),
            ("dedupe", &self.dedupe),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// Everything a command needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    /// The provider the settings resolve to, given the keys set.
    pub provider: ProviderKind,
    /// `OPENAI_API_KEY`, `ANTHROPIC_API_KEY`.
    pub keys: ProviderKeys,
}

impl Config {
    pub fn resolve(opts: &CommonOpts) -> anyhow::Result<Config> {
        Config::resolve_with(opts, &|k| std::env::var(k).ok())
    }

    /// As [`Config::resolve`], with the environment read through `env`.
    pub fn resolve_with(
        opts: &CommonOpts,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Config> {
        let mut settings = Settings::defaults_for(Runtime::Local);
        let file = match &opts.config {
            Some(p) => Some(p.clone()),
            None if Path::new("sightline.toml").exists() => Some(PathBuf::from("sightline.toml")),
            None => None,
        };
        if let Some(path) = file {
            apply_file(&mut settings, &path)?;
        }
        settings.apply_env(env)?;
        for (key, value) in opts.given() {
            settings.set(key, value, &format!("--{}", key.replace('_', "-")))?;
        }
        settings.finish()?;
        let keys = ProviderKeys::from_lookup(env);
        let provider = resolve(&settings, &keys)?;
        Ok(Config {
            settings,
            provider,
            keys,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.settings.data_dir
    }
}

/// `sightline.toml`: the settings' keys; lists as arrays, `tenant_detail` as a table.
fn apply_file(settings: &mut Settings, path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for (key, value) in &table {
        let origin = format!("{key} in {}", path.display());
        let text = file_value(value)
            .with_context(|| format!("{origin}: a string, number, boolean, list or table"))?;
        settings.set(key, &text, &origin)?;
    }
    Ok(())
}

/// A file value in the text form the settings read (lists comma-separated, tables `k=v`).
fn file_value(value: &toml::Value) -> Option<String> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    match value {
        toml::Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        toml::Value::Table(t) => t
            .iter()
            .map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        v => scalar(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sightline_core::model::Detail;
    use std::time::Duration;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sightline.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn file_config_rejects_unknown_keys() {
        let (_d, path) = file("modle = \"x\"");
        let opts = CommonOpts {
            config: Some(path),
            ..Default::default()
        };
        let err = format!("{:#}", Config::resolve_with(&opts, &no_env).unwrap_err());
        assert!(err.contains("modle") && err.contains("model"), "{err}");
    }

    #[test]
    fn flags_win_over_the_environment_and_the_environment_over_the_file() {
        let (_d, path) = file(
            "model = \"gpt-4o\"\nrpm = 5\ntpm = 6\ndetail = \"auto\"\nfallback_models = [\"gpt-4.1\", \"gpt-4.1-nano\"]\nmax_input_bytes = 1000\n[tenant_detail]\nacme = \"low\"\n",
        );
        let env = |k: &str| match k {
            "SIGHTLINE_RPM" => Some("50".to_string()),
            "SIGHTLINE_TPM" => Some("60".to_string()),
            "SIGHTLINE_TIMEOUT_SECS" => Some("2.5".to_string()),
            _ => None,
        };
        let opts = CommonOpts {
            config: Some(path),
            tpm: Some("7".into()),
            detail: Some("low".into()),
            ..Default::default()
        };
        let c = Config::resolve_with(&opts, &env).unwrap();
        let s = &c.settings;
        assert_eq!(s.model, "gpt-4o");
        assert_eq!((s.rpm, s.tpm), (50, 7));
        assert_eq!(s.detail, Detail::Low);
        assert_eq!(s.detail_for("acme", None), Detail::Low);
        assert_eq!(s.fallback_models, vec!["gpt-4.1", "gpt-4.1-nano"]);
        assert_eq!(s.prepare.max_input_bytes, 1000);
        assert_eq!(s.provider_timeout, Duration::from_millis(2500));
        assert_eq!(c.provider, ProviderKind::Local);
        // The claim lease was fitted to the worst case once resolved.
        assert!(s.claim_lease >= s.record_worst_case());
    }

    #[test]
    fn bad_values_name_their_origin() {
        for (opts, needle) in [
            (
                CommonOpts {
                    model: Some("gpt-99".into()),
                    ..Default::default()
                },
                "gpt-99",
            ),
            (
                CommonOpts {
                    provider: Some("smoke-signals".into()),
                    ..Default::default()
                },
                "--provider",
            ),
            (
                CommonOpts {
                    detail: Some("medium".into()),
                    ..Default::default()
                },
                "--detail",
            ),
            (
                CommonOpts {
                    max_edge: Some("20000".into()),
                    ..Default::default()
                },
                "max_edge",
            ),
        ] {
            let err = format!("{:#}", Config::resolve_with(&opts, &no_env).unwrap_err());
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let env = |k: &str| (k == "SIGHTLINE_DETAIL").then(|| "loud".to_string());
        let err = format!(
            "{:#}",
            Config::resolve_with(&CommonOpts::default(), &env).unwrap_err()
        );
        assert!(err.contains("SIGHTLINE_DETAIL"), "{err}");
    }

    #[test]
    fn openai_needs_a_key_and_a_key_picks_openai() {
        let opts = CommonOpts {
            provider: Some("openai".into()),
            ..Default::default()
        };
        assert!(Config::resolve_with(&opts, &no_env).is_err());
        let key = |k: &str| (k == "OPENAI_API_KEY").then(|| "sk-test".to_string());
        let c = Config::resolve_with(&CommonOpts::default(), &key).unwrap();
        assert_eq!(c.provider, ProviderKind::OpenAi);
    }

    #[test]
    fn anthropic_needs_its_key_and_a_claude_model_with_it_picks_anthropic() {
        let opts = CommonOpts {
            provider: Some("anthropic".into()),
            model: Some("claude-haiku-4-5".into()),
            ..Default::default()
        };
        let openai_only = |k: &str| (k == "OPENAI_API_KEY").then(|| "sk-test".to_string());
        let err = format!(
            "{:#}",
            Config::resolve_with(&opts, &openai_only).unwrap_err()
        );
        assert!(err.contains("ANTHROPIC_API_KEY"), "{err}");
        let both = |k: &str| match k {
            "OPENAI_API_KEY" => Some("sk-test".to_string()),
            "ANTHROPIC_API_KEY" => Some("sk-ant-test".to_string()),
            _ => None,
        };
        let claude = CommonOpts {
            model: Some("claude-haiku-4-5".into()),
            ..Default::default()
        };
        let c = Config::resolve_with(&claude, &both).unwrap();
        assert_eq!(c.provider, ProviderKind::Anthropic);
        // The default model is OpenAI's: the OpenAI key is used.
        let c = Config::resolve_with(&CommonOpts::default(), &both).unwrap();
        assert_eq!(c.provider, ProviderKind::OpenAi);
    }
}
