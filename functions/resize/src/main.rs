//! sightline-resize Lambda entry point: S3 ObjectCreated events on the uploads prefix.

use std::sync::Arc;

use aws_lambda_events::event::s3::S3Event;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use sightline_pipeline::aws::{config, AwsEnv, Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_pipeline::ingest::Ingest;
use sightline_pipeline::metrics::emf::Emf;
use sightline_pipeline::ports::SystemClock;

#[tokio::main]
async fn main() -> Result<(), Error> {
    sightline_pipeline::aws::init_tracing();
    let env = AwsEnv::from_env()?;
    let settings = Arc::new(config::settings_from_env()?);
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let ingest = Arc::new(Ingest::new(
        Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket)),
        Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &env.table)),
        Arc::new(SqsQueue::new(clients.sqs.clone(), env.require_queue()?)),
        settings,
        Arc::new(SystemClock),
        &env.upload_prefix,
    ));
    let emf = Arc::new(Emf::lambda("resize"));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<S3Event>| {
        let ingest = ingest.clone();
        let emf = emf.clone();
        async move {
            let outcomes = sightline_resize::handle_with(&ingest, event.payload, &emf).await?;
            Ok::<_, Error>(serde_json::json!({ "objects": outcomes.len() }))
        }
    }))
    .await
}
