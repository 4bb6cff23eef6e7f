//! sightline-api Lambda entry point: API Gateway HTTP API (payload v2) → axum router.

use lambda_http::Error;
use sightline_pipeline::aws::generation::{generation_from_env, Role};
use sightline_pipeline::aws::{config, AwsEnv, Clients};

#[tokio::main]
async fn main() -> Result<(), Error> {
    sightline_pipeline::aws::init_tracing();
    let env = AwsEnv::from_env()?;
    let mut settings = config::settings_from_env()?;
    let sdk = config::sdk_config_from_env().await;
    config::load_admin_key(&mut settings, &sdk).await?;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let mut state = sightline_api::api_state(&env, &clients, settings);
    state.search = config::search_from_env(
        &env,
        &sdk,
        &state.settings,
        state.repo.clone(),
        state.blobs.clone(),
    )
    .await?;
    let settings = state.settings.clone();
    if let Some(side) =
        generation_from_env(&env, &sdk, &clients, &settings, Role::Coordinate).await?
    {
        state.generations = Some(side.generations);
        state.deliveries = Some(side.deliveries.as_ref().clone());
    }
    let app = sightline_api::app(state);
    lambda_http::run(app).await
}
