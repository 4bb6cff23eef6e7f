//! S3 blob store.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use super::sdk_err;
use crate::ports::{BlobStore, StoreError, StoreResult};

/// Objects in one bucket, at their key.
#[derive(Clone, Debug)]
pub struct S3BlobStore {
    client: Client,
    bucket: String,
}

/// An S3 client; path-style addressing when an endpoint override (emulator) is given.
pub fn s3_client(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> Client {
    let mut b = aws_sdk_s3::config::Builder::from(sdk);
    let endpoint = endpoint
        .map(str::to_string)
        .or_else(|| sdk.endpoint_url().map(str::to_string));
    if let Some(ep) = endpoint.filter(|e| !e.is_empty()) {
        b = b.endpoint_url(ep).force_path_style(true);
    }
    Client::from_conf(b.build())
}

impl S3BlobStore {
    pub fn new(client: Client, bucket: impl Into<String>) -> S3BlobStore {
        S3BlobStore {
            client,
            bucket: bucket.into(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// HeadObject, or None when the object is absent.
    async fn head(&self, key: &str) -> StoreResult<Option<HeadObjectOutput>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(h) => Ok(Some(h)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(sdk_err("s3 HeadObject", e)),
        }
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, key: &str, bytes: Vec<u8>, content_type: &str) -> StoreResult<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| sdk_err("s3 PutObject", e))?;
        Ok(())
    }

    async fn size(&self, key: &str) -> StoreResult<Option<u64>> {
        Ok(self
            .head(key)
            .await?
            .map(|h| h.content_length().unwrap_or(0).max(0) as u64))
    }

    async fn metadata(&self, key: &str) -> StoreResult<Option<BTreeMap<String, String>>> {
        Ok(self.head(key).await?.map(|h| {
            h.metadata()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect()
        }))
    }

    async fn get(&self, key: &str, max_bytes: u64) -> StoreResult<Vec<u8>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(StoreError::NotFound(key.to_string()))
            }
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                return Err(StoreError::NotFound(key.to_string()))
            }
            Err(e) => return Err(sdk_err("s3 GetObject", e)),
        };
        // Refuse before reading the body.
        let len = out.content_length().unwrap_or(0).max(0) as u64;
        if len > max_bytes {
            return Err(StoreError::TooLarge {
                key: key.to_string(),
                bytes: len,
                max: max_bytes,
            });
        }
        let mut body = out.body;
        let mut buf = Vec::with_capacity(len as usize);
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| StoreError::Transient(format!("s3 GetObject body of {key}: {e}")))?
        {
            buf.extend_from_slice(&chunk);
            // Guard against a missing or wrong Content-Length.
            if buf.len() as u64 > max_bytes {
                return Err(StoreError::TooLarge {
                    key: key.to_string(),
                    bytes: buf.len() as u64,
                    max: max_bytes,
                });
            }
        }
        Ok(buf)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_err("s3 DeleteObject", e))?;
        Ok(())
    }
}
