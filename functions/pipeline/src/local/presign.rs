//! Local presigned upload URLs: HMAC-SHA256 signed, expiring, bound to key, type and size,
//! each with a random nonce so the server can make it single-use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ports::{rfc3339, Clock, PresignedUpload, Presigner, StoreError, StoreResult};

/// What a signed upload URL allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadGrant {
    pub key: String,
    pub content_type: String,
    pub content_length: u64,
    /// Milliseconds since the epoch.
    pub expires_ms: u64,
    /// Random, per URL: the server records it when the upload is accepted, so the same URL
    /// cannot put other bytes under the key later.
    pub nonce: String,
}

/// What a download URL allows: reading one key until it expires. Its fields differ from an
/// [`UploadGrant`]'s, so neither kind of token parses as the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadGrant {
    pub read_key: String,
    pub read_expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("malformed upload token")]
    Malformed,
    #[error("upload token signature does not match")]
    BadSignature,
    #[error("upload URL has expired")]
    Expired,
}

#[derive(Clone)]
pub struct LocalPresigner {
    secret: Arc<Vec<u8>>,
    /// e.g. `http://127.0.0.1:8787`
    base_url: String,
    clock: Arc<dyn Clock>,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

impl LocalPresigner {
    pub fn new(secret: Vec<u8>, base_url: &str, clock: Arc<dyn Clock>) -> LocalPresigner {
        LocalPresigner {
            secret: Arc::new(secret),
            base_url: base_url.trim_end_matches('/').to_string(),
            clock,
        }
    }

    fn mac(&self, payload: &str) -> Vec<u8> {
        // HMAC accepts keys of any length; new_from_slice cannot fail for Hmac<Sha256>.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => return Vec::new(),
        };
        mac.update(payload.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    pub fn sign(&self, grant: &UploadGrant) -> String {
        let payload = B64.encode(serde_json::to_vec(grant).unwrap_or_default());
        let sig = B64.encode(self.mac(&payload));
        format!("{payload}.{sig}")
    }

    /// Check a token from an upload URL; the caller then checks type and length.
    /// Check a download token: signed by us, a download grant, not expired.
    pub fn verify_download(&self, token: &str) -> Result<DownloadGrant, GrantError> {
        let raw = self.verified_payload(token)?;
        let grant: DownloadGrant =
            serde_json::from_slice(&raw).map_err(|_| GrantError::Malformed)?;
        if grant.read_expires_ms < self.clock.now_ms() {
            return Err(GrantError::Expired);
        }
        Ok(grant)
    }

    fn verified_payload(&self, token: &str) -> Result<Vec<u8>, GrantError> {
        let (payload, sig) = token.split_once('.').ok_or(GrantError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| GrantError::Malformed)?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).map_err(|_| GrantError::Malformed)?;
        mac.update(payload.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| GrantError::BadSignature)?;
        B64.decode(payload).map_err(|_| GrantError::Malformed)
    }

    pub fn verify(&self, token: &str) -> Result<UploadGrant, GrantError> {
        let (payload, sig) = token.split_once('.').ok_or(GrantError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| GrantError::Malformed)?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).map_err(|_| GrantError::Malformed)?;
        mac.update(payload.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| GrantError::BadSignature)?;
        let raw = B64.decode(payload).map_err(|_| GrantError::Malformed)?;
        let grant: UploadGrant = serde_json::from_slice(&raw).map_err(|_| GrantError::Malformed)?;
        if grant.expires_ms < self.clock.now_ms() {
            return Err(GrantError::Expired);
        }
        Ok(grant)
    }
}

#[async_trait]
impl Presigner for LocalPresigner {
    async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        content_length: u64,
        expires_in: Duration,
    ) -> StoreResult<PresignedUpload> {
        if key.is_empty() {
            return Err(StoreError::Permanent("empty key".into()));
        }
        let expires_ms = self.clock.now_ms() + expires_in.as_millis() as u64;
        let grant = UploadGrant {
            key: key.to_string(),
            content_type: content_type.to_string(),
            content_length,
            expires_ms,
            nonce: uuid::Uuid::new_v4().simple().to_string(),
        };
        let mut headers = BTreeMap::new();
        headers.insert("content-type".to_string(), content_type.to_string());
        Ok(PresignedUpload {
            url: format!("{}/local-upload/{}", self.base_url, self.sign(&grant)),
            method: "PUT".into(),
            headers,
            expires_at: rfc3339(expires_ms),
        })
    }

    async fn presign_get(&self, key: &str, expires_in: Duration) -> StoreResult<String> {
        if key.is_empty() {
            return Err(StoreError::Permanent("empty key".into()));
        }
        let grant = DownloadGrant {
            read_key: key.to_string(),
            read_expires_ms: self.clock.now_ms() + expires_in.as_millis() as u64,
        };
        let payload = B64.encode(serde_json::to_vec(&grant).unwrap_or_default());
        let sig = B64.encode(self.mac(&payload));
        Ok(format!("{}/local-download/{payload}.{sig}", self.base_url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn download_and_upload_tokens_are_not_interchangeable() {
        let p = LocalPresigner::new(
            b"s".to_vec(),
            "http://x",
            Arc::new(crate::ports::SystemClock),
        );
        let url = p
            .presign_get("resized/t/a.jpg", Duration::from_secs(60))
            .await
            .unwrap();
        let token = url.rsplit('/').next().unwrap();
        assert_eq!(
            p.verify_download(token).unwrap().read_key,
            "resized/t/a.jpg"
        );
        assert_eq!(p.verify(token), Err(GrantError::Malformed));
        let up = p
            .presign_put("uploads/t/a.jpg", "image/jpeg", 10, Duration::from_secs(60))
            .await
            .unwrap();
        let token = up.url.rsplit('/').next().unwrap();
        assert_eq!(p.verify_download(token), Err(GrantError::Malformed));
        let other = LocalPresigner::new(
            b"t".to_vec(),
            "http://x",
            Arc::new(crate::ports::SystemClock),
        );
        let url = other
            .presign_get("resized/t/a.jpg", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            p.verify_download(url.rsplit('/').next().unwrap()),
            Err(GrantError::BadSignature)
        );
    }

    struct Fixed(std::sync::atomic::AtomicU64);
    impl Clock for Fixed {
        fn now_ms(&self) -> u64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn signed_urls_verify_expire_and_resist_tampering() {
        let clock = Arc::new(Fixed(1_000.into()));
        let p = LocalPresigner::new(b"secret".to_vec(), "http://127.0.0.1:1/", clock.clone());
        let up = p
            .presign_put("uploads/t/i.jpg", "image/jpeg", 10, Duration::from_secs(60))
            .await
            .unwrap();
        let token = up.url.rsplit('/').next().unwrap();
        let g = p.verify(token).unwrap();
        assert_eq!((g.key.as_str(), g.content_length), ("uploads/t/i.jpg", 10));
        let again = p
            .presign_put("uploads/t/i.jpg", "image/jpeg", 10, Duration::from_secs(60))
            .await
            .unwrap();
        let g2 = p.verify(again.url.rsplit('/').next().unwrap()).unwrap();
        assert_ne!(g.nonce, g2.nonce, "every URL has its own nonce");

        let (payload, sig) = token.split_once('.').unwrap();
        let forged = UploadGrant {
            content_length: 10_000_000,
            ..g.clone()
        };
        let forged_payload = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            p.verify(&format!("{forged_payload}.{sig}")),
            Err(GrantError::BadSignature)
        );
        assert_eq!(p.verify(payload), Err(GrantError::Malformed));
        let other = LocalPresigner::new(b"other".to_vec(), "http://x", clock.clone());
        assert_eq!(other.verify(token), Err(GrantError::BadSignature));

        clock
            .0
            .store(1_000 + 61_000, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(p.verify(token), Err(GrantError::Expired));
    }
}
