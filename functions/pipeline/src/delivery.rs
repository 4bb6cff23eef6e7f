//! Use-case: webhook deliveries, done right. Each message is signed per Standard Webhooks
//! with its tenant's secret (a fresh timestamp and signature per attempt, the same
//! `webhook-id` throughout), posted to an address vetted against SSRF at send time (and only
//! that address: no second DNS answer, no redirects), with a 15 s limit. Failures are retried
//! on the spec's schedule within 24 h, honouring Retry-After; a 410 stops at once; what is
//! left over is a dead letter that the API lists and `redeliver` sends again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sightline_core::webhook::{delivery_delay, DeliveryOutcome, WebhookSecret, DELIVERY_TIMEOUT};
use tracing::{info, warn};

use crate::ports::{
    rfc3339, Clock, DeliveryStatus, GenerationStore, StoreError, StoreResult, WebhookDelivery,
    WebhookSecrets,
};
use crate::settings::Settings;
use crate::webhook_url::{validate_webhook_url, Mode, Resolve};

/// What one POST got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    pub status: u16,
    pub retry_after: Option<Duration>,
}

/// Sends one signed webhook request.
#[async_trait]
pub trait WebhookPoster: Send + Sync {
    /// POST `body` with `headers` to `url`. Err: the request did not get an answer (refused
    /// URL, DNS, connection, timeout), with the reason.
    async fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Posted, String>;
}

/// The HTTP sender: the URL is vetted again at each send (DNS answers change), and the
/// connection goes to exactly the vetted addresses.
pub struct HttpPoster {
    pub mode: Mode,
    pub resolver: Arc<dyn Resolve>,
    pub timeout: Duration,
}

impl HttpPoster {
    pub fn new(mode: Mode, resolver: Arc<dyn Resolve>) -> HttpPoster {
        HttpPoster {
            mode,
            resolver,
            timeout: DELIVERY_TIMEOUT,
        }
    }
}

/// Retry-After, by the one rule the provider clients use.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    sightline_core::retry::parse_retry_after(v)
}

#[async_trait]
impl WebhookPoster for HttpPoster {
    async fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Posted, String> {
        let addrs: Vec<SocketAddr> = validate_webhook_url(url, self.mode, self.resolver.as_ref())
            .await
            .map_err(|e| format!("URL refused: {e}"))?;
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("URL: {e}"))?;
        let host = parsed.host_str().unwrap_or_default().to_string();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .resolve_to_addrs(&host, &addrs)
            .no_proxy()
            .build()
            .map_err(|e| format!("client: {e}"))?;
        let mut req = client
            .post(parsed)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::USER_AGENT, "sightline-webhooks/1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.body(body).send().await.map_err(|e| {
            if e.is_timeout() {
                format!("no answer within {} s", self.timeout.as_secs())
            } else {
                format!("request failed: {e}")
            }
        })?;
        Ok(Posted {
            status: resp.status().as_u16(),
            retry_after: retry_after(resp.headers()),
        })
    }
}

/// What one pass over due deliveries did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryReport {
    pub attempted: u64,
    pub delivered: u64,
    pub retrying: u64,
    pub dead: u64,
    pub gone: u64,
}

#[derive(Clone)]
pub struct Deliveries {
    pub store: Arc<dyn GenerationStore>,
    pub poster: Arc<dyn WebhookPoster>,
    /// The tenants' signing secrets (the settings locally, SSM on AWS).
    pub secrets: Arc<dyn WebhookSecrets>,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
}

/// Deliveries attempted at once: one slow receiver does not hold up the others.
pub const DELIVERY_CONCURRENCY: usize = 8;
/// The longest one attempt takes: vetting the URL (DNS) and the request's own timeout.
pub const ATTEMPT_WORST_CASE: Duration =
    Duration::from_secs(crate::webhook_url::RESOLVE_TIMEOUT.as_secs() + DELIVERY_TIMEOUT.as_secs());

impl Deliveries {
    /// Attempt every delivery that is due (up to `limit`), [`DELIVERY_CONCURRENCY`] at a time.
    /// A store error is returned once every started attempt has ended.
    pub async fn deliver_due(&self, limit: usize) -> StoreResult<DeliveryReport> {
        let mut report = DeliveryReport::default();
        let due = self
            .store
            .due_deliveries(self.clock.now_ms(), limit)
            .await?;
        let permits = Arc::new(tokio::sync::Semaphore::new(DELIVERY_CONCURRENCY));
        let mut attempts = tokio::task::JoinSet::new();
        for d in due {
            let me = self.clone();
            let permits = permits.clone();
            let span = tracing::info_span!("webhook", delivery_id = %d.delivery_id, job_id = %d.job_id, tenant = %d.tenant);
            attempts.spawn(tracing::Instrument::instrument(
                async move {
                    // The semaphore is never closed; a failed acquire just runs unthrottled.
                    let _permit = permits.acquire_owned().await.ok();
                    me.attempt(d).await
                },
                span,
            ));
        }
        let mut failed = None;
        while let Some(joined) = attempts.join_next().await {
            let ended = match joined {
                Ok(Ok(ended)) => ended,
                Ok(Err(e)) => {
                    failed = Some(e);
                    continue;
                }
                Err(e) => {
                    // The attempt's claim holds its delivery until it comes due again.
                    warn!(error = %e, "a webhook attempt's task failed");
                    continue;
                }
            };
            report.attempted += 1;
            match ended {
                Some(DeliveryStatus::Delivered) => report.delivered += 1,
                Some(DeliveryStatus::Pending) => report.retrying += 1,
                Some(DeliveryStatus::Dead) => report.dead += 1,
                Some(DeliveryStatus::Gone) => report.gone += 1,
                None => {}
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// One attempt; the status it left the delivery in (None: another sender took it).
    async fn attempt(&self, d: WebhookDelivery) -> StoreResult<Option<DeliveryStatus>> {
        let now_ms = self.clock.now_ms();
        let mut next = d.clone();
        next.attempts = d.attempts + 1;
        // Claim the attempt first: of two senders only one posts it.
        next.next_at_ms = now_ms + DELIVERY_TIMEOUT.as_millis() as u64 * 2;
        next.updated_at = rfc3339(now_ms);
        if !self.store.update_delivery(&next, d.attempts).await? {
            return Ok(None);
        }
        let expected = next.attempts;
        let outcome = match self.secrets.secret_for(&d.tenant).await {
            Ok(None) => Err("the tenant has no webhook secret any more".to_string()),
            Ok(Some(secret)) => self.post_signed(&d, &secret, now_ms).await,
            Err(e) => Err(format!("reading the tenant's webhook secret: {e}")),
        };
        let scale = self.settings.webhook_retry_scale;
        let since_first =
            Duration::from_millis(now_ms.saturating_sub(d.first_at_ms)).div_f64(scale);
        let (result, last_status, last_error) = match outcome {
            Ok(p) => (
                DeliveryOutcome::from_status(p.status, p.retry_after),
                Some(p.status),
                (!(200..300).contains(&p.status)).then(|| format!("HTTP {}", p.status)),
            ),
            Err(e) => (DeliveryOutcome::transport_failure(), None, Some(e)),
        };
        next.last_status = last_status;
        next.last_error = last_error;
        next.updated_at = rfc3339(self.clock.now_ms());
        match result {
            DeliveryOutcome::Delivered => {
                next.status = DeliveryStatus::Delivered;
                info!(attempts = next.attempts, "webhook delivered");
            }
            DeliveryOutcome::Gone => {
                next.status = DeliveryStatus::Gone;
                warn!("receiver answered 410 Gone; no more attempts");
            }
            DeliveryOutcome::Retry { retry_after } => {
                let retry_after = retry_after.map(|r| r.div_f64(scale));
                match delivery_delay(next.attempts, since_first, retry_after) {
                    Some(wait) => {
                        next.status = DeliveryStatus::Pending;
                        next.next_at_ms =
                            self.clock.now_ms() + wait.mul_f64(scale).as_millis() as u64;
                        info!(attempts = next.attempts, error = ?next.last_error, wait_ms = wait.mul_f64(scale).as_millis() as u64, "webhook attempt failed; retrying");
                    }
                    None => {
                        next.status = DeliveryStatus::Dead;
                        warn!(attempts = next.attempts, error = ?next.last_error, "webhook out of attempts: dead letter");
                    }
                }
            }
        }
        self.store.update_delivery(&next, expected).await?;
        Ok(Some(next.status))
    }

    async fn post_signed(
        &self,
        d: &WebhookDelivery,
        secret: &str,
        now_ms: u64,
    ) -> Result<Posted, String> {
        let secret = WebhookSecret::parse(secret).map_err(|e| format!("webhook secret: {e}"))?;
        let ts = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        let headers = secret
            .headers(&d.delivery_id, ts, d.body.as_bytes())
            .map_err(|e| format!("signing: {e}"))?;
        let pairs = headers.pairs();
        self.poster
            .post(&d.url, &pairs, d.body.as_bytes().to_vec())
            .await
    }

    /// Send a delivery again from now (a dead letter, a 410, or one delivered before): a new
    /// 24 h window with the same message id.
    pub async fn redeliver(&self, tenant: &str, delivery_id: &str) -> StoreResult<WebhookDelivery> {
        let d = self
            .store
            .get_delivery(tenant, delivery_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("delivery {delivery_id}")))?;
        let now = self.clock.now_ms();
        let mut next = d.clone();
        next.status = DeliveryStatus::Pending;
        next.next_at_ms = now;
        next.first_at_ms = now;
        next.updated_at = rfc3339(now);
        // Attempts restart the schedule from its first step.
        next.attempts = 0;
        if !self.store.update_delivery(&next, d.attempts).await? {
            return Err(StoreError::Transient(
                "the delivery is being attempted right now; try again".into(),
            ));
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{SqliteDb, SqliteRepository};
    use crate::ports::SystemClock;

    /// A receiver whose every answer waits until `DELIVERY_CONCURRENCY` requests are in flight
    /// at once: attempts made one after the other would never get past the first.
    struct AllAtOnce {
        barrier: tokio::sync::Barrier,
    }

    #[async_trait]
    impl WebhookPoster for AllAtOnce {
        async fn post(&self, _: &str, _: &[(&str, &str)], _: Vec<u8>) -> Result<Posted, String> {
            self.barrier.wait().await;
            Ok(Posted {
                status: 200,
                retry_after: None,
            })
        }
    }

    fn delivery(n: usize, now_ms: u64) -> WebhookDelivery {
        WebhookDelivery::new_event(
            format!("msg_{n}"),
            "acme",
            &format!("gj{n}"),
            "https://hooks.example.com/x",
            "generation.job.finished",
            serde_json::json!({}),
            now_ms,
        )
    }

    #[tokio::test]
    async fn due_deliveries_are_attempted_side_by_side_so_a_slow_receiver_holds_up_no_other() {
        let store = Arc::new(SqliteRepository::new(SqliteDb::in_memory().unwrap()));
        let now = SystemClock.now_ms();
        for n in 0..DELIVERY_CONCURRENCY {
            store.put_delivery(&delivery(n, now)).await.unwrap();
        }
        let settings = Arc::new(Settings {
            webhook_secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            ..Settings::default()
        });
        let deliveries = Deliveries {
            store: store.clone(),
            poster: Arc::new(AllAtOnce {
                barrier: tokio::sync::Barrier::new(DELIVERY_CONCURRENCY),
            }),
            secrets: settings.clone(),
            settings,
            clock: Arc::new(SystemClock),
        };
        let report = tokio::time::timeout(Duration::from_secs(20), deliveries.deliver_due(50))
            .await
            .expect("the attempts ran at once");
        let report = report.unwrap();
        assert_eq!(report.attempted, DELIVERY_CONCURRENCY as u64);
        assert_eq!(report.delivered, DELIVERY_CONCURRENCY as u64);
    }
}
