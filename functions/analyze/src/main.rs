//! sightline-analyze Lambda entry point: SQS batches with ReportBatchItemFailures.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use sightline_analyze::{AnalyzeHandler, MAX_INLINE_WAIT};
use sightline_pipeline::analyze::Analyzer;
use sightline_pipeline::aws::{config, AwsEnv, Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_pipeline::ports::SystemClock;

/// Provider call timeout. The function timeout (infra/template.yaml) leaves room for a few
/// records per invocation at this worst case; records are not started past the deadline.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> Result<(), Error> {
    sightline_pipeline::aws::init_tracing();
    let env = AwsEnv::from_env()?;
    let mut settings = config::settings_from_env()?;
    settings.max_inline_wait = settings.max_inline_wait.min(MAX_INLINE_WAIT);
    settings.fit_lease_to(PROVIDER_TIMEOUT);
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let provider = config::provider_from_env(&env, &sdk, PROVIDER_TIMEOUT).await?;
    let analyzer = Analyzer::new(
        Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket)),
        Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &env.table)),
        provider,
        Arc::new(settings),
        Arc::new(SystemClock),
    );
    let queue = Arc::new(SqsQueue::new(clients.sqs.clone(), env.require_queue()?));
    let mut handler = AnalyzeHandler::new(analyzer, queue);
    // Worst case of one record: an invalid-output retry (two calls), limiter waits, writes.
    handler.record_budget = PROVIDER_TIMEOUT * 2 + MAX_INLINE_WAIT * 2 + Duration::from_secs(5);
    let handler = Arc::new(handler);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let handler = handler.clone();
        let deadline = event.context.deadline();
        async move { Ok::<_, Error>(handler.handle(event.payload, Some(deadline)).await?) }
    }))
    .await
}
