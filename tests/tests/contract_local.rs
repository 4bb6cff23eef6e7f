//! The adapter contract against the local adapters (SQLite repository and queue, files).

use std::sync::Arc;

use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
use sightline_pipeline::ports::SystemClock;
use sightline_tests::contract;

#[tokio::test]
async fn local_repository_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    contract::repository_contract(Arc::new(SqliteRepository::new(db))).await;
}

#[tokio::test]
async fn local_queue_contract() {
    let db = SqliteDb::in_memory().unwrap();
    contract::queue_contract(Arc::new(SqliteQueue::new(
        db,
        "contract",
        100,
        Arc::new(SystemClock),
    )))
    .await;
}

#[tokio::test]
async fn local_blob_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract::blob_contract(Arc::new(FileBlobStore::new(dir.path()))).await;
}
