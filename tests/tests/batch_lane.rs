//! The batch lane end to end against the provider simulator (see `sightline_tests::batch_run`):
//! 300 images through refused batches, the enqueued-token limit, line errors, expiry and
//! shuffled output, on the local adapters (SQLite + files) for OpenAI and Anthropic, and on the
//! emulator stack (S3, SQS, DynamoDB in a container) with the batch Lambda's handler as the
//! schedule.

use std::sync::Arc;

use std::time::Duration;

use sightline_batch::BatchHandler;
use sightline_pipeline::aws::{Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_pipeline::batch::BatchLane;
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
use sightline_pipeline::ports::{Clock, SystemClock};
use sightline_pipeline::providers::select::{build_batch_provider, build_provider, ProviderKeys};
use sightline_pipeline::settings::ProviderKind;
use sightline_tests::batch_run::{self, lane_tick, Outcome, Stack, Tick};
use sightline_tests::{aws_setup, contract::unique, emulator::Emulator};

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
        search: None,
    };
    let outcome = batch_run::run(
        300,
        true,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_batch_lane_300_images_end_once_paid_once_with_the_batch_handler_as_schedule() {
    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));
    let bucket = unique("batch-bucket-");
    let table = unique("batch-table-");
    aws_setup::create_bucket(&clients.s3, &bucket)
        .await
        .unwrap();
    aws_setup::create_table(&clients.dynamodb, &table)
        .await
        .unwrap();
    let (analyze_url, _dlq) = aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &unique("batch-analyze-"),
        Duration::from_secs(30),
        5,
    )
    .await
    .unwrap();
    let sim = batch_run::start_sim().await.unwrap();
    let mut settings = batch_run::settings(&sim, "openai");
    // The schedule ticks without flushing: everything pending is due at once.
    settings.batch_max_wait = Duration::ZERO;
    let settings = Arc::new(settings);
    let repo = Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &table));
    let stack = Stack {
        blobs: Arc::new(S3BlobStore::new(clients.s3.clone(), &bucket)),
        repo: repo.clone(),
        store: repo.clone(),
        queue: Arc::new(
            SqsQueue::new(clients.sqs.clone(), &analyze_url).with_wait(Duration::from_millis(50)),
        ),
    };
    let mut keys = ProviderKeys::default();
    keys.set(ProviderKind::OpenAi, Some("sk-sim".into()));
    let realtime = build_provider(&settings, &keys).unwrap();
    let batches = build_batch_provider(&settings, &keys).unwrap().unwrap();
    let lane = BatchLane {
        blobs: stack.blobs.clone(),
        repo: stack.repo.clone(),
        store: stack.store.clone(),
        provider: batches.clone(),
        queue: stack.queue.clone(),
        settings: settings.clone(),
        clock: Arc::new(SystemClock),
        metrics: sightline_pipeline::metrics::no_metrics(),
        search: None,
    };
    let handler = BatchHandler::new(Some(lane));
    let tick: Tick = Arc::new(move || {
        let handler = handler.clone();
        Box::pin(async move {
            let event = serde_json::json!({
                "version": "0", "id": "tick", "detail-type": "Scheduled Event",
                "source": "aws.events", "account": "000000000000",
                "time": "2026-11-30T00:00:00Z", "region": "us-east-1",
                "resources": [], "detail": {}
            });
            Ok(handler.handle(event).await?)
        })
    });
    // One poller at a time: moto's TransactWriteItems restores a table snapshot when a
    // transaction is cancelled, undoing a concurrent transaction's writes (real DynamoDB does
    // not); two pollers at once are tested on SQLite.
    let outcome = batch_run::run(300, false, stack, &sim, settings, realtime, batches, tick)
        .await
        .unwrap();
    eprintln!("emulator: {outcome:#?}");
    outcome.check(true).unwrap();
}
