//! The batch lane end to end against the provider simulator (see `sightline_tests::batch_run`):
//! 300 images through refused batches, the enqueued-token limit, line errors, expiry and
//! shuffled output, on the local adapters (SQLite + files), for OpenAI and Anthropic.

use std::sync::Arc;

use sightline_pipeline::batch::BatchLane;
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
use sightline_pipeline::ports::{Clock, SystemClock};
use sightline_pipeline::providers::select::{build_batch_provider, build_provider, ProviderKeys};
use sightline_pipeline::settings::ProviderKind;
use sightline_tests::batch_run::{self, lane_tick, Outcome, Stack};

async fn local_run(provider: &str) -> Outcome {
    let sim = batch_run::start_sim().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::open(&dir.path().join("sightline.db")).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let repo = Arc::new(SqliteRepository::with_job_queue(db.clone(), "analyze"));
    let settings = Arc::new(batch_run::settings(&sim, provider));
    let stack = Stack {
        blobs: Arc::new(FileBlobStore::new(dir.path().join("blobs"))),
        repo: repo.clone(),
        store: repo.clone(),
        queue: Arc::new(SqliteQueue::new(
            db,
            "analyze",
            settings.max_receives,
            clock.clone(),
        )),
    };
    let mut keys = ProviderKeys::default();
    keys.set(ProviderKind::OpenAi, Some("sk-sim".into()));
    keys.set(ProviderKind::Anthropic, Some("sk-sim".into()));
    let realtime = build_provider(&settings, &keys).unwrap();
    let batches = build_batch_provider(&settings, &keys).unwrap().unwrap();
    assert_eq!(batches.name(), provider);
    let lane = BatchLane {
        blobs: stack.blobs.clone(),
        repo: stack.repo.clone(),
        store: stack.store.clone(),
        provider: batches.clone(),
        queue: stack.queue.clone(),
        settings: settings.clone(),
        clock,
        metrics: sightline_pipeline::metrics::no_metrics(),
    };
    let outcome = batch_run::run(
        300,
        stack,
        &sim,
        settings,
        realtime,
        batches,
        lane_tick(lane),
    )
    .await
    .unwrap();
    eprintln!("{provider}: {outcome:#?}");
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_batch_lane_300_images_end_once_paid_once_through_every_batch_fault() {
    local_run("openai").await.check(true).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_batch_lane_300_images_end_once_paid_once_through_every_batch_fault() {
    local_run("anthropic").await.check(false).unwrap();
}
