//! Configuration of the Lambdas from the environment (docs/aws.md, `SIGHTLINE_*`).

use std::sync::Arc;

use anyhow::{bail, Context};
use aws_config::{BehaviorVersion, SdkConfig};
use sightline_core::keys::{RESIZED_PREFIX, UPLOAD_PREFIX};

use super::vectors::S3VectorStore;
use crate::ports::{BatchProvider, VisionProvider};
use crate::providers::select::{
    build_batch_provider, build_provider, key_param_variable, key_variable, paid_candidates,
    ProviderKeys,
};
use crate::settings::{ProviderKind, Settings};

/// Where the functions' resources are: names the template passes in the environment (the
/// pipeline's settings are [`Settings`], read by [`settings_from_env`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AwsEnv {
    pub bucket: String,
    /// Where uploads trigger the resize function. Resized JPEGs always go under
    /// `sightline_core::keys::RESIZED_PREFIX`, which must lie outside it.
    pub upload_prefix: String,
    /// Analyze queue (required by resize and analyze, not by api).
    pub queue_url: Option<String>,
    pub table: String,
    /// The S3 vector bucket of image embeddings (`SIGHTLINE_VECTOR_BUCKET`; analyze and api).
    pub vector_bucket: Option<String>,
    pub openai_key_param: Option<String>,
    pub anthropic_key_param: Option<String>,
    /// The generation queue (`SIGHTLINE_GENERATION_QUEUE_URL`): generation jobs are on when
    /// it is set (generate, analyze, api, reconcile).
    pub generation_queue_url: Option<String>,
    /// SSM path of the tenants' webhook secrets (`SIGHTLINE_WEBHOOK_SECRETS_PATH`): the
    /// SecureString `{path}{tenant}` signs the tenant's webhooks.
    pub webhook_secrets_path: Option<String>,
    /// The templates object in the bucket (`SIGHTLINE_TEMPLATES_KEY`).
    pub templates_key: String,
    /// `AWS_ENDPOINT_URL` (emulator): S3 then uses path-style addressing.
    pub endpoint_url: Option<String>,
}

/// The variable naming the S3 vector bucket of image embeddings.
pub const VECTOR_BUCKET_VARIABLE: &str = "SIGHTLINE_VECTOR_BUCKET";

/// Read an env var, treating empty as unset.
fn var(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl AwsEnv {
    /// From the process environment.
    pub fn from_env() -> anyhow::Result<AwsEnv> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<AwsEnv> {
        let upload_prefix =
            var(get, "SIGHTLINE_UPLOAD_PREFIX").unwrap_or_else(|| UPLOAD_PREFIX.into());
        if RESIZED_PREFIX.starts_with(&upload_prefix) || upload_prefix.starts_with(RESIZED_PREFIX) {
            bail!("SIGHTLINE_UPLOAD_PREFIX ({upload_prefix}) must not overlap the resized prefix ({RESIZED_PREFIX}): the resize function would trigger itself");
        }
        Ok(AwsEnv {
            bucket: var(get, "SIGHTLINE_BUCKET").context("SIGHTLINE_BUCKET is required")?,
            upload_prefix,
            queue_url: var(get, "SIGHTLINE_QUEUE_URL"),
            table: var(get, "SIGHTLINE_TABLE").context("SIGHTLINE_TABLE is required")?,
            vector_bucket: var(get, VECTOR_BUCKET_VARIABLE),
            openai_key_param: key_param_variable(ProviderKind::OpenAi)
                .and_then(|name| var(get, name)),
            anthropic_key_param: key_param_variable(ProviderKind::Anthropic)
                .and_then(|name| var(get, name)),
            generation_queue_url: var(get, "SIGHTLINE_GENERATION_QUEUE_URL"),
            webhook_secrets_path: var(get, "SIGHTLINE_WEBHOOK_SECRETS_PATH").map(|p| {
                // `{path}{tenant}` names a parameter: the path ends with its separator.
                if p.ends_with('/') {
                    p
                } else {
                    format!("{p}/")
                }
            }),
            templates_key: var(get, "SIGHTLINE_TEMPLATES_KEY")
                .unwrap_or_else(|| crate::generation::TEMPLATES_KEY.into()),
            endpoint_url: var(get, "AWS_ENDPOINT_URL"),
        })
    }

    /// The SSM parameter naming a paid provider's key, if configured.
    pub fn key_param(&self, kind: ProviderKind) -> Option<&str> {
        match kind {
            ProviderKind::OpenAi => self.openai_key_param.as_deref(),
            ProviderKind::Anthropic => self.anthropic_key_param.as_deref(),
            ProviderKind::Local | ProviderKind::Bedrock => None,
        }
    }

    /// The vector bucket's name, or an error naming the variable.
    pub fn require_vector_bucket(&self) -> anyhow::Result<&str> {
        self.vector_bucket
            .as_deref()
            .with_context(|| format!("{VECTOR_BUCKET_VARIABLE} is required"))
    }

    /// The analyze queue URL, or an error naming the variable.
    pub fn require_queue(&self) -> anyhow::Result<&str> {
        self.queue_url
            .as_deref()
            .context("SIGHTLINE_QUEUE_URL is required")
    }
}

/// Pipeline settings from the environment (defaults of [`Settings`] otherwise).
pub fn settings_from_env() -> anyhow::Result<Settings> {
    settings_from_lookup(&|k| std::env::var(k).ok())
}

pub fn settings_from_lookup(get: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
    Settings::for_lambda(get).context("invalid settings")
}

/// The SDK clients, built once per cold start.
#[derive(Clone, Debug)]
pub struct Clients {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
}

impl Clients {
    /// S3 uses path-style addressing when `endpoint` (or the SDK config's endpoint) is set.
    pub fn new(sdk: &SdkConfig, endpoint: Option<&str>) -> Clients {
        Clients {
            s3: super::s3::s3_client(sdk, endpoint),
            sqs: aws_sdk_sqs::Client::new(sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(sdk),
        }
    }
}

/// The vector store in the bucket named by [`VECTOR_BUCKET_VARIABLE`]. The S3 Vectors client
/// follows the SDK configuration (`AWS_ENDPOINT_URL` for an emulator).
pub fn vector_store(sdk: &SdkConfig, env: &AwsEnv) -> anyhow::Result<S3VectorStore> {
    Ok(S3VectorStore::new(
        aws_sdk_s3vectors::Client::new(sdk),
        env.require_vector_bucket()?,
    ))
}

/// SDK configuration from the environment (region, credentials, `AWS_ENDPOINT_URL`).
pub async fn sdk_config_from_env() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// A paid provider's key: its variable (`OPENAI_API_KEY`, `ANTHROPIC_API_KEY`), else the SSM
/// SecureString named by its parameter variable (`SIGHTLINE_OPENAI_KEY_PARAM`,
/// `SIGHTLINE_ANTHROPIC_KEY_PARAM`), read once per cold start. None when neither is set.
pub async fn provider_key(
    env: &AwsEnv,
    sdk: &SdkConfig,
    kind: ProviderKind,
) -> anyhow::Result<Option<String>> {
    // The local analyzer and Bedrock (the function's role) take no key.
    let (Some(variable), Some(param_variable)) = (key_variable(kind), key_param_variable(kind))
    else {
        return Ok(None);
    };
    if let Some(k) = std::env::var(variable)
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        return Ok(Some(k.trim().to_string()));
    }
    let Some(name) = env.key_param(kind) else {
        return Ok(None);
    };
    Ok(Some(
        read_secure_parameter(sdk, name, param_variable).await?,
    ))
}

/// The variable naming the SSM SecureString of the admin key (`x-admin-key` of the admin
/// routes), for the api function.
pub const ADMIN_KEY_PARAM_VARIABLE: &str = "SIGHTLINE_ADMIN_KEY_PARAM";

/// Give the settings the admin key from the SSM parameter named by
/// [`ADMIN_KEY_PARAM_VARIABLE`], read once per cold start, unless the settings already have one
/// (`SIGHTLINE_ADMIN_API_KEY`). Without either the admin routes answer 403.
pub async fn load_admin_key(settings: &mut Settings, sdk: &SdkConfig) -> anyhow::Result<()> {
    if settings.admin_api_key.is_some() {
        return Ok(());
    }
    let Some(name) = std::env::var(ADMIN_KEY_PARAM_VARIABLE)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
    else {
        return Ok(());
    };
    settings.admin_api_key =
        Some(read_secure_parameter(sdk, &name, ADMIN_KEY_PARAM_VARIABLE).await?);
    Ok(())
}

/// The value of an SSM SecureString (decrypted), named by the variable `variable`.
pub(crate) async fn read_secure_parameter(
    sdk: &SdkConfig,
    name: &str,
    variable: &str,
) -> anyhow::Result<String> {
    if name.starts_with("arn:aws:secretsmanager:") {
        bail!("{variable} is a Secrets Manager ARN; this build reads SSM parameters only");
    }
    let ssm = aws_sdk_ssm::Client::new(sdk);
    let out = ssm
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "reading SSM parameter {name}: {}",
                aws_sdk_ssm::error::DisplayErrorContext(&e)
            )
        })?;
    let value = out
        .parameter()
        .and_then(|p| p.value())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .with_context(|| format!("SSM parameter {name} is empty"))?;
    Ok(value.to_string())
}

/// The provider keys the settings need, read in the factory's order of preference and only
/// until one is found, so an unused parameter is never fetched.
async fn provider_keys(
    env: &AwsEnv,
    sdk: &SdkConfig,
    settings: &Settings,
) -> anyhow::Result<ProviderKeys> {
    let mut keys = ProviderKeys::default();
    for kind in paid_candidates(settings) {
        keys.set(kind, provider_key(env, sdk, kind).await?);
        if keys.get(kind).is_some() {
            break;
        }
    }
    Ok(keys)
}

/// The vision provider the settings ask for.
pub async fn provider_from_env(
    env: &AwsEnv,
    sdk: &SdkConfig,
    settings: &Settings,
) -> anyhow::Result<Arc<dyn VisionProvider>> {
    let keys = provider_keys(env, sdk, settings).await?;
    Ok(build_provider(settings, &keys)?)
}

/// The batch API of the provider [`provider_from_env`] would build (same keys); None for the
/// local analyzer, which has none.
pub async fn batch_provider_from_env(
    env: &AwsEnv,
    sdk: &SdkConfig,
    settings: &Settings,
) -> anyhow::Result<Option<Arc<dyn BatchProvider>>> {
    let keys = provider_keys(env, sdk, settings).await?;
    Ok(build_batch_provider(settings, &keys)?)
}

/// Vectors and searches over S3 Vectors, with the embedder the settings ask for (its keys
/// read like the provider's); None when no vector bucket is configured.
pub async fn search_from_env(
    env: &AwsEnv,
    sdk: &SdkConfig,
    settings: &Arc<Settings>,
    repo: Arc<dyn crate::ports::Repository>,
    blobs: Arc<dyn crate::ports::BlobStore>,
) -> anyhow::Result<Option<Arc<crate::search::Search>>> {
    if env.vector_bucket.is_none() {
        return Ok(None);
    }
    let keys = match settings.embedder {
        crate::settings::EmbedderKind::OpenAi => provider_keys(env, sdk, settings).await?,
        _ => Default::default(),
    };
    let embedder = crate::providers::select::build_embedder(settings, &keys)?;
    Ok(Some(Arc::new(crate::search::Search::new(
        repo,
        blobs,
        Arc::new(vector_store(sdk, env)?),
        embedder,
        settings.clone(),
        Arc::new(crate::ports::SystemClock),
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn env_defaults_and_required_names() {
        let e = AwsEnv::from_lookup(&lookup(&[
            ("SIGHTLINE_BUCKET", "b"),
            ("SIGHTLINE_TABLE", "t"),
        ]))
        .unwrap();
        assert_eq!(e.upload_prefix, "uploads/");
        assert_eq!(e.queue_url, None);
        assert!(e.require_queue().is_err());
        assert_eq!(e.key_param(ProviderKind::Anthropic), None);
        assert_eq!(e.vector_bucket, None);
        assert!(e.require_vector_bucket().is_err());
        assert_eq!(e.generation_queue_url, None);
        assert_eq!(e.webhook_secrets_path, None);
        assert_eq!(e.templates_key, "generations/templates.toml");
        let e = AwsEnv::from_lookup(&lookup(&[
            ("SIGHTLINE_BUCKET", "b"),
            ("SIGHTLINE_TABLE", "t"),
            ("SIGHTLINE_OPENAI_KEY_PARAM", "/sightline/openai"),
            ("SIGHTLINE_ANTHROPIC_KEY_PARAM", "/sightline/anthropic"),
            ("SIGHTLINE_VECTOR_BUCKET", "vectors"),
        ]))
        .unwrap();
        assert_eq!(e.require_vector_bucket().unwrap(), "vectors");
        assert_eq!(e.key_param(ProviderKind::OpenAi), Some("/sightline/openai"));
        assert_eq!(
            e.key_param(ProviderKind::Anthropic),
            Some("/sightline/anthropic")
        );
        assert!(AwsEnv::from_lookup(&lookup(&[("SIGHTLINE_TABLE", "t")])).is_err());
        let overlap = lookup(&[
            ("SIGHTLINE_BUCKET", "b"),
            ("SIGHTLINE_TABLE", "t"),
            ("SIGHTLINE_UPLOAD_PREFIX", "resized/in/"),
        ]);
        assert!(AwsEnv::from_lookup(&overlap).is_err());
    }
}
