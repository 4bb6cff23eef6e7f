//! sightline-batch Lambda entry point: an EventBridge schedule (`rate(1 minute)`).

use std::sync::Arc;

use lambda_runtime::{service_fn, Error, LambdaEvent};
use sightline_batch::BatchHandler;
use sightline_pipeline::aws::{config, AwsEnv, Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_pipeline::batch::BatchLane;
use sightline_pipeline::metrics::no_metrics;
use sightline_pipeline::ports::SystemClock;

#[tokio::main]
async fn main() -> Result<(), Error> {
    sightline_pipeline::aws::init_tracing();
    let env = AwsEnv::from_env()?;
    let settings = Arc::new(config::settings_from_env()?);
    // Jobs that leave the batch lane go back to the analyze queue.
    let queue_url = env.require_queue()?.to_string();
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let provider = config::batch_provider_from_env(&env, &sdk, &settings).await?;
    let repo = Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &env.table));
    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket));
    // The images a batch answers get their vectors here, as the analyzer's do.
    let search =
        config::search_from_env(&env, &sdk, &settings, repo.clone(), blobs.clone()).await?;
    let lane = provider.map(|provider| BatchLane {
        blobs,
        repo: repo.clone(),
        store: repo,
        provider,
        queue: Arc::new(SqsQueue::new(clients.sqs.clone(), &queue_url)),
        settings,
        clock: Arc::new(SystemClock),
        // Each invocation records into its own EMF batch (BatchHandler::handle).
        metrics: no_metrics(),
        search,
    });
    let handler = Arc::new(BatchHandler::new(lane));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let handler = handler.clone();
        async move { Ok::<_, Error>(handler.handle(event.payload).await?) }
    }))
    .await
}
