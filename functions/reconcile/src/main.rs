//! sightline-reconcile Lambda entry point: an EventBridge schedule (`rate(5 minutes)`), and
//! with generation jobs on, a second one every minute for webhook deliveries.

use std::sync::Arc;

use lambda_runtime::{service_fn, Error, LambdaEvent};
use sightline_pipeline::aws::generation::{generation_from_env, Role};
use sightline_pipeline::aws::{config, AwsEnv, Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_pipeline::ingest::Ingest;
use sightline_pipeline::ports::SystemClock;
use sightline_pipeline::reconcile::Reconciler;
use sightline_reconcile::ReconcileHandler;

#[tokio::main]
async fn main() -> Result<(), Error> {
    sightline_pipeline::aws::init_tracing();
    let env = AwsEnv::from_env()?;
    let settings = Arc::new(config::settings_from_env()?);
    let max = sightline_reconcile::max_from_env()?;
    // Every setting is checked before the SDK loads its configuration.
    let queue_url = env.require_queue()?.to_string();
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket));
    let repo = Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &env.table));
    // Manual reindex runs (`{"reindex": {...}}`) use the same vectors and embedder as analyze.
    let search =
        config::search_from_env(&env, &sdk, &settings, repo.clone(), blobs.clone()).await?;
    let generation = generation_from_env(&env, &sdk, &clients, &settings, Role::Coordinate).await?;
    let ingest = Ingest::new(
        blobs,
        repo,
        Arc::new(SqsQueue::new(clients.sqs.clone(), &queue_url)),
        settings,
        Arc::new(SystemClock),
        &env.upload_prefix,
    );
    let mut handler = ReconcileHandler::new(Reconciler::new(ingest), max);
    handler.search = search;
    handler.generation = generation;
    let handler = Arc::new(handler);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let handler = handler.clone();
        let deadline = event.context.deadline();
        async move { Ok::<_, Error>(handler.handle_event(event.payload, Some(deadline)).await?) }
    }))
    .await
}
