//! sightline-generate Lambda entry point: generation queue batches (ReportBatchItemFailures)
//! and S3 notifications of CSV drops under `generations/`.

use std::sync::Arc;

use lambda_runtime::{service_fn, Error, LambdaEvent};
use sightline_generate::{handle_drops, GenerateHandler, Invocation};
use sightline_pipeline::aws::generation::{generation_from_env, Role};
use sightline_pipeline::aws::{config, AwsEnv, Clients};

#[tokio::main]
async fn main() -> Result<(), Error> {
    sightline_pipeline::aws::init_tracing();
    let env = AwsEnv::from_env()?;
    let settings = Arc::new(config::settings_from_env()?);
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let side = generation_from_env(&env, &sdk, &clients, &settings, Role::Generate)
        .await?
        .ok_or("SIGHTLINE_GENERATION_QUEUE_URL is required")?;
    // The handler hands retries back to the queue the use-case sends rows to.
    let generations = side.generations;
    let handler = Arc::new(GenerateHandler::new(
        generations.as_ref().clone(),
        generations.queue.clone(),
        "generate",
    ));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let handler = handler.clone();
        let generations = generations.clone();
        let deadline = event.context.deadline();
        async move {
            match Invocation::parse(event.payload)? {
                Invocation::Queue(batch) => Ok::<_, Error>(serde_json::to_value(
                    handler.handle(batch, Some(deadline)).await?,
                )?),
                Invocation::Drops(drops) => {
                    let outcomes = handle_drops(&generations, drops).await?;
                    Ok(serde_json::json!({ "files": outcomes.len() }))
                }
            }
        }
    }))
    .await
}
