//! Tenants' webhook secrets in SSM Parameter Store: the SecureString `{path}{tenant}` (a
//! `whsec_` secret) signs the tenant's webhooks; a tenant without one falls back to the
//! settings (`webhook_secret`, `tenant_webhook_secret`). Values are cached for a minute, so a
//! rotated secret applies within a minute without a redeploy and a busy delivery loop does not
//! read SSM for every message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::ports::{StoreError, StoreResult, WebhookSecrets};
use crate::settings::{webhook_secret, Settings};

/// How long a read secret (or its absence) is used before SSM is asked again.
pub const SECRET_CACHE_TTL: Duration = Duration::from_secs(60);

pub struct SsmWebhookSecrets {
    client: aws_sdk_ssm::Client,
    path: String,
    fallback: Arc<Settings>,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl SsmWebhookSecrets {
    /// `path` ends with `/` (see `AwsEnv::webhook_secrets_path`).
    pub fn new(client: aws_sdk_ssm::Client, path: &str, fallback: Arc<Settings>) -> Self {
        SsmWebhookSecrets {
            client,
            path: path.to_string(),
            fallback,
            ttl: SECRET_CACHE_TTL,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The parameter holding a tenant's secret.
    pub fn parameter_name(&self, tenant: &str) -> String {
        format!("{}{tenant}", self.path)
    }

    fn cached(&self, tenant: &str) -> Option<Option<String>> {
        let cache = match self.cache.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        cache
            .get(tenant)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| v.clone())
    }

    fn remember(&self, tenant: &str, value: Option<String>) {
        let mut cache = match self.cache.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        cache.insert(tenant.to_string(), (value, Instant::now()));
    }

    /// The tenant's own parameter: Some(secret), or None when it has none.
    async fn read(&self, tenant: &str) -> StoreResult<Option<String>> {
        let name = self.parameter_name(tenant);
        let out = match self
            .client
            .get_parameter()
            .name(&name)
            .with_decryption(true)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.err().is_parameter_not_found() => return Ok(None),
            Err(e) => {
                let throttled = e
                    .as_service_error()
                    .and_then(|s| s.code())
                    .is_some_and(|c| c.contains("Throttl"));
                let message = format!("reading SSM parameter {name}: {}", DisplayErrorContext(&e));
                return Err(match e {
                    SdkError::ServiceError(_) if !throttled => StoreError::Permanent(message),
                    _ => StoreError::Transient(message),
                });
            }
        };
        let value = out
            .parameter()
            .and_then(|p| p.value())
            .map(str::trim)
            .unwrap_or_default();
        webhook_secret(value)
            .map(Some)
            .map_err(|e| StoreError::Permanent(format!("SSM parameter {name}: expected {e}")))
    }
}

#[async_trait]
impl WebhookSecrets for SsmWebhookSecrets {
    async fn secret_for(&self, tenant: &str) -> StoreResult<Option<String>> {
        if let Some(hit) = self.cached(tenant) {
            return Ok(hit);
        }
        // A tenant that cannot name a parameter has only the settings' secret.
        let own = if !tenant.is_empty() && sightline_core::keys::sanitize_id(tenant) == tenant {
            self.read(tenant).await?
        } else {
            None
        };
        let secret = own.or_else(|| self.fallback.webhook_secret_for(tenant).map(str::to_string));
        self.remember(tenant, secret.clone());
        Ok(secret)
    }
}
