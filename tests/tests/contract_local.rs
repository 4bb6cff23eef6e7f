//! The adapter contract against the local adapters (SQLite repository and queue, files).

use std::sync::Arc;

use sightline_pipeline::local::{
    FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository, SqliteVectorStore,
};
use sightline_pipeline::ports::{Clock, Queue, SystemClock};
use sightline_tests::contract;

#[tokio::test]
async fn local_repository_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    contract::repository_contract(Arc::new(SqliteRepository::new(db))).await;
}

#[tokio::test]
async fn local_repository_contract_with_its_job_queue() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    let repo = Arc::new(SqliteRepository::with_job_queue(db.clone(), "jobs"));
    contract::repository_contract(repo.clone()).await;
    // The contract's put_queued left exactly its one job on the queue, in the same write
    // (sent at the contract's clock, in 2030: read it from further on).
    struct Later;
    impl Clock for Later {
        fn now_ms(&self) -> u64 {
            2_000_000_000_000
        }
    }
    let queue = SqliteQueue::new(db, "jobs", 5, Arc::new(Later));
    let got = queue
        .receive(10, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "{\"job\":4}");
}

/// Two connections on one database file, as two processes on one data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limit_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let a = SqliteRepository::new(SqliteDb::open(&path).unwrap());
    let b = SqliteRepository::new(SqliteDb::open(&path).unwrap());
    contract::rate_limit_contract(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test]
async fn local_batch_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    let repo = Arc::new(SqliteRepository::new(db));
    contract::batch_store_contract(repo.clone(), repo).await;
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

#[tokio::test]
async fn local_vector_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    contract::vector_store_contract(Arc::new(SqliteVectorStore::new(db))).await;
}

#[tokio::test]
async fn local_generation_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    contract::generation_store_contract(Arc::new(SqliteRepository::new(db))).await;
}

#[tokio::test]
async fn settings_webhook_secrets_contract() {
    use sightline_pipeline::Settings;
    let own = std::collections::BTreeMap::from([(
        "acme".to_string(),
        contract::OWN_WEBHOOK_SECRET.to_string(),
    )]);
    let with_default = Settings {
        webhook_secret: Some(contract::DEFAULT_WEBHOOK_SECRET.into()),
        tenant_webhook_secret: own.clone(),
        ..Settings::default()
    };
    let without_default = Settings {
        tenant_webhook_secret: own,
        ..Settings::default()
    };
    contract::webhook_secrets_contract(Arc::new(with_default), Arc::new(without_default)).await;
}
