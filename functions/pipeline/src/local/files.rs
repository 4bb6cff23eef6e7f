//! Blob store on the local file system (the embedded default).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;

use crate::ports::{BlobStore, StoreError, StoreResult};

/// Objects are files under `root`, at their key.
#[derive(Debug, Clone)]
pub struct FileBlobStore {
    root: PathBuf,
}

impl FileBlobStore {
    pub fn new(root: impl Into<PathBuf>) -> FileBlobStore {
        FileBlobStore { root: root.into() }
    }

    /// Keys are relative paths; anything that could escape the root is refused.
    fn path(&self, key: &str) -> StoreResult<PathBuf> {
        let rel = Path::new(key);
        let safe = !key.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            return Err(StoreError::Permanent(format!("invalid blob key {key:?}")));
        }
        Ok(self.root.join(rel))
    }
}

fn io_err(key: &str, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound(key.to_string())
    } else {
        StoreError::Transient(format!("{key}: {e}"))
    }
}

#[async_trait]
impl BlobStore for FileBlobStore {
    async fn put(&self, key: &str, bytes: Vec<u8>, _content_type: &str) -> StoreResult<()> {
        let path = self.path(key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| io_err(key, e))?;
        }
        // Write, sync, rename, sync the folder: readers never see half a file, and once put
        // returns the object survives a crash (an acknowledged upload is never lost).
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        let key_owned = key.to_string();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            if let Err(e) = std::fs::rename(&tmp, &path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Transient(format!("{key_owned}: write task failed: {e}")))?
        .map_err(|e| io_err(&key_owned, e))
    }

    async fn size(&self, key: &str) -> StoreResult<Option<u64>> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(key, e)),
        }
    }

    async fn get(&self, key: &str, max_bytes: u64) -> StoreResult<Vec<u8>> {
        let path = self.path(key)?;
        let len = tokio::fs::metadata(&path)
            .await
            .map_err(|e| io_err(key, e))?
            .len();
        if len > max_bytes {
            return Err(StoreError::TooLarge {
                key: key.to_string(),
                bytes: len,
                max: max_bytes,
            });
        }
        tokio::fs::read(&path).await.map_err(|e| io_err(key, e))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key, e)),
        }
    }

    /// Files keep no user metadata.
    async fn metadata(&self, key: &str) -> StoreResult<Option<BTreeMap<String, String>>> {
        Ok(self.size(key).await?.map(|_| BTreeMap::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_keys_that_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileBlobStore::new(dir.path());
        for key in ["../x", "/etc/passwd", "a/../../b", ""] {
            assert!(s.put(key, vec![1], "x").await.is_err(), "{key}");
        }
        s.put("a b+c(1)/é.jpg", vec![1, 2], "image/jpeg")
            .await
            .unwrap();
        assert_eq!(s.get("a b+c(1)/é.jpg", 10).await.unwrap(), vec![1, 2]);
        assert!(matches!(
            s.get("a b+c(1)/é.jpg", 1).await,
            Err(StoreError::TooLarge { .. })
        ));
    }
}
