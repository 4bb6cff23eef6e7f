//! Presigned S3 PUT URLs bound to a key, content type and content length.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::Client;

use super::sdk_err;
use crate::ports::{
    rfc3339, Clock, PresignedUpload, Presigner, StoreError, StoreResult, SystemClock,
};

#[derive(Clone)]
pub struct S3Presigner {
    client: Client,
    bucket: String,
    clock: Arc<dyn Clock>,
}

impl S3Presigner {
    pub fn new(client: Client, bucket: impl Into<String>) -> S3Presigner {
        S3Presigner {
            client,
            bucket: bucket.into(),
            clock: Arc::new(SystemClock),
        }
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> S3Presigner {
        self.clock = clock;
        self
    }
}

#[async_trait]
impl Presigner for S3Presigner {
    async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        content_length: u64,
        expires_in: Duration,
    ) -> StoreResult<PresignedUpload> {
        // SigV4 presigning allows at most 7 days.
        let expires_in = expires_in.clamp(Duration::from_secs(1), Duration::from_secs(7 * 86_400));
        let cfg = PresigningConfig::expires_in(expires_in)
            .map_err(|e| StoreError::Permanent(format!("presigning config: {e}")))?;
        let len = i64::try_from(content_length)
            .map_err(|_| StoreError::Permanent("content length too large".into()))?;
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_length(len)
            .presigned(cfg)
            .await
            .map_err(|e| sdk_err("s3 presign PutObject", e))?;
        let mut headers: BTreeMap<String, String> = req
            .headers()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect();
        headers.insert("content-type".into(), content_type.to_string());
        headers.insert("content-length".into(), content_length.to_string());
        let expires_at = rfc3339(self.clock.now_ms() + expires_in.as_millis() as u64);
        Ok(PresignedUpload {
            url: req.uri().to_string(),
            method: req.method().to_string(),
            headers,
            expires_at,
        })
    }

    async fn presign_get(&self, key: &str, expires_in: Duration) -> StoreResult<String> {
        let expires_in = expires_in.clamp(Duration::from_secs(1), Duration::from_secs(7 * 86_400));
        let cfg = PresigningConfig::expires_in(expires_in)
            .map_err(|e| StoreError::Permanent(format!("presigning config: {e}")))?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(|e| sdk_err("s3 presign GetObject", e))?;
        Ok(req.uri().to_string())
    }
}
