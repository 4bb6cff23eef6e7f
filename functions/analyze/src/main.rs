//! sightline-analyze Lambda entry point: SQS batches with ReportBatchItemFailures.

use std::sync::Arc;

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use sightline_analyze::AnalyzeHandler;
use sightline_pipeline::analyze::Analyzer;
use sightline_pipeline::aws::generation::{generation_from_env, Role};
use sightline_pipeline::aws::{config, AwsEnv, Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_pipeline::ports::SystemClock;

#[tokio::main]
async fn main() -> Result<(), Error> {
    sightline_pipeline::aws::init_tracing();
    let env = AwsEnv::from_env()?;
    // The function timeout (infra/template.yaml) leaves room for a few records at their
    // worst case (Settings::record_worst_case); records are not started past the deadline.
    let settings = config::settings_from_env()?;
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let provider = config::provider_from_env(&env, &sdk, &settings).await?;
    let repo = Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &env.table));
    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket));
    let settings = Arc::new(settings);
    let search =
        config::search_from_env(&env, &sdk, &settings, repo.clone(), blobs.clone()).await?;
    // Batch-lane jobs become batch items in the same table (the batch function submits them).
    let mut analyzer = Analyzer::new(
        blobs,
        repo.clone(),
        provider,
        settings,
        Arc::new(SystemClock),
    )
    .with_batches(repo.clone());
    if analyzer.settings.shared_limit {
        // Every instance draws from one limit per model, kept in the table.
        analyzer = analyzer.with_shared_limit(repo);
    }
    if let Some(search) = search {
        analyzer = analyzer.with_search(search);
    }
    // A generated image's analysis moves its row on (done, regenerated, mismatch).
    if let Some(side) =
        generation_from_env(&env, &sdk, &clients, &analyzer.settings, Role::Coordinate).await?
    {
        analyzer = analyzer.with_generations(side.generations);
    }
    let queue = Arc::new(SqsQueue::new(clients.sqs.clone(), env.require_queue()?));
    let handler = Arc::new(AnalyzeHandler::new(analyzer, queue, "analyze"));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let handler = handler.clone();
        let deadline = event.context.deadline();
        async move { Ok::<_, Error>(handler.handle(event.payload, Some(deadline)).await?) }
    }))
    .await
}
