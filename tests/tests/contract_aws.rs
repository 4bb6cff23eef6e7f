//! The adapter contract against the AWS adapters (DynamoDB, SQS, S3) on the emulator.

use std::sync::Arc;
use std::time::Duration;

use sightline_pipeline::aws::{Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_tests::{aws_setup, contract, emulator::Emulator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_adapter_contract() {
    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));

    let table = contract::unique("contract-table-");
    aws_setup::create_table(&clients.dynamodb, &table)
        .await
        .unwrap();
    let repo = Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &table));

    let bucket = contract::unique("contract-bucket-");
    aws_setup::create_bucket(&clients.s3, &bucket)
        .await
        .unwrap();
    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &bucket));

    let (url, _dlq) = aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &contract::unique("contract-q-"),
        Duration::from_secs(30),
        100,
    )
    .await
    .unwrap();
    let queue =
        Arc::new(SqsQueue::new(clients.sqs.clone(), url).with_wait(Duration::from_millis(500)));

    let (r, s, q, b) = tokio::join!(
        contract::repository_contract(repo.clone()),
        contract::batch_store_contract(repo.clone(), repo),
        contract::queue_contract(queue),
        contract::blob_contract(blobs),
    );
    let _ = (r, s, q, b);
}
